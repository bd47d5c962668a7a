"""A checkpoint counts for --resume only when sealed and unchanged since: every file the seal lists must be
there with its size, and the small ones with their content."""

from __future__ import annotations

import json
from pathlib import Path

from loratool.rundir.records import CHECKPOINT_SEAL, RunDir, checkpoint_files, checkpoint_problem


def sealed_checkpoint(checkpoints: Path, step: int, *, big: int = 0) -> Path:
    folder = checkpoints / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * (big or 64))
    seal = {"global_step": step, "files": checkpoint_files(folder)}
    (folder / CHECKPOINT_SEAL).write_text(json.dumps(seal))
    return folder


def test_a_sealed_unchanged_checkpoint_is_resumable(tmp_path):
    folder = sealed_checkpoint(tmp_path / "checkpoints", 4)
    assert checkpoint_problem(folder) is None
    listed = json.loads((folder / CHECKPOINT_SEAL).read_text())["files"]
    assert set(listed) == {"trainer_state.json", "adapter_model.safetensors"}
    assert all("sha256" in entry for entry in listed.values())  # small files are hashed


def test_missing_resized_or_edited_files_make_it_damaged(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    missing = sealed_checkpoint(checkpoints, 2)
    (missing / "trainer_state.json").unlink()
    assert checkpoint_problem(missing) == "damaged since it was saved (trainer_state.json is missing)"
    resized = sealed_checkpoint(checkpoints, 4)
    (resized / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert "adapter_model.safetensors is 10 bytes, was 64" in checkpoint_problem(resized)
    edited = sealed_checkpoint(checkpoints, 6)
    (edited / "trainer_state.json").write_text(json.dumps({"global_step": 7}))  # same size, other bytes
    assert checkpoint_problem(edited) == "damaged since it was saved (trainer_state.json changed)"


def test_large_files_are_checked_by_size_only(tmp_path):
    folder = sealed_checkpoint(tmp_path / "checkpoints", 2, big=(1 << 20) + 1)
    entry = json.loads((folder / CHECKPOINT_SEAL).read_text())["files"]["adapter_model.safetensors"]
    assert entry == {"size": (1 << 20) + 1}


def test_resume_point_skips_damaged_and_unsealed_checkpoints_for_the_previous_good_one(tmp_path):
    run = RunDir(tmp_path)
    sealed_checkpoint(run.checkpoints, 2)
    damaged = sealed_checkpoint(run.checkpoints, 4)
    (damaged / "trainer_state.json").unlink()
    unsealed = run.checkpoints / "checkpoint-6"
    unsealed.mkdir()
    latest, skipped = run.latest_checkpoint()
    assert latest is not None and latest.name == "checkpoint-2"
    assert [p.name for p in skipped] == ["checkpoint-6", "checkpoint-4"]
    assert checkpoint_problem(unsealed) == "incomplete (interrupted while saving)"


def test_a_seal_without_a_file_list_still_counts(tmp_path):
    """Checkpoints sealed by an earlier loratool (no "files") stay resumable."""
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / CHECKPOINT_SEAL).write_text(json.dumps({"global_step": 3}))
    assert checkpoint_problem(folder) is None
