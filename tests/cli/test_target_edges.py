"""The edges of what `generate`, `chat` and `eval` point at, through the real CLI on tiny models: a
checkpoint put on a base it was not trained on is refused by its seal's fingerprint; a bare adapter as
TARGET gets a hint that works for the command given; a hub id is looked up in the Hugging Face cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import LORATOOL_RUN
from conftest import random_adapter as peft_adapter
from helpers.generate import PROMPT, cli


def run_with_checkpoint(folder: Path, base: Path) -> Path:
    """A run stopped after one checkpoint, sealed as training seals it, trained on `base`; its
    adapter_config names a base this machine does not have, so only the fingerprints tell bases apart."""
    from loratool.model.fingerprint import weights_fingerprint
    from loratool.train.checkpoints import CheckpointSeal

    fingerprint = weights_fingerprint(base)
    folder.mkdir()
    base_model = {"id": str(base), "resolved_path": str(base), "fingerprint": fingerprint}
    (folder / "run.json").write_text(
        json.dumps({**LORATOOL_RUN, "status": "failed", "base_model": base_model})
    )
    checkpoint = peft_adapter(base, folder / "checkpoints" / "checkpoint-12", 2, target_modules=["q_proj"])
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-model"
    (checkpoint / "adapter_config.json").write_text(json.dumps(config))
    args = SimpleNamespace(output_dir=str(checkpoint.parent))
    state = SimpleNamespace(global_step=12, is_world_process_zero=True, num_input_tokens_seen=0)
    CheckpointSeal(base_fingerprint=fingerprint).on_save(args, state, control=None)
    return checkpoint


def test_a_checkpoint_on_a_base_with_other_weights_is_refused(tmp_path, tiny_llama, tiny_model_factory):
    checkpoint = run_with_checkpoint(tmp_path / "run", tiny_llama)
    other = tiny_model_factory("llama", seed=7)  # same shapes: only the fingerprint tells them apart
    result = cli("generate", other, "--adapter", f"ck={checkpoint}", "--prompt", PROMPT)
    assert result.exit_code == 1, result.output
    assert f"error: adapter ck ({checkpoint}) was trained on {tiny_llama}" in result.output
    assert "their weights differ" in result.output and "Traceback" not in result.output
    # As TARGET, the hint names the run's base, and merge needs no --base (run.json has it).
    result = cli("generate", checkpoint, "--prompt", PROMPT)
    assert result.exit_code == 1
    assert f"`loratool generate {tiny_llama} --adapter NAME={checkpoint}`" in result.output
    assert f"`loratool merge --adapter {checkpoint}`" in result.output
    # On its own base it loads and answers.
    result = cli(
        "generate", tiny_llama, "--adapter", f"ck={checkpoint}", "--prompt", PROMPT, "--max-new-tokens", "4"
    )
    assert result.exit_code == 0, result.output


def test_the_hint_for_a_bare_adapter_works_for_eval(tmp_path, tiny_llama, smoke_data):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    refused = cli("eval", adapter)
    assert refused.exit_code == 1
    hint = next(line for line in refused.output.splitlines() if line.startswith("hint: "))
    commands = re.findall(r"`(loratool [^`]*)`", hint)
    assert [c.split()[1] for c in commands] == ["generate", "merge", "eval"], hint
    assert "--adapter" not in commands[2]  # `loratool eval` has no --adapter
    # Do what the hint says: merge, then evaluate the merged model.
    merge = commands[1].split()[1:] + ["--no-verify"]
    merged = cli(*[str(tiny_llama) if part == "BASE" else part for part in merge])
    assert merged.exit_code == 0, merged.output
    evaluate = commands[2].split()[1:]
    evaluate[evaluate.index("FILE")] = str(smoke_data)
    evaluated = cli(*evaluate, "--max-samples", "2", "--max-new-tokens", "4")
    assert evaluated.exit_code == 0, evaluated.output
    assert (adapter / "merged" / "eval" / "metrics.json").is_file()


def test_a_hub_id_not_in_the_cache_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    result = cli("generate", "some-org/some-model", "--prompt", PROMPT)
    assert result.exit_code == 1
    assert (
        "error: TARGET 'some-org/some-model' is not a local path, and as a hub id it is not in the local "
        f"Hugging Face cache ({tmp_path / 'hub'}; HF_HUB_OFFLINE is set)"
    ) in result.output
    assert "hint: download it once with network (`hf download some-org/some-model`" in result.output
    assert "./some-org" not in result.output and "Traceback" not in result.output


def test_a_hub_id_in_the_cache_is_generated_with(tmp_path, tiny_llama, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = hub / "models--some-org--tiny"
    commit = "0" * 40
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    result = cli("generate", "some-org/tiny", "--prompt", PROMPT, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert json.loads((repo / "snapshots" / commit / "config.json").read_text())  # read from the cache as is


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("out/runs/run1", "error: TARGET not found: "),  # a path: a hub id has at most one '/'
        ("out/run1", "error: TARGET 'out/run1' is not a local path, and as a hub id it is not in"),  # either
    ],
)
def test_a_missing_target_is_named_as_what_it_can_be(tmp_path, monkeypatch, target, message):
    monkeypatch.chdir(tmp_path)
    result = cli("generate", target, "--prompt", PROMPT)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
