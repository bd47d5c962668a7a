"""What only a CUDA GPU can show (marked `gpu`, skipped without one). Run on a GPU machine with
`pytest -m gpu tests/gpu` (see scripts/bench_gpu.py for the wheels it needs); none of these has run on a
GPU yet."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from loratool.cli import app

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMOKE = REPO / "recipes" / "data" / "smoke.jsonl"


def train(recipe: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["train", str(recipe), *extra])
    assert result.exit_code == 0, result.output


def gpu_recipe(tmp_path: Path, base: Path, name: str, **sections) -> Path:
    body = smoke_recipe(base, SMOKE, tmp_path / name, **sections)
    return write_recipe(tmp_path / f"{name}.yaml", body)


@pytest.mark.gpu
@cuda
def test_bf16_lora_train_merge_verify(tmp_path, tiny_llama):
    recipe = gpu_recipe(tmp_path, tiny_llama, "bf16", model={"dtype": "bfloat16"})
    train(recipe)
    run = tmp_path / "bf16"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["hardware"]["device"] == "cuda" and manifest["train"]["bf16"] is True
    result = CliRunner().invoke(app, ["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output  # merge verifies base + adapter against the merged model
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["verification"]


@pytest.mark.gpu
@cuda
def test_qlora_on_cuda_then_dequantized_merge_on_cpu_is_bit_identical(tmp_path, tiny_llama):
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loratool.merge import quantized_base
    from loratool.merge.qlora import as_trained
    from loratool.rundir.records import read_training_run

    recipe = gpu_recipe(tmp_path, tiny_llama, "qlora", quantization={"load_in_4bit": True})
    train(recipe)
    run = tmp_path / "qlora"
    quant = quantized_base(read_training_run(run), tiny_llama, "float32")
    # The merge's round trip, forced onto the CPU as on a machine without a GPU.
    cpu_quant = dataclasses.replace(quant, device="cpu")
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config, device_map={"": 0})
    original = load_file(tiny_llama / "model.safetensors")
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            on_cuda = dequantize_module_weight(module).cpu()
            assert torch.equal(
                as_trained(original[f"{name}.weight"], f"{name}.weight", cpu_quant), on_cuda
            ), name
    merged = tmp_path / "merged"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "loratool", "merge", "--adapter", str(run), "--output", str(merged),
         "--qlora-base", "dequantized"],
        env=env, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.gpu
@cuda
def test_paged_adamw_8bit_trains(tmp_path, tiny_llama):
    recipe = gpu_recipe(
        tmp_path,
        tiny_llama,
        "paged",
        quantization={"load_in_4bit": True},
        training={"optim": "paged_adamw_8bit"},
    )
    train(recipe)
    rows = [json.loads(x) for x in (tmp_path / "paged" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], [r["loss"] for r in rows if "loss" in r][-1]
    assert last < first


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_padding_free_batches_give_the_padded_loss(tiny_llama, attn):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.bfloat16, attn_implementation=attn, device_map={"": 0}
    )
    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 400, (n,)).tolist()} for n in (17, 40, 9, 31)]
    for row in rows:
        row["labels"] = [-100] * 3 + row["input_ids"][3:]
    losses = {}
    for padding_free in (False, True):
        collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
        batch = {k: v.to("cuda") for k, v in collate(rows).items()}
        with torch.no_grad():
            losses[padding_free] = model(**batch).loss.item()
    assert losses[True] == pytest.approx(losses[False], abs=2e-2)  # bf16 sums in another order


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_fsdp_saves_the_whole_adapter(tmp_path, tiny_llama, qlora):
    sections = {"model": {"dtype": "bfloat16"}}
    if qlora:
        sections["quantization"] = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"}
    recipe = gpu_recipe(tmp_path, tiny_llama, "fsdp", **sections)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "-m", "loratool", "train", str(recipe)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    adapter = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert all(t.shape[0] * t.shape[1] > 0 for t in adapter.values())
    assert any(t.shape == (8, 64) for t in adapter.values())  # lora_A of a 64-wide layer: whole, not a shard
