"""Training options beyond the defaults: architectures, LoRA+, checkpointing, 8-bit, early
stopping, DoRA."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from loratool.cli import app


def train(tmp_path, base, data_path, **sections):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", str(write_recipe(tmp_path / "r.yaml", smoke_recipe(base, data_path, out, **sections)))]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "run.json").read_text())
    losses = [
        json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    return out, manifest, losses


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_train(tmp_path, tiny_model_factory, smoke_data, arch):
    out, manifest, losses = train(tmp_path, tiny_model_factory(arch), smoke_data, training={"max_steps": 6})
    assert manifest["status"] == "complete" and manifest["train"]["global_step"] == 6
    assert losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    leaves = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_loraplus_and_gradient_checkpointing_train_end_to_end(tmp_path, tiny_llama, smoke_data):
    _, manifest, losses = train(
        tmp_path,
        tiny_llama,
        smoke_data,
        lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "loraplus_lr_ratio": 4},
        training={"max_steps": 6, "gradient_checkpointing": True, "learning_rate": 2e-3},
    )
    assert manifest["train"]["global_step"] == 6 and losses[-1] < losses[0]


def test_qlora_with_gradient_checkpointing(tmp_path, tiny_llama, smoke_data):
    _, manifest, losses = train(
        tmp_path,
        tiny_llama,
        smoke_data,
        quantization={"load_in_4bit": True},
        training={"max_steps": 6, "gradient_checkpointing": True},
    )
    assert manifest["base_model"]["quantization"] == "4bit" and losses[-1] < losses[0]


def test_8bit_base_trains(tmp_path, tiny_llama, smoke_data):
    _, manifest, losses = train(
        tmp_path, tiny_llama, smoke_data, quantization={"load_in_8bit": True}, training={"max_steps": 6}
    )
    assert manifest["base_model"]["quantization"] == "8bit" and losses[-1] < losses[0]


@pytest.mark.quick
def test_dora_and_rslora(tmp_path, tiny_llama, smoke_data):
    out, _, losses = train(
        tmp_path,
        tiny_llama,
        smoke_data,
        lora={
            "r": 8,
            "lora_alpha": 16,
            "use_dora": True,
            "use_rslora": True,
            "target_modules": ["q_proj", "v_proj"],
        },
        training={"max_steps": 4},
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["use_dora"]
        and config["use_rslora"]
        and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    )
    from safetensors.torch import load_file

    assert any("lora_magnitude_vector" in k for k in load_file(out / "adapter_model.safetensors"))


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tiny_llama, smoke_data):
    # A learning rate this high makes validation loss rise quickly, so patience 1 stops the run early.
    out, manifest, _ = train(
        tmp_path,
        tiny_llama,
        smoke_data,
        data={"train": [{"path": str(smoke_data), "format": "alpaca"}], "validation": 0.2, "max_length": 64},
        training={
            "max_steps": 60,
            "learning_rate": 0.5,
            "eval_steps": 2,
            "save_steps": 2,
            "early_stopping_patience": 1,
            "max_grad_norm": 0.0,
        },
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert manifest["train"]["global_step"] < 60  # stopped early
    best_step, best_loss = min(evals[:-1] if len(evals) > 2 else evals, key=lambda e: e[1])
    assert manifest["train"]["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert manifest["train"]["final_eval_loss"] == pytest.approx(best_loss, rel=1e-4)


def test_passthrough_training_field_reaches_the_trainer(tmp_path, tiny_llama, smoke_data, monkeypatch):
    import trl

    seen = {}

    class Spy(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            seen["neftune"] = kwargs["args"].neftune_noise_alpha
            seen["bf16"] = kwargs["args"].bf16
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trl, "SFTTrainer", Spy)
    train(tmp_path, tiny_llama, smoke_data, training={"max_steps": 1, "neftune_noise_alpha": 5.0})
    assert seen == {"neftune": 5.0, "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
