"""The edges of `loratool merge`, without training: a checkpoint used as the adapter carries the base
fingerprint its seal recorded and is checked against the base like a run; an unsealed checkpoint is
refused unless --force; a rerun after a killed merge removes the partial directory the dead merge left."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_adapter as peft_adapter
from helpers.merge import record, run_with_checkpoints
from loratool.errors import LoratoolError
from loratool.merge import run_merge
from loratool.model.fingerprint import weights_fingerprint
from loratool.rundir.outputs import lock_path
from loratool.rundir.records import CHECKPOINT_SEAL, read_training_run


@pytest.fixture()
def run(tmp_path, tiny_llama) -> Path:
    return run_with_checkpoints(tmp_path / "run", tiny_llama)


def test_the_seal_carries_the_base_fingerprint_and_a_checkpoint_reads_it(run, tiny_llama, tmp_path):
    checkpoint = run / "checkpoints" / "checkpoint-12"
    sealed = json.loads((checkpoint / CHECKPOINT_SEAL).read_text())
    assert sealed["base_fingerprint"] == weights_fingerprint(tiny_llama)
    found = read_training_run(checkpoint)
    assert found.checkpoint == checkpoint and found.checkpoint_problem is None
    assert found.base.fingerprint == sealed["base_fingerprint"] and found.base.id == str(tiny_llama)
    assert found.fingerprint_source == f"checkpoint-12's seal ({CHECKPOINT_SEAL})"
    # Copied out of its run, a sealed checkpoint still names its base.
    copied = Path(shutil.copytree(checkpoint, tmp_path / "copied-checkpoint"))
    assert read_training_run(copied).base.fingerprint == sealed["base_fingerprint"]


def test_a_checkpoint_is_refused_on_a_base_with_other_weights(run, tiny_model_factory):
    other = tiny_model_factory("llama", seed=7)  # same architecture and shapes, other weights
    checkpoint = run / "checkpoints" / "checkpoint-12"
    with pytest.raises(LoratoolError) as refused:
        run_merge(checkpoint, base=str(other), verify=False, log=lambda _: None)
    assert refused.value.message.startswith(
        "the base model is not the one this adapter was trained on: checkpoint-12's seal "
        f"({CHECKPOINT_SEAL}) records"
    )
    assert "--force" in refused.value.hint
    assert not (run / "merged-checkpoint-12").exists()


def test_a_checkpoint_merges_into_the_base_its_run_recorded(run, tiny_llama):
    out = run_merge(run / "checkpoints" / "checkpoint-12", verify=False, log=lambda _: None)
    merged = record(out)
    assert merged["base_model"]["path"] == str(tiny_llama)  # from run.json, not adapter_config.json
    assert merged["base_model"]["fingerprint_check"] == "match"


def test_an_unsealed_checkpoint_is_refused_unless_forced(run):
    checkpoint = run / "checkpoints" / "checkpoint-12"
    (checkpoint / CHECKPOINT_SEAL).unlink()  # killed while saving: the seal is written last
    with pytest.raises(LoratoolError) as refused:
        run_merge(checkpoint, verify=False, log=lambda _: None)
    assert refused.value.message == f"the checkpoint {checkpoint} is incomplete (interrupted while saving)"
    assert refused.value.hint == (
        f"merge {run / 'checkpoints' / 'checkpoint-6'} (the newest complete checkpoint), or pass --force to "
        "merge this one anyway"
    )
    said: list[str] = []
    out = run_merge(checkpoint, verify=False, force=True, log=said.append)
    assert (
        f"warning: the checkpoint {checkpoint} is incomplete (interrupted while saving); merging it "
        in said[0]
    )
    assert (out / "merge.json").is_file()


def test_combining_refuses_an_unsealed_checkpoint_too(run):
    from loratool.merge.combine import run_combine

    checkpoint = run / "checkpoints" / "checkpoint-12"
    (checkpoint / CHECKPOINT_SEAL).unlink()
    with pytest.raises(LoratoolError, match="is incomplete \\(interrupted while saving\\)"):
        run_combine([run / "checkpoints" / "checkpoint-6", checkpoint], log=lambda _: None)
    assert not list((run / "checkpoints").glob("combined-*"))


def test_a_rerun_after_a_killed_merge_removes_its_partial_directory(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    output = tmp_path / "merged"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    left = tmp_path / "merged.partial-k7x2q9z0"  # what the killed merge was writing
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half a shard")
    holder = {"pid": int(dead.stdout), "host": "h", "command": "loratool merge", "started": "earlier"}
    lock_path(output).write_text(json.dumps({**holder, "partials": [left.name]}))
    notes = tmp_path / "merged.notes.txt"  # the user's, next to it
    notes.write_text("mine")

    said: list[str] = []
    out = run_merge(adapter, base=str(tiny_llama), output=output, verify=False, log=said.append)
    assert out == output and (output / "merge.json").is_file()
    assert not left.exists() and notes.read_text() == "mine"
    assert f"note: removed what that command left unfinished: {left.name}/" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged", "merged.notes.txt"]
