"""Failures of the user's environment found before any work, each with what, where and what to do: a launch
that started one process instead of several, an output that cannot be written, a file-size limit."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from loratool.errors import LoratoolError
from loratool.rundir.outputs import check_writable
from loratool.rundir.records import RunDir, is_disk_full, is_file_too_large
from loratool.train.failures import as_training_error
from loratool.train.processes import check_launch


def test_accelerate_launching_one_process_for_several_is_refused():
    # What `accelerate launch --cpu --num_processes 2` without a config leaves in the environment.
    with pytest.raises(LoratoolError) as caught:
        check_launch({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert "started ONE process" in caught.value.message
    assert "configs/accelerate/ddp.yaml" in caught.value.hint and "torchrun" in caught.value.hint


@pytest.mark.parametrize(
    "env",
    [
        {},  # plain `loratool train`
        {"ACCELERATE_USE_CPU": "True"},  # accelerate launch with one process
        {
            "ACCELERATE_USE_CPU": "True",
            "MASTER_ADDR": "127.0.0.1",
            "WORLD_SIZE": "2",
            "RANK": "0",
        },  # ddp.yaml
        {"MASTER_ADDR": "10.0.0.1", "WORLD_SIZE": "4"},  # torchrun
    ],
)
def test_real_launches_pass(env):
    check_launch(env)


def test_an_output_name_longer_than_file_systems_allow_is_refused(tmp_path):
    with pytest.raises(LoratoolError, match="is 300 bytes long; file systems allow 255"):
        check_writable(tmp_path / ("x" * 300), "training.output_dir")
    with pytest.raises(LoratoolError, match="training.output_dir"):
        RunDir.prepare(tmp_path / ("y" * 300) / "run", dry_run=True)


def test_an_output_on_a_read_only_file_system_is_refused(tmp_path, monkeypatch):
    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    with pytest.raises(LoratoolError) as caught:
        RunDir.prepare(tmp_path / "new" / "run", dry_run=True)
    assert f"{tmp_path} is on a read-only file system" in caught.value.message
    assert not (tmp_path / "new").exists()


def test_an_unwritable_parent_is_refused(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode)
    )
    with pytest.raises(LoratoolError, match="is not writable by this user"):
        check_writable(tmp_path / "out", "--output")


def test_a_file_size_limit_is_a_user_error_naming_the_file(tmp_path):
    run = RunDir(tmp_path)
    error = OSError(errno.EFBIG, "File too large", str(tmp_path / "checkpoints/checkpoint-4/optimizer.pt"))
    assert is_file_too_large(error) and not is_disk_full(error)
    assert is_file_too_large(
        RuntimeError(
            "[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: File too large"
        )
    )
    shown = as_training_error(error, run)
    assert isinstance(shown, LoratoolError) and shown.exit_code == 1
    assert "a file-size limit stopped the writing of" in shown.message and "optimizer.pt" in shown.message
    assert "ulimit -f" in shown.hint


def test_a_file_size_limit_removes_the_half_written_checkpoint(tmp_path):
    from loratool.rundir.records import RunRecord

    run = RunDir(tmp_path)
    half = run.checkpoints / "checkpoint-4"
    half.mkdir(parents=True)
    (half / "optimizer.pt").write_bytes(b"partial")
    run.start({}, RunRecord(path=tmp_path, status="running"))
    run.fail(RunRecord(path=tmp_path, status="running"), OSError(errno.EFBIG, "File too large"))
    assert not half.exists()
    assert run.removed_incomplete == ["checkpoint-4"]
