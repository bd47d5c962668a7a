"""A `loratool train` process that cannot use bitsandbytes never imports it (its import costs ~1.6 s of
start-up: it wraps its CPU kernels in torch.compile), and still trains; one that may use it keeps it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import smoke_recipe, write_recipe

REPO = Path(__file__).resolve().parents[3]


def train_process(recipe: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -X importtime -m loratool train RECIPE`: the result and every module the process imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loratool", "train", str(recipe)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=600,
    )  # fmt: skip
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    return result, imported


def test_a_plain_lora_run_trains_without_importing_bitsandbytes(tiny_llama, smoke_data, tmp_path):
    out = tmp_path / "out"
    recipe = smoke_recipe(tiny_llama, smoke_data, out, training={"max_steps": 2, "save_steps": 2})
    result, imported = train_process(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "adapter_model.safetensors").is_file()
    assert "peft" in imported  # the adapter was built ...
    assert not [name for name in imported if name.startswith("bitsandbytes.")]  # ... without bitsandbytes
    # run.json and the log say which memory savers the run installed, and why one is off (a 64-wide model)
    savers = json.loads((out / "run.json").read_text())["memory_savers"]
    why = "hidden size 64 < 256: PEFT's dropout measured faster"
    assert savers == {"mask_dropout": False, "loss_positions": True, "cpu_vocab_tiles": True,
                      "cheap_recompute": True, "off": {"mask_dropout": why}}  # fmt: skip
    assert f"memory savers: loss_positions, cpu_vocab_tiles, cheap_recompute, mask_dropout off ({why})" in (
        result.stdout
    )


def test_a_run_whose_optimizer_is_from_bitsandbytes_keeps_it(tiny_llama, smoke_data, tmp_path):
    recipe = smoke_recipe(
        tiny_llama, smoke_data, tmp_path / "out", training={"optim": "adamw_8bit", "max_steps": 1}
    )
    result, imported = train_process(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path)
    # Whether bitsandbytes' 8-bit AdamW then runs on this CPU is its own business; it must have been importable.
    assert [name for name in imported if name.startswith("bitsandbytes.")], result.stderr[-2000:]
