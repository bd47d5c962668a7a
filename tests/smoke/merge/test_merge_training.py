"""`loratool merge` of trained runs: logits equal base + adapter, bfloat16 output, QLoRA policies,
a mismatched base — through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from helpers.merge import merge_cli, merged_weights, record
from loratool.cli import app
from loratool.model.fingerprint import weights_fingerprint


def train_cli(tmp: Path, base: Path, data_path: Path, **sections) -> Path:
    out = tmp / "run"
    recipe = smoke_recipe(base, data_path, out, **sections)
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama) -> Path:
    """A short real `loratool train` run, with held-out validation rows."""
    tmp = tmp_path_factory.mktemp("lora-run")
    data = REPO / "recipes" / "data" / "smoke.jsonl"
    return train_cli(
        tmp,
        tiny_llama,
        data,
        data={"train": [{"path": str(data), "format": "alpaca"}], "validation": 0.05, "max_length": 64},
        training={"max_steps": 6, "save_steps": 6, "learning_rate": 1e-2},
    )


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_llama) -> Path:
    tmp = tmp_path_factory.mktemp("qlora-run")
    return train_cli(
        tmp,
        tiny_llama,
        REPO / "recipes" / "data" / "smoke.jsonl",
        quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        training={"max_steps": 6, "save_steps": 6, "learning_rate": 1e-2},
    )


# --- a real run through the CLI ------------------------------------------------------------------------


@pytest.mark.quick
def test_merge_cli_on_a_training_run(tmp_path, lora_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = merge_cli("--adapter", lora_run, "--output", out)
    assert result.exit_code == 0, result.output
    assert "held-out validation rows" in result.output and "greedy agreement 100.0%" in result.output
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "merge.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    assert not list(tmp_path.glob("merged.partial-*"))

    manifest = record(out)
    assert manifest["status"] == "complete" and manifest["dtype"] == "float32" and manifest["qlora"] is None
    assert manifest["base_model"]["fingerprint"] == weights_fingerprint(tiny_llama)
    assert manifest["base_model"]["fingerprint_check"] == "match"
    check = manifest["verification"]["full_precision_base"]
    assert check["passed"] and check["max_abs_logit_diff"] < 1e-4 and check["greedy_agreement"] == 1.0
    assert manifest["tensors"]["merged"] == 14  # 7 linear layers x 2 blocks

    # The merged model alone reproduces base + adapter.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(lora_run).chat_template
    ids = tokenizer("Spell the word backwards: falcon", return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), lora_run)
    torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(tiny_llama), ids)
    assert (logits(merged, ids) - base_logits).abs().max() > 1e-2  # the adapter did something

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_bfloat16_output_is_checked_with_rounding_thresholds(tmp_path, lora_run):
    out = tmp_path / "merged-bf16"
    result = merge_cli("--adapter", lora_run, "--output", out, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in merged_weights(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    check = record(out)["verification"]["full_precision_base"]
    assert check["passed"] and check["thresholds"]["max_abs_logit_diff"] is None
    assert 0 < check["max_abs_logit_diff"] < 0.5


# --- QLoRA ---------------------------------------------------------------------------------------------


def test_qlora_round_trip_is_what_linear4bit_holds(qlora_run, tiny_llama):
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loratool.merge import quantized_base, read_training_run
    from loratool.merge.qlora import as_trained

    quant = quantized_base(read_training_run(qlora_run), tiny_llama, "float32")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=config, device_map={"": "cpu"}
    )
    four_bit = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(quant.weights) == set(four_bit) and len(four_bit) == 14  # targeted or not; lm_head stays
    original = load_file(tiny_llama / "model.safetensors")
    for name, module in four_bit.items():
        assert torch.equal(as_trained(original[name], name, quant), dequantize_module_weight(module)), name
    assert torch.equal(
        as_trained(original["lm_head.weight"], "lm_head.weight", quant), original["lm_head.weight"]
    )


def test_qlora_policies(tmp_path, qlora_run, any_cpu):
    dequantized, original = tmp_path / "dequantized", tmp_path / "original"
    first = merge_cli("--adapter", qlora_run, "--output", dequantized)  # the default policy
    second = merge_cli("--adapter", qlora_run, "--output", original, "--qlora-base", "original")
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output

    d, o = record(dequantized), record(original)
    assert d["qlora"]["base_policy"] == "dequantized" and o["qlora"]["base_policy"] == "original"
    assert d["qlora"]["quant_type"] == "nf4" and d["qlora"]["double_quant"] and d["qlora"]["blocksize"] == 64
    assert d["qlora"]["trained_on"] == "4bit" and d["qlora"]["quantized_on"] == "cpu"
    # Against the 4-bit base + adapter the run trained: the dequantized merge is that model; the original
    # merge lacks the quantization error the adapter learned around.
    as_trained_d = d["verification"]["quantized_base"]
    as_trained_o = o["verification"]["quantized_base"]
    assert as_trained_d["passed"] and as_trained_d["max_abs_logit_diff"] < 1e-3
    # On every CPU, CPUs with AVX512-BF16 included (loratool/model/bnb_cpu.py).
    assert as_trained_d["four_bit_matmul"] == "dequantize-then-matmul in float32 (cpu)"
    assert as_trained_o["max_abs_logit_diff"] > 100 * as_trained_d["max_abs_logit_diff"]
    assert as_trained_o["mean_kl"] > 100 * max(as_trained_d["mean_kl"], 1e-9)
    # The original merge is still exactly base + adapter on the full-precision base.
    assert o["verification"]["full_precision_base"]["max_abs_logit_diff"] < 1e-3
    assert "full_precision_base" not in d["verification"]


def test_qlora_verification_fails_on_the_bfloat16_kernel(
    tmp_path, qlora_run, simulated_avx512bf16, monkeypatch
):
    """What the test above meets on an AVX512-BF16 CPU without loratool/model/bnb_cpu.py: the 4-bit reference
    computes in bfloat16 and the merge fails verification (measured 4.0e-2 here; 3.7e-2 on a real EPYC)."""
    import loratool.merge.verify

    monkeypatch.setattr(
        loratool.merge.verify, "use_exact_4bit_matmul", lambda model: 0
    )  # where verify uses it
    result = merge_cli("--adapter", qlora_run, "--output", tmp_path / "m")
    assert result.exit_code == 1 and "error: verification failed" in result.output
    failed = record(tmp_path / "m.failed-verification")["verification"]["quantized_base"]
    assert failed["max_abs_logit_diff"] > 1e-2
    assert (
        failed["four_bit_matmul"] == "fused AVX512-BF16 kernel in eval mode (bfloat16)"
    )  # the record says so


def test_qlora_base_dequantized_refused_for_a_full_precision_run(tmp_path, lora_run):
    result = merge_cli("--adapter", lora_run, "--output", tmp_path / "m", "--qlora-base", "dequantized")
    assert result.exit_code == 1
    assert "trained on a full-precision base" in result.output


# --- the base ------------------------------------------------------------------------------------------


def test_mismatched_base_is_refused_unless_forced(tmp_path, lora_run, tiny_model_factory, tiny_llama):
    other = tiny_model_factory("llama", seed=1)
    refused = merge_cli("--adapter", lora_run, "--base", other, "--output", tmp_path / "m")
    assert refused.exit_code == 1
    first = refused.output.splitlines()[0]
    assert first.startswith("error: the base model is not the one this adapter was trained on")
    assert str(tiny_llama) in first and str(other) in first
    assert weights_fingerprint(tiny_llama)[:31] in first and weights_fingerprint(other)[:31] in first
    assert "--force" in refused.output and not (tmp_path / "m").exists()

    forced = merge_cli("--adapter", lora_run, "--base", other, "--output", tmp_path / "m", "--force")
    assert forced.exit_code == 0, forced.output
    assert "warning: the base model is not the one" in forced.output
    assert record(tmp_path / "m")["base_model"]["fingerprint_check"] == "mismatch, merged with --force"
