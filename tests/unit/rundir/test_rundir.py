"""The run directory refuses to lose work and never looks finished before it is."""

from __future__ import annotations

import json

import pytest

from loratool.errors import LoratoolError
from loratool.rundir.records import CHECKPOINT_SEAL, RunDir, RunRecord, read_run


def record(path, **fields):
    """The run record train would be writing (status set by RunDir)."""
    return RunRecord(path=path, status="running", stage="sft", **fields)


def finished_run(path):
    run = RunDir.prepare(path)
    run.start({"a": 1}, record(run.path, tokenizer_sha256="x1"))

    def outputs(folder):
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_text("w")
        (folder / "tokenizer.json").write_text("{}")

    seal(run.checkpoints / "checkpoint-4")
    run.finish(outputs, record(run.path, tokenizer_sha256="x1"))
    return run


def seal(checkpoint):
    """A checkpoint as the trainer leaves it once complete (checkpoints.py writes the seal last)."""
    checkpoint.mkdir(parents=True)
    (checkpoint / CHECKPOINT_SEAL).write_text("{}")


def test_new_and_finished_states(tmp_path):
    run = RunDir(tmp_path / "out")
    assert run.state() == "new"
    finished_run(tmp_path / "out")
    assert run.state() == "finished"
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["tokenizer_sha256"] == "x1"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoints",
        "recipe.yaml",
        "run.json",
        "tokenizer.json",
    ]
    record = read_run(tmp_path / "out")
    assert record is not None and record.complete
    assert manifest["loratool_output"] == {"kind": "run", "format": 1}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml"} <= set(
        manifest["files"]
    )


def test_finished_run_is_refused_unless_overwrite_or_resume(tmp_path):
    finished_run(tmp_path / "out")
    with pytest.raises(LoratoolError) as info:
        RunDir.prepare(tmp_path / "out")
    assert "already holds a finished run" in info.value.message
    assert "--overwrite" in info.value.hint and "--resume" in info.value.hint
    RunDir.prepare(tmp_path / "out", dry_run=True, overwrite=True)
    assert (tmp_path / "out" / "adapter_config.json").exists()  # a dry run changes nothing
    resumed = RunDir.prepare(tmp_path / "out", resume=True)
    assert resumed.latest_checkpoint()[0].name == "checkpoint-4"
    finished_run_again = RunDir.prepare(tmp_path / "out", overwrite=True)
    assert finished_run_again.state() == "new"


def test_crash_while_writing_outputs_leaves_nothing_that_looks_finished(tmp_path):
    run = RunDir.prepare(tmp_path / "out")
    run.start({}, record(run.path))

    def crashing(folder):
        (folder / "adapter_model.safetensors").write_text("w")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run.finish(crashing, record(run.path))
    run.fail(record(run.path), RuntimeError("disk full"))
    assert not (run.path / "adapter_model.safetensors").exists()
    assert not (run.path / "adapter_config.json").exists()
    assert json.loads((run.path / "run.json").read_text())["status"] == "failed"
    assert run.state() == "unfinished"
    with pytest.raises(LoratoolError) as info:
        RunDir.prepare(run.path)
    assert "holds a run that did not finish" in info.value.message


def test_unfinished_run_hint_names_the_checkpoint(tmp_path):
    run = RunDir.prepare(tmp_path / "out")
    run.start({}, record(run.path))
    seal(run.checkpoints / "checkpoint-2")
    seal(run.checkpoints / "checkpoint-10")
    (run.checkpoints / "checkpoint-12").mkdir(parents=True)  # incomplete: never offered
    with pytest.raises(LoratoolError) as info:
        RunDir.prepare(run.path)
    assert "--resume to continue from checkpoint-10" in info.value.hint


def test_foreign_directory_is_never_touched(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for kwargs in ({}, {"overwrite": True}):
        with pytest.raises(LoratoolError, match="not empty and is not a loratool run directory"):
            RunDir.prepare(tmp_path / "mine", **kwargs)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_resume_without_checkpoint_and_contradicting_flags(tmp_path):
    with pytest.raises(LoratoolError, match="no complete checkpoint to resume from"):
        RunDir.prepare(tmp_path / "new", resume=True)
    with pytest.raises(LoratoolError, match="contradict"):
        RunDir.prepare(tmp_path / "new", resume=True, overwrite=True)
