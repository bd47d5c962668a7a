"""`loratool generate` and `loratool chat`: several adapters on one base answer like each adapter
alone, a foreign adapter is refused, long prompts are cut instead of crashing, each adapter gets its
own template, and chat works on piped input — through the real CLI, on tiny models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers.generate import PROMPT, cli, random_adapter, reference_answer

# a fixture, imported for pytest to find in this module
from helpers.generate import adapters as adapters
from loratool.generate.run import fit_to_context, run_generate


def test_several_adapters_switch_per_prompt(tiny_llama, adapters):
    result = cli(
        "generate",
        tiny_llama,
        "--adapter",
        f"one={adapters['one']}",
        "--adapter",
        f"two={adapters['two']}",
        "--prompt",
        PROMPT,  # the first adapter answers prompts that name none
        "--prompt",
        f"@two: {PROMPT}",
        "--prompt",
        f"@base: {PROMPT}",
        "--max-new-tokens",
        "12",
    )
    assert result.exit_code == 0, result.output
    answers = dict(re.findall(r"^\[(\w+)\] .*\n(.*)$", result.output, flags=re.MULTILINE))
    assert set(answers) == {"one", "two", "base"}
    assert answers["one"] == reference_answer(tiny_llama, adapters["one"], PROMPT, 12)
    assert answers["two"] == reference_answer(tiny_llama, adapters["two"], PROMPT, 12)
    assert answers["base"] == reference_answer(tiny_llama, None, PROMPT, 12)
    assert len(set(answers.values())) == 3  # each adapter really answered
    assert re.search(r"adapter one loaded from .* in \d+ ms", result.output)
    assert re.search(r"adapter switches: 2, mean [\d.]+ ms", result.output)


def test_adapter_of_another_base_is_refused(tmp_path, tiny_llama, tiny_model_factory):
    other = tiny_model_factory("llama", hidden_size=32)
    foreign = random_adapter(other, tmp_path / "foreign", seed=3)
    result = cli("generate", tiny_llama, "--adapter", f"x={foreign}", "--prompt", PROMPT)
    assert result.exit_code == 1
    assert (
        f"adapter x ({foreign}) was trained on {other}, but the loaded base is {tiny_llama}" in result.output
    )
    assert "hint: pass as TARGET the base" in result.output and "Traceback" not in result.output


def test_adapter_with_same_shapes_but_other_weights_is_refused(tmp_path, tiny_llama, tiny_model_factory):
    other = tiny_model_factory("llama", seed=7)  # same architecture and sizes, other weights
    foreign = random_adapter(other, tmp_path / "foreign", seed=3)
    result = cli("generate", tiny_llama, "--adapter", f"x={foreign}", "--prompt", PROMPT)
    assert result.exit_code == 1
    assert "their weights differ" in result.output


def test_too_long_prompt_is_cut_with_a_warning(tiny_model_factory):
    short = tiny_model_factory("llama", max_position_embeddings=48)
    long_prompt = " ".join(["falcon"] * 80)
    result = cli("generate", short, "--prompt", long_prompt, "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: the prompt is \d+ tokens; its first \d+ were cut", result.output)
    assert fit_to_context(list(range(100)), 48, 8) == (list(range(60, 100)), 60)

    result = cli("generate", short, "--prompt", "hi", "--max-new-tokens", "48")
    assert result.exit_code == 1
    assert (
        "--max-new-tokens 48 leaves no room for a prompt: the model's context is 48 tokens" in result.output
    )


def test_adapter_for_other_shapes_is_refused_without_fingerprints(tmp_path, tiny_llama, tiny_model_factory):
    import json

    foreign = random_adapter(tiny_model_factory("llama", hidden_size=32), tmp_path / "foreign", seed=3)
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-model"  # not on this machine: no fingerprint
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    result = cli("generate", tiny_llama, "--adapter", f"x={foreign}", "--prompt", PROMPT)
    assert result.exit_code == 1
    assert "was trained on some-org/some-model, but the loaded base is" in result.output
    assert "shape mismatch" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "@nobody: hi"], "no adapter named 'nobody' (loaded: base)"),
        ([], "no prompt given"),
        (["--adapter", "/nonexistent/adapter", "--prompt", "hi"], "adapter directory not found"),
    ],
)
def test_generate_mistakes(tiny_llama, args, message):
    result = cli("generate", tiny_llama, *args)
    assert result.exit_code == 1 and message in result.output


def test_duplicate_adapter_names_are_refused(tiny_llama, adapters):
    result = cli(
        "generate",
        tiny_llama,
        "--adapter",
        f"a={adapters['one']}",
        "--adapter",
        f"a={adapters['two']}",
        "--prompt",
        "hi",
    )
    assert result.exit_code == 1 and "the name 'a' is already taken" in result.output


# --- chat ----------------------------------------------------------------------------------------------


def test_chat_with_piped_input(tiny_llama, adapters):
    script = f"{PROMPT}\n/adapter two\n/adapters\n/adapter nobody\n/reset\n/exit\nnever read\n"
    result = cli(
        "chat", tiny_llama, "--adapter", f"one={adapters['one']}", "--adapter", f"two={adapters['two']}",
        "--max-new-tokens", "12", input=script,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # The first answer streamed is the greedy answer of the first adapter to the same single-turn prompt.
    assert reference_answer(tiny_llama, adapters["one"], PROMPT, 12) in result.output
    assert re.search(r"\(now answering with two; switched in [\d.]+ ms\)", result.output)
    assert "adapters: one, two (active), base" in result.output
    assert "no adapter named 'nobody'" in result.output and "(history cleared)" in result.output


def test_chat_keeps_the_history_within_the_context(tiny_model_factory):
    short = tiny_model_factory("llama", max_position_embeddings=64)
    lines = "\n".join(f"Tell me about the falcon number {i}, please." for i in range(6)) + "\n"
    result = cli("chat", short, "--max-new-tokens", "8", input=lines)
    assert result.exit_code == 0, result.output
    assert "oldest message(s) to stay within the context" in result.output


# --- each adapter in its own format (issue 12) ------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def adapter_with_template(base: Path, out: Path, seed: int, template: str) -> Path:
    """A random adapter saved with the base's tokenizer under another (built-in) chat template, as a run
    trained with data.chat_template would save it."""
    from transformers import AutoTokenizer

    from loratool.data.templates import builtin_template

    adapter = random_adapter(base, out, seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = builtin_template(template)
    tokenizer.save_pretrained(adapter)
    return adapter


def test_each_adapter_is_prompted_with_its_own_template(tmp_path, tiny_llama, adapters):
    zephyr = adapter_with_template(tiny_llama, tmp_path / "zephyr", seed=5, template="zephyr")
    result = cli(
        "generate", tiny_llama, "--adapter", f"z={zephyr}", "--adapter", f"one={adapters['one']}",
        "--prompt", PROMPT, "--prompt", f"@one: {PROMPT}", "--prompt", f"@base: {PROMPT}",
        "--max-new-tokens", "12",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    answers = dict(re.findall(r"^\[(\w+)\] .*\n(.*)$", result.output, flags=re.MULTILINE))
    # z answers as it does alone under the zephyr template it was saved with, not the base's chatml
    assert answers["z"] == reference_answer(tiny_llama, zephyr, PROMPT, 12, tokenizer_dir=zephyr)
    assert answers["one"] == reference_answer(tiny_llama, adapters["one"], PROMPT, 12)
    assert answers["base"] == reference_answer(tiny_llama, None, PROMPT, 12)
    # the formats differ, and that is said once per adapter that differs from the first
    assert re.search(r"note: one is prompted with .*which differs from z's", result.output)
    assert re.search(r"note: base is prompted with .*which differs from z's", result.output)
    assert re.search(r"warmed up in [\d.]+s", result.output)


def test_tools_are_rendered_by_the_template(tmp_path, tiny_llama):
    import json

    chatml = adapter_with_template(tiny_llama, tmp_path / "chatml", seed=6, template="chatml")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    records = run_generate(
        tiny_llama,
        prompts=["What is the weather in Paris?"],
        adapters=[f"c={chatml}"],
        max_new_tokens=10,
        tools=tools,
        warm_up=False,
        log=lambda _: None,
    )
    expected = reference_answer(tiny_llama, chatml, "What is the weather in Paris?", 10, tokenizer_dir=chatml,
                                tools=TOOLS)  # fmt: skip
    assert records[0]["answer"] == expected
    without = reference_answer(tiny_llama, chatml, "What is the weather in Paris?", 10, tokenizer_dir=chatml)
    assert expected != without  # the tool definitions really were in the prompt

    # the tiny base's own template drops tools: refused, naming who and why
    result = cli("generate", tiny_llama, "--tools", tools, "--prompt", "hi")
    assert result.exit_code == 1
    assert "--tools: base is prompted with the model's own chat template, which does not write tool" in (
        result.output
    )
    tools.write_text('{"name": "x"}')
    result = cli("generate", tiny_llama, "--tools", tools, "--prompt", "hi")
    assert result.exit_code == 1 and "expected a non-empty JSON list of tool definitions" in result.output
