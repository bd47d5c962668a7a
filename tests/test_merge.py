"""`loratool merge`: merged weights equal PEFT's merge_and_unload, logits equal base + adapter, QLoRA
policies, streaming over shards, and one clean error per user mistake — through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import LORATOOL_RUN, REPO, smoke_recipe, write_recipe
from conftest import random_adapter as peft_adapter
from loratool.cli import app
from loratool.merge import run_merge
from loratool.model.fingerprint import weights_fingerprint

# --- helpers -------------------------------------------------------------------------------------------


def merge_cli(*args: str | Path):
    return CliRunner().invoke(app, ["merge", *map(str, args)])


def train_cli(tmp: Path, base: Path, data_path: Path, **sections) -> Path:
    out = tmp / "run"
    recipe = smoke_recipe(base, data_path, out, **sections)
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return model.merge_and_unload().state_dict()


def merged_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)
    # Tied weights (GPT-2's lm_head) are in the state dict but not in the checkpoint.
    assert set(got) <= set(expected) and len(got) >= len(expected) - 1


def record(folder: Path) -> dict:
    return json.loads((folder / "merge.json").read_text())


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


# --- the arithmetic: same weights as PEFT --------------------------------------------------------------

VARIANTS = {
    "lora": {"target_modules": "all-linear"},
    "rslora": {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True},
    "dora": {"target_modules": ["q_proj", "v_proj", "up_proj"], "use_dora": True},
    "dora-embedding": {"target_modules": ["embed_tokens", "k_proj"], "use_dora": True},
    "embedding": {"target_modules": ["embed_tokens", "o_proj"]},
    "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "rank_and_alpha_pattern": {
        "target_modules": ["q_proj", "v_proj", "gate_proj"],
        "rank_pattern": {"v_proj": 2, "layers.1.mlp.gate_proj": 8},
        "alpha_pattern": {"layers.0.self_attn.q_proj": 3, "gate_proj": 32},
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merged_weights_equal_peft_merge_and_unload(tmp_path, tiny_llama, variant):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", task_type="CAUSAL_LM", **VARIANTS[variant])
    out = run_merge(
        adapter, base=str(tiny_llama), output=tmp_path / "merged", verify=False, log=lambda _: None
    )
    assert_same_weights(merged_weights(out), peft_merged(tiny_llama, adapter))


def test_lora_bias_is_merged_into_the_base_bias(tmp_path, tiny_model_factory):
    base = tiny_model_factory("qwen2")  # q/k/v projections have biases
    adapter = peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], lora_bias=True)
    out = run_merge(adapter, base=str(base), output=tmp_path / "merged", verify=False, log=lambda _: None)
    got, expected = merged_weights(out), peft_merged(base, adapter)
    assert_same_weights(got, expected)
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.bias"],
        load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.bias"],
    )


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 stores its projections as Conv1D (in, out): the fan_in_fan_out case."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from loratool.model.tiny import CHATML_TEMPLATE, build_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tokenizer = build_tokenizer(512)
    tokenizer.chat_template = CHATML_TEMPLATE
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fan_in_fan_out_gpt2_equals_peft(tmp_path, tiny_gpt2):
    adapter = peft_adapter(
        tiny_gpt2, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    out = run_merge(adapter, base=str(tiny_gpt2), output=tmp_path / "merged", log=lambda _: None)
    assert_same_weights(merged_weights(out), peft_merged(tiny_gpt2, adapter))
    assert record(out)["verification"]["passed"]


def test_sharded_base_gives_the_same_merge_shard_by_shard(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (sharded / name).write_bytes((tiny_llama / name).read_bytes())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3

    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules="all-linear", use_dora=True)
    whole = run_merge(adapter, base=str(tiny_llama), output=tmp_path / "whole", verify=False, log=print)
    split = run_merge(adapter, base=str(sharded), output=tmp_path / "split", log=print)

    assert sorted(p.name for p in split.glob("*.safetensors")) == shards  # the base's sharding is kept
    index = json.loads((split / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"]
        == json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert index["metadata"]["total_size"] == sum((split / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((split / s).read_bytes()[:8], "little") for s in shards
    )
    a, b = merged_weights(whole), merged_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(split)  # a standard checkpoint
    assert torch.equal(
        model.state_dict()["model.layers.1.mlp.down_proj.weight"], a["model.layers.1.mlp.down_proj.weight"]
    )


# --- a real run through the CLI ------------------------------------------------------------------------


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


def test_generation_stops_at_the_chat_end_of_turn_too(tmp_path, tiny_llama):
    """A tokenizer whose EOS is not the template's end-of-turn token: generation must stop at both."""
    from transformers import AutoTokenizer

    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(adapter)
    out = run_merge(adapter, base=str(tiny_llama), output=tmp_path / "merged", verify=False, log=print)
    stop = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    wanted = {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    assert wanted <= set(stop)


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
    import loratool.model.bnb_cpu

    monkeypatch.setattr(loratool.model.bnb_cpu, "use_exact_4bit_matmul", lambda model: 0)
    result = merge_cli("--adapter", qlora_run, "--output", tmp_path / "m")
    assert result.exit_code == 1 and "error: verification failed" in result.output
    failed = record(tmp_path / "m.failed-verification")["verification"]["quantized_base"]
    assert failed["max_abs_logit_diff"] > 1e-2
    assert (
        failed["four_bit_matmul"] == "fused AVX512-BF16 kernel in eval mode (bfloat16)"
    )  # the record says so


def test_verification_thresholds():
    from loratool.merge.compare import compare
    from loratool.merge.verify import EXACT, QUANTIZATION_DRIFT

    torch.manual_seed(0)
    reference = [torch.randn(5, 50), torch.randn(3, 50)]
    assert compare(reference, [r + 1e-5 for r in reference], EXACT)["passed"]
    assert not compare(reference, [r + 0.01 * torch.randn_like(r) for r in reference], EXACT)["passed"]
    broken = compare(reference, [r * float("nan") for r in reference], QUANTIZATION_DRIFT)
    assert not broken["passed"] and broken["max_abs_logit_diff"] == float("inf")
    drift = compare(reference, [r + 0.05 * torch.randn_like(r) for r in reference], QUANTIZATION_DRIFT)
    assert drift["passed"] and drift["positions"] == 8


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


def test_base_from_adapter_config_when_there_is_no_run(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "m", "--no-verify")
    assert result.exit_code == 0, result.output
    assert record(tmp_path / "m")["base_model"]["path"] == str(tiny_llama)


def test_base_that_cannot_be_found(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--base", tmp_path / "nowhere", "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert result.output.startswith(f"error: base model not found: '{tmp_path / 'nowhere'}' (from --base)")
    assert "hint: pass --base a local model directory" in result.output

    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "org/uncached"})
    )
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert "base model not found: 'org/uncached' (from adapter_config.json" in result.output
    assert "nor in the Hugging Face cache" in result.output


