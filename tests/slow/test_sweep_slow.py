"""`loratool sweep`: the cells train in fresh processes.

The cells run in this process here (the sweep's `run_loratool` is replaced by the same command through the
CLI runner), so that a 2x2 grid on a tiny model stays fast; the real fresh-process path is the slow test at
the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from helpers.sweep import tiny_recipe
from loratool.rundir.records import read_run


@pytest.mark.slow
def test_cells_train_in_fresh_processes(tmp_path, tiny_llama, smoke_data):
    """The real path: `python -m loratool sweep`, each cell a `loratool train` process of its own."""
    recipe = tiny_recipe(tmp_path, tiny_llama, smoke_data)
    output = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "loratool", "sweep", str(recipe), "--output", str(output),
         "--vary", "lora.target_modules=[q_proj],[no_such_layer]"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "target_modules=no_such_layer: lora.target_modules: no_such_layer matches no layer" in result.stderr
    )
    record = json.loads((output / "sweep.json").read_text())
    run = read_run(output / "target_modules=q_proj")
    assert run is not None and run.complete
    assert record["cells"][0]["peak_memory_bytes"] == run.peak_memory_bytes["process_rss"]
    assert "step 2/2" in (output / "sweep.log").read_text()  # the cell's own output, kept
