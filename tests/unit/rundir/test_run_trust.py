"""Runs you can trust, without training: a forged file list cannot reach outside the run, and
output locks are exclusive and taken over from dead processes."""

from __future__ import annotations

import json
import os

import pytest

from helpers.run_trust import hold_lock_in_another_process
from loratool.errors import LoratoolError
from loratool.rundir.outputs import lock_path, output_lock


def test_a_forged_file_list_cannot_reach_outside_the_run(tmp_path):
    from loratool.rundir.outputs import remove_owned

    outside = tmp_path / "precious.txt"
    outside.write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    record = {
        "loratool_output": {"kind": "run", "format": 1},
        "files": ["../precious.txt", "/etc", "run.json"],
    }
    (run / "run.json").write_text(json.dumps(record))
    remove_owned(run, "run.json", "run", lambda _: None)
    assert outside.read_text() == "x"


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock_in_another_process(out)
    holder.kill()  # like kill -9: the lock file stays, naming a process that is gone
    holder.wait()
    assert lock_path(out).is_file()
    said: list[str] = []
    with output_lock(out, "loratool merge", said.append):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert said and "took over the lock" in said[0] and str(holder.pid) in said[0]
    assert not lock_path(out).exists()


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with output_lock(tmp_path / "o", "a", lambda _: None):
        with pytest.raises(LoratoolError, match="being written by another loratool process"):
            with output_lock(tmp_path / "o", "b", lambda _: None):
                pass
