"""Reward models (the `reward` section) trained: a real run on a tiny model that learns to rank held-out
pairs, an adapter directory whose adapter and score head load with PEFT and score as in training,
`loratool eval` of the run next to its starting point, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from helpers.dpo import HELD_OUT_WORDS, TRAIN_WORDS, pair, write_jsonl
from helpers.run_trust import adapter_weights, metric_steps, train
from loratool.cli import app
from loratool.errors import LoratoolError
from loratool.recipe import validate_recipe
from loratool.rundir.records import read_run
from loratool.train.progress import MetricsLog


def reward_recipe(tmp_path, tiny_llama, name: str = "out", **training) -> dict:
    train_file = write_jsonl(tmp_path / "train.jsonl", [pair(w) for w in TRAIN_WORDS * 2])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [pair(w) for w in HELD_OUT_WORDS])
    return smoke_recipe(
        tiny_llama,
        train_file,
        tmp_path / name,
        data={
            "train": [{"path": str(train_file)}],
            "validation": [{"path": str(held_out)}],
            "max_length": 64,
        },
        training={"max_steps": 8, "save_steps": 8, "eval_steps": 8, "logging_steps": 2, **training},
        reward={},
    )


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_llama):
    """A reward model trained on 24 pairs (12 prompts), 4 held-out pairs on other prompts, and its trainer."""
    import loratool.train.reward
    from loratool.train.run import run_train

    tmp = tmp_path_factory.mktemp("reward")
    trainers = []

    class Recording(loratool.train.reward.RewardTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loratool.train.reward, "RewardTrainer", Recording)
        out = run_train(validate_recipe(reward_recipe(tmp, tiny_llama)), log=lambda _: None)
    return out, trainers[0], tmp


def evaluations(out) -> list[dict]:
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in logged if "eval_accuracy" in row]


def held_out_sequences(out, tmp) -> list[list[int]]:
    from transformers import AutoTokenizer

    from loratool.data.preference import build_preference_datasets
    from loratool.recipe import DataSection
    from loratool.train.reward import scored_sequences

    tokenizer = AutoTokenizer.from_pretrained(out)
    section = DataSection(train=[{"path": str(tmp / "held_out.jsonl")}], max_length=64)
    scored = scored_sequences(build_preference_datasets(section, tokenizer, seed=0).train)
    return [s for row in scored for s in (row["chosen_ids"], row["rejected_ids"])]


def test_the_loss_falls_and_the_held_out_pairs_are_ranked(reward_run):
    out, _, _ = reward_run
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    first, last = evaluations(out)[0], evaluations(out)[-1]
    assert first["step"] == 0 and last["step"] == 8
    assert last["eval_accuracy"] == 1.0 and last["eval_margin"] > first["eval_margin"] + 1.0


def test_the_saved_adapter_and_head_load_with_peft_and_score_as_in_training(reward_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, trainer, tmp = reward_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    loaded = PeftModel.from_pretrained(base, out).eval()
    in_process = trainer.model.eval()
    for ids in held_out_sequences(out, tmp):
        with torch.no_grad():
            want = in_process(input_ids=torch.tensor([ids])).logits
            got = loaded(input_ids=torch.tensor([ids])).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # And the head did train: with the adapter off, PEFT's untouched copy of the head scores differently.
    with loaded.disable_adapter(), torch.no_grad():
        untrained = loaded(input_ids=torch.tensor([ids])).logits
    assert (untrained - got).abs().item() > 1e-3


def test_the_run_directory_records_a_reward_model(reward_run):
    out, _, _ = reward_run
    record = read_run(out)
    assert record.complete and record.stage == "reward"
    assert record.raw["reward"] == {
        "center_rewards_coefficient": None,
        "head": "score (one label), saved with the adapter",
    }
    assert record.data["train"]["rows"] == 24 and record.data["validation"]["rows"] == 4
    card = (out / "README.md").read_text()
    assert "A **reward model**" in card and "AutoModelForSequenceClassification" in card


def test_eval_ranks_the_held_out_pairs_beside_the_starting_point(reward_run, tmp_path):
    out, _, tmp = reward_run
    result = CliRunner().invoke(app, ["eval", str(out), "--output", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "tuned: pairwise accuracy 100.0%" in result.output
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    tuned, base = record["models"]["tuned"], record["models"]["base"]
    assert tuned["pairs"] == base["pairs"] == 4 and record["data"]["source"] == "validation"
    # The same figures as the trainer's evaluations: the starting point (the adapter off, the head as it
    # was before training, re-created from training.seed) at step 0, the trained model at the last step.
    first, last = evaluations(out)[0], evaluations(out)[-1]
    assert base["pairwise_accuracy"] == pytest.approx(first["eval_accuracy"])
    assert base["mean_margin"] == pytest.approx(first["eval_margin"], abs=1e-4)
    assert tuned["pairwise_accuracy"] == pytest.approx(last["eval_accuracy"])
    assert tuned["mean_margin"] == pytest.approx(last["eval_margin"], abs=1e-4)
    assert len((tmp_path / "eval" / "scores.jsonl").read_text().splitlines()) == 4
    assert "| tuned | 100.0% |" in (tmp_path / "eval" / "report.md").read_text()
    # --data: any file of pairs, in file order.
    again = CliRunner().invoke(
        app, ["eval", str(out), "--data", str(tmp / "train.jsonl"), "--max-samples", "3",
              "--output", str(tmp_path / "eval-train")],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    record = json.loads((tmp_path / "eval-train" / "metrics.json").read_text())
    assert record["data"]["source"] == "file" and record["models"]["tuned"]["pairs"] == 3


def test_merge_writes_a_score_model_that_loads_with_transformers_and_scores_the_same(
    reward_run, tiny_llama, tmp_path
):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from loratool.merge import run_merge

    out, _, tmp = reward_run
    merged = run_merge(out, output=tmp_path / "merged", log=lambda _: None)
    record = json.loads((merged / "merge.json").read_text())
    check = record["verification"]["full_precision_base"]
    assert check["passed"] and check["max_abs_score_diff"] < 1e-4
    assert "held-out validation rows" in record["verification"]["probes"]
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {
        "0": "LABEL_0"
    }
    with safe_open(merged / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert "score.weight" in names and "lm_head.weight" not in names  # the score head replaces the LM head
    assert not (merged / "generation_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()  # no num_labels needed
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    base.config.pad_token_id = model.config.pad_token_id
    reference = PeftModel.from_pretrained(base, out).eval()
    for ids in held_out_sequences(out, tmp)[:4]:
        with torch.no_grad():
            got, want = (
                model(input_ids=torch.tensor([ids])).logits,
                reference(input_ids=torch.tensor([ids])).logits,
            )
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Rounded to bfloat16, the scores move a little and the looser bound applies.
    rounded = run_merge(out, output=tmp_path / "bf16", dtype="bfloat16", log=lambda _: None)
    check = json.loads((rounded / "merge.json").read_text())["verification"]["full_precision_base"]
    assert check["passed"] and check["allowed"] == 0.1


def test_commands_that_write_answers_refuse_a_reward_model(reward_run, tmp_path):
    from loratool.eval.run import run_eval
    from loratool.merge import run_merge

    out, _, _ = reward_run
    result = CliRunner().invoke(app, ["generate", str(out), "--prompt", "hi"])
    assert result.exit_code == 1 and "is a reward model (a score head)" in result.output
    result = CliRunner().invoke(app, ["serve", str(out), "--dry-run"])
    assert result.exit_code == 1 and "it is a reward model (a score head)" in result.output
    merged = run_merge(out, output=tmp_path / "merged", verify=False, log=lambda _: None)
    with pytest.raises(LoratoolError, match="sequence-classification") as info:
        run_eval(merged, log=lambda _: None)
    assert "the run directory" in info.value.hint
    result = CliRunner().invoke(app, ["generate", str(merged), "--prompt", "hi"])
    assert result.exit_code == 1 and "is a reward model" in result.output
    for source, form in ((out, "gguf"), (out, "gguf-lora"), (merged, "gguf")):  # before any merge work
        result = CliRunner().invoke(app, ["export", str(source), "--format", form])
        assert result.exit_code == 1 and "is a reward model (a score head on the base" in result.output
        assert "--format hf" in result.output and not Path(f"{source}-{form}").exists()


def test_a_resumed_reward_run_equals_the_uninterrupted_one(tmp_path, tiny_llama, monkeypatch):
    settings = {"max_steps": 6, "save_steps": 3, "logging_steps": 1, "eval_steps": None}
    whole = write_recipe(tmp_path / "whole.yaml", reward_recipe(tmp_path, tiny_llama, "whole", **settings))
    assert train(whole).exit_code == 0
    parts = write_recipe(tmp_path / "parts.yaml", reward_recipe(tmp_path, tiny_llama, "parts", **settings))
    original = MetricsLog.on_step_end

    def interrupt_at_step_5(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt()
        return original(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "on_step_end", interrupt_at_step_5)  # after checkpoint-3 and step 4
        assert train(parts).exit_code == 130
    resumed = train(parts, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from checkpoint-3" in resumed.output
    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "parts")
    assert any("score" in k for k in a)  # the head is part of what is saved, and so of what must match
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert metric_steps(tmp_path / "parts") == list(range(1, 7))


def test_a_malformed_pair_stops_training_at_its_line(tmp_path, tiny_llama):
    raw = reward_recipe(tmp_path, tiny_llama)
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair("apple"), {"prompt": "Hi", "chosen": "a"}])
    raw["data"]["train"] = [{"path": str(bad)}]
    result = train(write_recipe(tmp_path / "bad.yaml", raw))
    assert result.exit_code == 1 and f"{bad}:2: field 'rejected' is missing" in result.output
    assert not (tmp_path / "out").exists()


def test_train_smoke_of_a_reward_recipe_trains_and_merges_and_skips_the_gguf_export(
    tmp_path, tiny_llama, monkeypatch
):
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path / "cache"))  # the small stand-in base goes here
    raw = reward_recipe(tmp_path, tiny_llama)
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw)), "--smoke"])
    assert result.exit_code == 0, result.output
    assert "export: skipped (a reward model" in result.output and "max |Δscore|" in result.output
    run = tmp_path / "out-smoke"
    assert read_run(run).stage == "reward" and (tmp_path / "out-smoke-merged" / "model.safetensors").is_file()
    assert not (tmp_path / "out-smoke-gguf").exists()
