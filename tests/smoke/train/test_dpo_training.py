"""Preference tuning (the `dpo` section) trained: a real DPO run on a tiny model whose held-out
reward margin rises, and a run directory that merges and evaluates like any other."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import smoke_recipe
from helpers.dpo import HELD_OUT_WORDS, TRAIN_WORDS, data_section, fresh, pair, write_jsonl

# a fixture, imported for pytest to find in this module
from helpers.dpo import tokenizer as tokenizer
from loratool.data.preference import build_preference_datasets
from loratool.errors import LoratoolError
from loratool.recipe import validate_recipe

# --- a real DPO run on a tiny model ------------------------------------------------------------------------


def margins(policy, reference, rows: list[dict]) -> list[float]:
    """Per pair: (log p(chosen) - log p(rejected)) under the policy minus the same under the reference,
    in nats, summed over the answer tokens: the implicit reward margin DPO raises (divided by beta)."""

    def answer_logp(model, prompt: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(answer)[:, None]).sum())

    out = []
    for row in rows:
        p, c, r = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        out.append(
            (answer_logp(policy, p, c) - answer_logp(policy, p, r))
            - (answer_logp(reference, p, c) - answer_logp(reference, p, r))
        )
    return out


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_llama):
    """A DPO run on 24 chat pairs (12 prompts) with 4 held-out pairs on other prompts, and the trainer."""
    import loratool.train.dpo
    from loratool.train.run import run_train

    tmp = tmp_path_factory.mktemp("dpo")
    train = write_jsonl(tmp / "train.jsonl", [pair(w) for w in TRAIN_WORDS * 2])
    held_out = write_jsonl(tmp / "held_out.jsonl", [pair(w) for w in HELD_OUT_WORDS])
    raw = smoke_recipe(
        tiny_llama,
        train,
        tmp / "out",
        data={"train": [{"path": str(train)}], "validation": [{"path": str(held_out)}], "max_length": 64},
        training={"max_steps": 8, "save_steps": 8, "eval_steps": 8, "logging_steps": 4},
        dpo={"beta": 0.1},
    )
    trainers = []

    class Recording(loratool.train.dpo.PreferenceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loratool.train.dpo, "PreferenceTrainer", Recording)
        out = run_train(validate_recipe(raw), log=lambda _: None)
    return out, trainers[0], held_out


def test_the_reference_is_the_base_with_the_adapter_disabled(dpo_run):
    from peft import PeftModel

    _, trainer, _ = dpo_run
    assert trainer.ref_model is None  # no second model in memory
    assert isinstance(trainer.model, PeftModel)
    assert list(trainer.model.peft_config) == ["default"]  # and no frozen copy of the adapter either


def test_the_held_out_reward_margin_rises(dpo_run, tiny_llama, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, held_out = dpo_run
    rows = build_preference_datasets(data_section(held_out), fresh(tokenizer), seed=0).train.to_list()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    before = margins(base, base, rows)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()
    with tuned.disable_adapter():
        reference = margins(tuned, base, rows)
    after = margins(tuned, AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), rows)
    assert before == [0.0] * len(rows) and max(map(abs, reference)) < 1e-4  # disabled adapter == base
    assert min(after) > 1.0, after  # every held-out pair, by more than a nat (seen: ~10-30)


def test_the_run_directory_is_a_normal_run_that_records_dpo(dpo_run):
    from loratool.rundir.records import read_run

    out, trainer, _ = dpo_run
    record = read_run(out)
    assert record.complete and record.raw["stage"] == "dpo"
    assert record.raw["dpo"] == {
        "beta": 0.1,
        "loss_type": "sigmoid",
        "reference": "base (adapter disabled)",
        "init_adapter": None,
    }
    assert record.data["train"]["rows"] == 24 and record.data["validation"]["rows"] == 4
    # The default (every other layer) becomes every layer: trl re-enables all after each reference pass.
    assert record.train["checkpointed_layers"] == 2
    assert yaml.safe_load((out / "recipe.yaml").read_text())["dpo"]["beta"] == 0.1
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "run.json",
        "metrics.jsonl",
        "README.md",
    } <= names
    assert "ref" not in names  # only the trained adapter is saved
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in row for row in logged) and any("eval_loss" in row for row in logged)
    assert "Preference-tuned with DPO" in (out / "README.md").read_text()
    assert record.train["global_step"] == 8 and record.train["tokens_trained"] > 0


def test_the_run_merges_and_the_merge_verifies(dpo_run, tmp_path):
    from loratool.merge import run_merge

    out, _, _ = dpo_run
    merged = run_merge(out, output=tmp_path / "merged", log=lambda _: None)
    record = json.loads((merged / "merge.json").read_text())
    check = record["verification"]["full_precision_base"]
    assert check["passed"] and check["max_abs_logit_diff"] < 1e-4
    assert "held-out validation rows" in record["verification"]["probes"]


# --- starting from a finished SFT run --------------------------------------------------------------------


def test_dpo_starts_from_an_sft_runs_adapter_which_is_also_the_reference(tmp_path, tiny_llama, smoke_data):
    from safetensors.torch import load_file

    import loratool.train.dpo
    from loratool.train.run import run_train

    sft = run_train(
        validate_recipe(smoke_recipe(tiny_llama, smoke_data, tmp_path / "sft", training={"max_steps": 2})),
        log=lambda _: None,
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(w) for w in TRAIN_WORDS])
    raw = smoke_recipe(
        tiny_llama,
        pairs,
        tmp_path / "dpo",
        data={"train": [{"path": str(pairs)}], "max_length": 64},
        training={"max_steps": 1, "save_steps": 1},
        dpo={"init_adapter": str(sft)},
    )
    trainers = []

    class Recording(loratool.train.dpo.PreferenceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)
            # Before any step: the trained adapter and trl's frozen reference copy both hold the SFT weights.
            self.start = {k: v.clone() for k, v in self.model.state_dict().items() if "lora_B" in k}

    logged = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loratool.train.dpo, "PreferenceTrainer", Recording)
        out = run_train(validate_recipe(raw), log=logged.append)
    assert any(f"starting from {sft}" in line for line in logged)
    sft_weights = load_file(sft / "adapter_model.safetensors")
    start = trainers[0].start
    for name, value in sft_weights.items():
        if "lora_B" in name:
            key = name.replace("lora_B.weight", "lora_B.{}.weight")
            torch.testing.assert_close(start[key.format("default")], value)
            torch.testing.assert_close(start[key.format("ref")], value)
    assert trainers[0].ref_model is None
    assert (
        json.loads((out / "run.json").read_text())["dpo"]["reference"]
        == "base + init_adapter (a frozen copy)"
    )
    assert not (out / "ref").exists()

    # Another lora section would not fit the adapter: refused before any weights load, naming the keys.
    raw["lora"]["r"] = 4
    raw["training"]["output_dir"] = str(tmp_path / "dpo-r4")
    with pytest.raises(LoratoolError, match=r"lora.r: 8 there, 4 here"):
        run_train(validate_recipe(raw), log=lambda _: None)
    assert not (tmp_path / "dpo-r4").exists()


def test_eval_scores_the_chosen_answers_of_the_runs_validation_pairs(dpo_run, tmp_path):
    from loratool.eval.run import run_eval

    out, _, _ = dpo_run
    report = run_eval(out, max_samples=2, max_new_tokens=4, output=tmp_path / "eval", log=lambda _: None)
    record = json.loads((report / "metrics.json").read_text())
    assert record["data"]["source"] == "validation" and record["data"]["rows"] == 2
    # The references are the chosen answers (the prompts are the pairs' prompts).
    rows = [json.loads(line) for line in (report / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("yes yes" in row["reference"] and row["reference_complete"] for row in rows)
    assert all(row["prompt"].endswith("<|im_start|>assistant\n") for row in rows)
