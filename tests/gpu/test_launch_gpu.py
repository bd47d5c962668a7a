"""The launch files' GPU part (marked `gpu`, skipped without a CUDA GPU): the torchrun script `loratool
launch --target torchrun` writes, run as written on one machine with its GPU, trains one run on CUDA with
the process count the file asks for. The CPU tiers run the same files with CPU processes only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from loratool.cli import app

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_the_torchrun_launch_file_trains_on_the_gpu(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the file names the recipe as given: relative to here
    body = smoke_recipe(tiny_llama, REPO / "recipes" / "data" / "smoke.jsonl", "out/launched")
    write_recipe(tmp_path / "tiny.yaml", body)
    written = CliRunner().invoke(
        app, ["launch", "tiny.yaml", "--target", "torchrun", "--gpus-per-node", "1", "-o", "train.sh"]
    )
    assert written.exit_code == 0, written.output
    env = {**os.environ, "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    done = subprocess.run(
        ["bash", "train.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "launched" / "run.json").read_text())
    assert record["status"] == "complete" and record["world_size"] == 1
    assert record["hardware"]["device"] == "cuda"
    assert (tmp_path / "out" / "launched" / "adapter_model.safetensors").is_file()
