"""`loratool export` and `loratool merge` stopped by SIGTERM (a scheduler's kill) or SIGINT (Ctrl-C) as
`train` is: one line saying so, exit code 130, the lock released, the partial output removed, nothing that
looks finished — through the real CLI in a subprocess, on tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from conftest import random_adapter as peft_adapter
from helpers.export import copy_model

# `python -m loratool ...`, with one step of the command (`module.function`) made to wait, after it has
# written its part into the partial directory, until the signal comes: the signal then always lands
# mid-command, however fast the tiny model is.
STOPPED_MIDWAY = """
import importlib, os, runpy, signal, sys, time
# Ctrl-C as in a terminal, even when the test runs where SIGINT is ignored (a shell's background job)
signal.signal(signal.SIGINT, signal.default_int_handler)
module, function = sys.argv.pop(1).rsplit(".", 1)
module = importlib.import_module(module)
step = getattr(module, function)

def step_then_wait(*args, **kwargs):
    step(*args, **kwargs)
    open(os.environ["STEP_DONE_FILE"], "w").close()  # a file, not a line: progress output has no newlines
    time.sleep(600)

setattr(module, function, step_then_wait)
sys.argv[0] = "loratool"
runpy.run_module("loratool", run_name="__main__")
"""
WAIT_S = 240  # at most, for the command to reach the step (it loads torch and the model first)


def stop_midway(step: str, signum: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `loratool ARGS`, send `signum` once `step` has run, and return the finished process."""
    marker = cwd / "step-done.marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPED_MIDWAY, step, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "STEP_DONE_FILE": str(marker)},
    )
    deadline = time.monotonic() + WAIT_S
    try:
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                stdout, stderr = proc.communicate()
                pytest.fail(f"{step} was not reached; the command printed:\n{stdout}{stderr}")
            time.sleep(0.1)
        marker.unlink()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def assert_stopped_cleanly(stopped: subprocess.CompletedProcess, folder: Path, kept: list[str]) -> None:
    assert stopped.returncode == 130, stopped.stderr
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: interrupted; nothing that looks finished was written"], stopped.stderr
    assert "Traceback" not in stopped.stderr
    # No lock file, no partial directory, no output: only what was there before.
    assert sorted(p.name for p in folder.iterdir()) == kept


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_export_stopped_by_a_signal_leaves_nothing(tmp_path, tiny_model_factory, signum):
    source = copy_model(tiny_model_factory("qwen2"), tmp_path / "model")
    stopped = stop_midway(
        "loratool.export.run.export_gguf", signum, ["export", str(source), "--no-verify"], tmp_path
    )
    assert_stopped_cleanly(stopped, tmp_path, ["model"])


def test_merge_stopped_by_sigterm_leaves_nothing(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    output = tmp_path / "merged"
    args = ["merge", "--adapter", str(adapter), "--base", str(tiny_llama), "--output", str(output)]
    stopped = stop_midway(
        "loratool.merge.run.write_weights", signal.SIGTERM, [*args, "--no-verify"], tmp_path
    )
    assert_stopped_cleanly(stopped, tmp_path, ["adapter"])
