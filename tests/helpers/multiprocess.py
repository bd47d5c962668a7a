"""What the multi-process tests of several tiers share: the shipped accelerate configs, the environment a
launched process gets, a free loopback port, and waiting for a launcher that must not hang the suite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from conftest import REPO

CONFIGS = REPO / "configs" / "accelerate"


def launch_env() -> dict[str, str]:
    """A launched process's environment: loratool from this checkout, one thread, no hub, no debug output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LORATOOL_DEBUG", None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finish_group(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for a launcher started in a session of its own; (its exit code, its stdout). Past `timeout` its
    whole process group is killed and the test fails: a hang fails instead of blocking the suite."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"{process.args[:4]}... did not finish in {timeout} s:\n{out}")
    return process.returncode, out
