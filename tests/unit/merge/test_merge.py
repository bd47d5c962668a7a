"""Merging without the CLI: merged weights equal PEFT's merge_and_unload (every variant, biases,
fan-in-fan-out, shard by shard), generation stops at the chat end of turn, verification thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_adapter as peft_adapter
from helpers.merge import assert_same_weights, merged_weights, record

# a fixture, imported for pytest to find in this module
from helpers.merge import tiny_gpt2 as tiny_gpt2
from loratool.merge import run_merge


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return model.merge_and_unload().state_dict()


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
