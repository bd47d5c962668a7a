"""QLoRA training with evaluations gives the same numbers on every CPU (loratool/model/bnb_cpu.py).

CPUs with AVX512-BF16 are simulated on any CPU (conftest.simulate_avx512bf16): bitsandbytes' own selection
code runs; only its CPU feature check says yes, and its fused kernel is a stand-in that rounds like it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import simulate_avx512bf16, smoke_recipe, write_recipe
from helpers.bnb_cpu import QLORA, SMOKE
from loratool.cli import app


def qlora_run_with_evaluations(tmp: Path, tiny_llama: Path) -> Path:
    tmp.mkdir()
    out = tmp / "run"
    recipe = smoke_recipe(
        tiny_llama,
        SMOKE,
        out,
        quantization=QLORA,
        data={"train": [{"path": str(SMOKE), "format": "alpaca"}], "validation": 0.05, "max_length": 64},
        training={
            "max_steps": 4,
            "eval_steps": 1,
            "save_steps": 4,
            "logging_steps": 1,
            "learning_rate": 1e-2,
        },
    )
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.quick
def test_qlora_training_with_evaluations_is_the_same_on_every_cpu(tmp_path, tiny_llama, monkeypatch):
    """The trainer evaluates in eval mode, which on an AVX512-BF16 CPU would hand every 4-bit layer to the
    fused kernel for the rest of the run (training steps included). With loratool it trains as anywhere."""
    import json

    here = qlora_run_with_evaluations(tmp_path / "this-cpu", tiny_llama)
    simulate_avx512bf16(monkeypatch)
    there = qlora_run_with_evaluations(tmp_path / "avx512bf16", tiny_llama)

    adapter, other = (load_file(run / "adapter_model.safetensors") for run in (here, there))
    assert adapter.keys() == other.keys()
    for name, tensor in adapter.items():
        assert torch.equal(tensor, other[name]), name
    losses = [json.loads((run / "run.json").read_text())["train"]["final_eval_loss"] for run in (here, there)]
    assert losses[0] == losses[1]
