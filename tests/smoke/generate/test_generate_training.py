"""`loratool generate` on trained run directories: an extra adapter next to the run's, the run's
system prompt and a merged model's run name."""

from __future__ import annotations

import pytest

from helpers.generate import PROMPT, cli

# a fixture, imported for pytest to find in this module
from helpers.generate import adapters as adapters


@pytest.mark.quick
def test_run_directory_with_an_extra_adapter(tmp_path, tiny_llama, adapters, smoke_data):
    from conftest import smoke_recipe, write_recipe

    recipe = smoke_recipe(
        tiny_llama, smoke_data, tmp_path / "run", training={"max_steps": 2, "save_steps": 2}
    )
    assert cli("train", write_recipe(tmp_path / "r.yaml", recipe)).exit_code == 0
    result = cli(
        "generate",
        tmp_path / "run",
        "--adapter",
        adapters["two"],
        "--prompt",
        PROMPT,
        "--prompt",
        f"@two: {PROMPT}",
    )
    assert result.exit_code == 0, result.output
    assert f"[run] {PROMPT}" in result.output and f"[two] {PROMPT}" in result.output


def test_run_adapter_gets_its_system_prompt_and_a_merged_model_its_run_name(tmp_path, tiny_llama, smoke_data):
    from conftest import smoke_recipe, write_recipe
    from loratool.generate.run import load_adapters, render_for
    from loratool.generate.target import resolve_target

    recipe = smoke_recipe(
        tiny_llama, smoke_data, tmp_path / "calm", training={"max_steps": 2, "save_steps": 2}
    )
    recipe["data"]["train"][0]["system_prompt"] = "You are a calm falcon."
    assert cli("train", write_recipe(tmp_path / "r.yaml", recipe)).exit_code == 0
    loaded = load_adapters(resolve_target(tmp_path / "calm"), [], log=lambda _: None, warm_up=False)
    user = [{"role": "user", "content": "hi"}]
    text = loaded.prompting_of("calm").tokenizer.decode(render_for(loaded, "calm", user, None, None))
    assert "You are a calm falcon." in text  # the trained system prompt, unasked
    text = loaded.prompting_of("calm").tokenizer.decode(render_for(loaded, "calm", user, "Be brief.", None))
    assert "Be brief." in text and "calm falcon" not in text  # --system wins
    base_text = loaded.prompting_of("base").tokenizer.decode(render_for(loaded, "base", user, None, None))
    assert "calm falcon" not in base_text  # the base was not trained with it

    merged = cli("merge", "--adapter", tmp_path / "calm", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    result = cli("generate", tmp_path / "merged", "--prompt", PROMPT, "--prompt", f"@calm: {PROMPT}",
                 "--max-new-tokens", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count(f"[calm] {PROMPT}") == 2 and "[base]" not in result.output
