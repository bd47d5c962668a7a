"""Runs you can trust: a run killed with SIGKILL resumes to the uninterrupted result."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import REPO
from helpers.run_trust import adapter_weights, metric_steps, train, whole_and_parts
from loratool.rundir.records import CHECKPOINT_SEAL, read_run


@pytest.mark.slow
def test_kill_dash_nine_then_resume_equals_uninterrupted(tmp_path, tiny_llama, smoke_data):
    """A real SIGKILL in the middle of training (after a checkpoint), then --resume."""
    parts = whole_and_parts(tmp_path, tiny_llama, smoke_data, max_steps=60, save_steps=5, logging_steps=1)
    proc = subprocess.Popen([sys.executable, "-m", "loratool", "train", str(parts)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint_seal = tmp_path / "parts" / "checkpoints" / "checkpoint-10" / CHECKPOINT_SEAL
    deadline = time.monotonic() + 300
    while not checkpoint_seal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert checkpoint_seal.exists(), "training ended before its 10th step was checkpointed"
    assert read_run(tmp_path / "parts").status == "running"
    resumed = train(parts, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "parts")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert metric_steps(tmp_path / "parts") == list(range(1, 61))
