"""An `--adapter` that is an unsealed checkpoint of a run: generate (and serve, through the same loader)
loads it with a warning naming it and the newest complete checkpoint; a sealed one loads without a word."""

from __future__ import annotations

import pytest

from helpers.generate import PROMPT
from helpers.merge import run_with_checkpoints
from loratool.generate.run import load_adapters, run_generate
from loratool.generate.target import resolve_target
from loratool.rundir.records import CHECKPOINT_SEAL


@pytest.fixture
def run(tmp_path, tiny_llama):
    return run_with_checkpoints(tmp_path / "run", tiny_llama)


def generate_with(base, adapter) -> list[str]:
    said: list[str] = []
    records = run_generate(
        base, prompts=[PROMPT], adapters=[f"ck={adapter}"], max_new_tokens=2, warm_up=False, log=said.append
    )
    assert records[0]["adapter"] == "ck"  # it answered all the same
    return said


def test_an_unsealed_checkpoint_is_loaded_with_a_warning(run, tiny_llama):
    checkpoint = run / "checkpoints" / "checkpoint-12"
    (checkpoint / CHECKPOINT_SEAL).unlink()  # killed while saving: the seal is written last
    warnings = [line for line in generate_with(tiny_llama, checkpoint) if line.startswith("warning:")]
    assert warnings == [
        f"warning: adapter ck: the checkpoint {checkpoint} is incomplete (interrupted while saving), so its "
        "weights may be half written or not the ones the run saved; the newest complete checkpoint is "
        f"{run / 'checkpoints' / 'checkpoint-6'}"
    ]


def test_a_sealed_checkpoint_loads_without_a_warning(run, tiny_llama):
    said = generate_with(tiny_llama, run / "checkpoints" / "checkpoint-12")
    assert not [line for line in said if line.startswith("warning:")]


def test_an_adapter_added_later_is_warned_about_too(run, tiny_llama):
    """serve's POST /v1/load_lora_adapter puts adapters on with Adapters.add."""
    checkpoint = run / "checkpoints" / "checkpoint-6"
    (checkpoint / "adapter_config.json").write_text(
        (checkpoint / "adapter_config.json").read_text() + "\n"
    )  # changed since the seal listed it
    said: list[str] = []
    adapters = load_adapters(resolve_target(tiny_llama), [], said.append, warm_up=False)
    adapters.add("late", checkpoint)
    assert "late" in adapters.names
    [warning] = [line for line in said if line.startswith("warning:")]
    assert warning.startswith(
        f"warning: adapter late: the checkpoint {checkpoint} is damaged since it was saved (adapter_config.json"
    )
    assert warning.endswith(f"the newest complete checkpoint is {run / 'checkpoints' / 'checkpoint-12'}")