# --- errors --------------------------------------------------------------------------------------------


def test_adapter_dir_missing(tmp_path):
    result = merge_cli("--adapter", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == f"error: adapter directory not found: {tmp_path / 'nope'}"
    assert result.output.splitlines()[1].startswith("hint: ")


def test_adapter_dir_without_adapter_files_lists_what_is_there(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({**LORATOOL_RUN, "status": "failed"}))
    (folder / "recipe.yaml").write_text("x: 1\n")
    result = merge_cli("--adapter", folder)
    assert result.exit_code == 1
    assert (
        f"error: {folder} is not a LoRA adapter directory: adapter_config.json and adapter_model.safetensors "
        "missing (it has: checkpoints/, recipe.yaml, run.json)" in result.output
    )
    assert "run.json says the training run is 'failed'" in result.output


def test_adapter_for_another_architecture(tmp_path, tiny_gpt2, tiny_llama):
    adapter = peft_adapter(tiny_gpt2, tmp_path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    result = merge_cli("--adapter", adapter, "--base", tiny_llama, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert (
        "error: the adapter changes 2 tensor(s) the base model does not have, e.g. "
        "transformer.h.0.attn.c_attn.weight" in result.output
    )
    assert "another architecture" in result.output and not (tmp_path / "m").exists()


def test_adapter_for_another_hidden_size(tmp_path, tiny_llama, tiny_model_factory):
    narrow = tiny_model_factory("llama", hidden_size=32, intermediate_size=64)
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--base", narrow, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert (
        "error: shape mismatch for model.layers.0.self_attn.q_proj.weight: the base model has [32, 32], the "
        "adapter's LoRA update (B @ A) is [64, 64]" in result.output
    )


def test_adapter_for_another_vocabulary(tmp_path, tiny_llama, tiny_model_factory):
    small = tiny_model_factory("llama", vocab_size=300)
    with_head = peft_adapter(
        tiny_llama, tmp_path / "a1", target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    result = merge_cli("--adapter", with_head, "--base", small, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert (
        "error: shape mismatch for lm_head.weight: the base model has [300, 64], the adapter's full copy is "
        "[512, 64]" in result.output
    )

    # Only attention targeted (same shapes), but the adapter's tokenizer is the 512-token one.
    from transformers import AutoTokenizer

    plain = peft_adapter(tiny_llama, tmp_path / "a2", target_modules=["q_proj"])
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(plain)
    result = merge_cli("--adapter", plain, "--base", small, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert "has 512 tokens but the base" in result.output and "vocabulary of 300" in result.output


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "merged"
    assert merge_cli("--adapter", adapter, "--output", out, "--no-verify").exit_code == 0
    refused = merge_cli("--adapter", adapter, "--output", out, "--no-verify")
    assert refused.exit_code == 1
    assert (
        f"error: output directory {out} already exists" in refused.output and "--overwrite" in refused.output
    )
    replaced = merge_cli("--adapter", adapter, "--output", out, "--no-verify", "--overwrite")
    assert replaced.exit_code == 0, replaced.output

    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = merge_cli("--adapter", adapter, "--output", foreign, "--overwrite")
    assert refused.exit_code == 1 and "is not the output of `loratool merge`" in refused.output
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_failed_verification_is_an_error_and_the_output_says_so(tmp_path, tiny_llama, monkeypatch):
    import loratool.adapter.files

    real = loratool.adapter.files.lora_delta
    monkeypatch.setattr(loratool.adapter.files, "lora_delta", lambda f: 2 * real(f))  # a scaling bug
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules="all-linear")
    out = tmp_path / "merged"
    result = merge_cli("--adapter", adapter, "--output", out)
    assert result.exit_code == 1
    assert "error: verification failed: the merged model does not reproduce base + adapter" in result.output
    assert "max |Δlogit|" in result.output and "allowed: max |Δlogit| <= 0.001" in result.output
    assert not out.exists() and not list(tmp_path.glob("merged.partial-*"))
    failed = tmp_path / "merged.failed-verification"
    assert record(failed)["status"] == "failed-verification"
    assert str(failed) in result.output


def test_interrupted_merge_leaves_nothing_that_looks_complete(tmp_path, tiny_llama, monkeypatch):
    import loratool.merge.run

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loratool.merge.run, "write_generation_config", interrupt)
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "merged")
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_not_enough_disk_space(tmp_path, tiny_llama, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "merged")
    assert result.exit_code == 1
    assert f"error: not enough disk space in {tmp_path}: the merged model needs about" in result.output


def test_unsupported_adapter_is_refused_with_the_field_named(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert "init_lora_weights=pissa" in result.output and "merge_and_unload" in result.output


def test_merge_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from loratool.cli import app\n"
        "result = CliRunner().invoke(app, ['merge', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "for option in ('--adapter', '--base', '--output', '--dtype', '--qlora-base', '--no-verify',\n"
        "               '--force', '--overwrite'):\n"
        "    assert option in result.output, option\n"
        "print('heavy:', [m for m in ('torch', 'transformers', 'peft') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout
