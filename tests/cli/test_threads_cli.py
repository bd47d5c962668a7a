"""A loratool process started beside a busy core computes with the free cores only, says so on stderr
(stdout stays JSON for `--json`), and `plan` states what its time estimate assumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import smoke_recipe, write_recipe

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not shutil.which("taskset") or not Path("/proc/stat").exists(), reason="pins processes with taskset"
)


def plan_json(recipe: Path, core: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["taskset", "-c", str(core), sys.executable, "-m", "loratool", "plan", str(recipe), "--json"],
        capture_output=True, text=True, env=env, cwd=recipe.parent, timeout=300,
    )  # fmt: skip


def test_beside_a_busy_core_the_process_uses_the_free_ones(tiny_llama, smoke_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, smoke_data, tmp_path / "out"))
    core = sorted(os.sched_getaffinity(0))[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
        env.pop(name, None)
    spinner = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = plan_json(recipe, core, env)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy.returncode == 0, busy.stderr
    assert "CPU threads: 1 of 1 cores (other processes keep" in busy.stderr
    plan = json.loads(busy.stdout)  # the line went to stderr: stdout is the JSON alone
    assert any(a.startswith("1 CPU thread on 1 core, ") and "busy with other processes" in a
               for a in plan["assumptions"])  # fmt: skip

    env["OMP_NUM_THREADS"] = "1"  # the user's setting (or torchrun's): kept, and not repeated back
    told = plan_json(recipe, core, env)
    assert told.returncode == 0, told.stderr
    assert "CPU threads" not in told.stderr
