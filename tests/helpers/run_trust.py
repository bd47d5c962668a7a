"""What the run-trust tests of several tiers share: the train call, recipes, adapter weights,
metric steps, a lock held by another process, and a run trained whole and in parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from loratool.cli import app


def train(recipe_path: Path, *args: str):
    return CliRunner().invoke(app, ["train", str(recipe_path), *args])


def make_recipe(tmp_path: Path, tiny_llama: Path, smoke_data: Path, name: str = "r.yaml", **sections) -> Path:
    recipe = smoke_recipe(tiny_llama, smoke_data, tmp_path / "out", **sections)
    return write_recipe(tmp_path / name, recipe)


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter_model.safetensors")


def metric_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


# --- 2. one writer per output ---------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from pathlib import Path
from loratool.rundir.outputs import output_lock
with output_lock(Path(sys.argv[1]), "loratool train other.yaml"):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock_in_another_process(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def whole_and_parts(tmp_path: Path, tiny_llama: Path, smoke_data: Path, **training) -> Path:
    """Train `whole` uninterrupted; return the recipe of `parts`, the same run in another directory."""
    settings = {"training": training}
    whole = write_recipe(
        tmp_path / "whole.yaml", smoke_recipe(tiny_llama, smoke_data, tmp_path / "whole", **settings)
    )
    assert train(whole).exit_code == 0
    return write_recipe(
        tmp_path / "parts.yaml", smoke_recipe(tiny_llama, smoke_data, tmp_path / "parts", **settings)
    )
