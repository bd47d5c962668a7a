"""`lora.method`: AdaLoRA, VeRA and LoRA-FA end to end on tiny models — each method trains,
AdaLoRA moves its rank budget and records the ranks, LoRA-FA keeps A as initialized, and each adapter
merges (merged logits = base + adapter), evaluates and generates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import smoke_recipe, write_recipe
from helpers.methods import METHODS, SMOKE, cli
from loratool.merge import run_merge

QLORA = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
DATA = {"train": [{"path": str(SMOKE), "format": "alpaca"}], "validation": 0.05, "max_length": 64}


def train(tmp: Path, base: Path, lora: dict, **sections) -> Path:
    out = tmp / "run"
    recipe = smoke_recipe(base, SMOKE, out, lora={"lora_dropout": 0.0, **lora}, **sections)
    recipe["lora"] = {k: v for k, v in recipe["lora"].items() if k not in ("r", "lora_alpha") or k in lora}
    result = cli("train", write_recipe(tmp / "recipe.yaml", recipe))
    assert result.exit_code == 0, result.output
    return out


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "eval_loss" not in r]


# --- training each method ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """One short real `loratool train` run per method, with held-out validation rows."""
    done = {}
    for name, lora in METHODS.items():
        lr = 3e-2 if name == "vera" else 1e-2  # VeRA wants a higher learning rate
        done[name] = train(
            tmp_path_factory.mktemp(name),
            tiny_llama,
            lora,
            data=DATA,
            training={"max_steps": 12, "save_steps": 6, "learning_rate": lr},
        )
    return done


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains(runs, method, tiny_llama):
    run = runs[method]
    losses = train_losses(run)
    assert losses[-1] < losses[0], losses
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["peft_type"] == {"adalora": "ADALORA", "vera": "VERA", "lorafa": "LORA"}[method]
    weights = load_file(run / "adapter_model.safetensors")
    if method == "vera":
        # Shared frozen projections saved once, two trained vectors per layer; b starts at 0.
        assert {"base_model.vera_A", "base_model.vera_B"} <= set(weights)
        lambda_b = [v for k, v in weights.items() if k.endswith("vera_lambda_b")]
        assert len(lambda_b) == 14 and all(v.abs().max() > 0 for v in lambda_b)
    if method == "lorafa":
        assert all(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete"


def test_adalora_reallocates_and_records_the_final_ranks(runs):
    run = runs["adalora"]
    record = json.loads((run / "run.json").read_text())["adalora"]
    ranks = record["final_ranks"]
    assert record["total_step"] == 12 and record["init_r"] == 6 and record["target_r"] == 2
    assert len(ranks) == 14  # 7 linear layers x 2 blocks
    assert record["rank_budget"] == {"start": 6 * 14, "end": sum(ranks.values())}
    assert sum(ranks.values()) == 2 * 14  # the budget reached target_r per layer on average
    assert len(set(ranks.values())) > 1  # moved to where it matters, not cut evenly
    # The adapter holds each layer at the rank it kept.
    weights = load_file(run / "adapter_model.safetensors")
    for layer, rank in ranks.items():
        assert weights[f"base_model.model.{layer}.lora_A"].shape[0] == rank
    card = (run / "README.md").read_text()
    assert "## AdaLoRA ranks" in card and f"{sum(ranks.values())} of {6 * 14}" in card
    assert re.search(r"\| q_proj \| \d+ \| \d+ \|", card)


def test_lorafa_keeps_a_as_initialized_and_trains_b(tiny_llama, runs):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from loratool.adapter.lora import build_lora_config, build_optimizer
    from loratool.recipe import LoraSection

    lora = LoraSection(method="lorafa", r=4, lora_alpha=8, lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), build_lora_config(lora))
    args = TrainingArguments(output_dir="unused", learning_rate=1e-2, report_to=[])
    optimizer = build_optimizer(model, lora, args)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    ids = torch.randint(3, 500, (2, 12))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    a_names = [n for n in before if "lora_A" in n]
    b_names = [n for n in before if "lora_B" in n]
    assert a_names and b_names
    assert all(torch.equal(after[n], before[n]) for n in a_names)
    assert all(not after[n].requires_grad for n in a_names)
    assert all(not torch.equal(after[n], before[n]) for n in b_names)

    # The same in a real run: A at its mid-run checkpoint is A at the end, B moved on.
    run = runs["lorafa"]
    final = load_file(run / "adapter_model.safetensors")
    middle = load_file(run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], middle[k]) for k in final if "lora_A" in k)
    assert any(not torch.equal(final[k], middle[k]) for k in final if "lora_B" in k)


# --- merge, eval, generate ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_merges_to_base_plus_adapter(runs, method, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run_merge(runs[method], output=tmp_path / "merged", dtype="float32", log=lambda _: None)
    check = json.loads((out / "merge.json").read_text())["verification"]["full_precision_base"]
    assert check["passed"] and check["max_abs_logit_diff"] <= 1e-4 and check["greedy_agreement"] == 1.0
    # The same weights as PEFT's own merge.
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), runs[method])
    expected = reference.merge_and_unload().state_dict()
    base = load_file(tiny_llama / "model.safetensors")
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    # The adapter changed every adapted layer, but those AdaLoRA cut to rank 0.
    ranks = json.loads((runs[method] / "run.json").read_text()).get("adalora", {}).get("final_ranks", {})
    assert len(changed) == (sum(rank > 0 for rank in ranks.values()) if ranks else 14)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_evaluates_and_generates(runs, method, tmp_path):
    result = cli(
        "eval", runs[method], "--max-samples", "2", "--max-new-tokens", "4", "--output", tmp_path / "e"
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["models"]["tuned"]["loss"] > 0
    result = cli("generate", runs[method], "--prompt", "Name a colour.", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "[run] Name a colour." in result.output


def test_another_adapter_type_is_not_combined(runs, tmp_path):
    result = cli("merge", "--adapter", runs["lorafa"], "--adapter", runs["vera"], "--adapter-only")
    assert result.exit_code == 1
    assert "is a VERA adapter; loratool combines LoRA adapters only" in result.output


# --- QLoRA: each method on a 4-bit base (bitsandbytes on CPU) -------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_on_a_4bit_base_and_merges(method, tiny_llama, tmp_path):
    run = train(
        tmp_path,
        tiny_llama,
        METHODS[method],
        quantization=QLORA,
        data=DATA,
        training={"max_steps": 6, "save_steps": 6, "learning_rate": 1e-2},
    )
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["base_model"]["quantization"] == "4bit"
    out = run_merge(run, output=tmp_path / "merged", dtype="float32", log=lambda _: None)
    verification = json.loads((out / "merge.json").read_text())["verification"]
    assert all(v["passed"] for v in verification.values() if isinstance(v, dict) and "passed" in v)


def test_recipe_yaml_of_a_run_names_the_method(runs):
    recipe = yaml.safe_load((runs["adalora"] / "recipe.yaml").read_text())
    assert recipe["lora"]["method"] == "adalora" and recipe["lora"]["init_r"] == 6
