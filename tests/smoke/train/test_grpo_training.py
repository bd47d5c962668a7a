"""Online RL (the `grpo` and `rloo` sections) trained on a tiny model: a few steps with every reward logged
per step, the reference without a copy of the model, a resumed run equal to the uninterrupted one, a
QLoRA base, and a reward function that fails stopping the run with its name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from helpers.dpo import write_jsonl
from helpers.run_trust import adapter_weights
from loratool.cli import app
from loratool.rundir.records import read_run
from loratool.train.progress import MetricsLog

WORDS = "apple river stone cloud tiger piano garden rocket candle mirror forest silver".split()
REWARD_FILE = """
def mentions_the_word(completions, word, **columns):
    return [float(w in c) for c, w in zip(completions, word)]


def token_sum(completion_ids, **columns):  # differs between completions: a signal even for a random model
    return [sum(ids) % 7 / 7 for ids in completion_ids]
"""


def prompts(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}], "answer": w, "word": w} for w in WORDS]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def rl_recipe(tmp_path, tiny_llama, name="out", method="grpo", **sections):
    """GRPO (or RLOO) on 12 chat prompts: 2 prompts x 2 completions of up to 8 tokens per step."""
    data = prompts(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    rl = {
        "num_generations": 2,
        "max_completion_length": 8,
        "rewards": [
            {"exact_match": "answer"},
            {"length": 4, "weight": 0.5},
            {"function": f"{tmp_path / 'my_rewards.py'}:mentions_the_word"},
            {"function": f"{tmp_path / 'my_rewards.py'}:token_sum"},
        ],
    }
    training = {"max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2}
    return smoke_recipe(
        tiny_llama,
        data,
        tmp_path / name,
        data={"train": [{"path": str(data)}], "max_length": 64},
        **{method: {**rl, **sections.pop(method, {})}},
        training={**training, **sections.pop("training", {})},
        **sections,
    )


def train(recipe_path, *args):
    return CliRunner().invoke(app, ["train", str(recipe_path), *args])


def logged(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_a_few_steps_train_the_adapter_and_log_every_reward(tmp_path, tiny_llama, method):
    recipe = write_recipe(tmp_path / "r.yaml", rl_recipe(tmp_path, tiny_llama, method=method))
    result = train(recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    steps = [row for row in logged(out) if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    for row in steps:  # every reward, unweighted, each step; the weighted sum; the completion lengths
        assert math.isfinite(row["loss"])
        for name in ("exact_match", "length", "mentions_the_word", "token_sum"):
            assert math.isfinite(row[f"rewards/{name}/mean"]) and row[f"rewards/{name}/std"] >= 0
        assert -1 <= row["rewards/length/mean"] <= 0 and 0 < row["completions/mean_length"] <= 8
        assert math.isfinite(row["reward"])
    # The console line carries the rewards too.
    assert "reward " in result.output and "(exact_match " in result.output and "completion " in result.output
    record = read_run(out)
    assert record.complete and record.stage == method
    section = getattr(record, method)
    assert [r["name"] for r in section["rewards"]] == [
        "exact_match",
        "length",
        "mentions_the_word",
        "token_sum",
    ]
    assert section["num_generations"] == 2 and record.data["train"]["rows"] == 12
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # the steps moved B
    assert {"adapter_config.json", "run.json", "loss_curve.png"} <= {p.name for p in out.iterdir()}


def test_with_a_kl_term_the_reference_is_the_base_with_the_adapter_disabled(tmp_path, tiny_llama):
    import loratool.train.grpo as grpo_module
    from loratool.recipe import validate_recipe
    from loratool.train.run import run_train

    raw = rl_recipe(tmp_path, tiny_llama, grpo={"beta": 0.1}, training={"max_steps": 2})
    trainers = []
    original = grpo_module.TRAINERS["grpo"]

    class Recording(original[1]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(grpo_module.TRAINERS, "grpo", (original[0], Recording))
        out = run_train(validate_recipe(raw), log=lambda _: None)
    trainer = trainers[0]
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]  # no copy at all
    assert all(math.isfinite(row["kl"]) for row in logged(out) if "loss" in row)
    assert read_run(out).grpo["reference"] == "base (adapter disabled)"


class Interrupt(KeyboardInterrupt):
    pass


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny_llama, monkeypatch):
    settings = {"training": {"max_steps": 4, "save_steps": 2}}
    whole = write_recipe(tmp_path / "whole.yaml", rl_recipe(tmp_path, tiny_llama, "whole", **settings))
    assert train(whole).exit_code == 0
    parts = write_recipe(tmp_path / "parts.yaml", rl_recipe(tmp_path, tiny_llama, "parts", **settings))
    original = MetricsLog.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise Interrupt()
        return original(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "on_step_end", on_step_end)
        assert train(parts).exit_code == 130  # killed after checkpoint-2 and one more step
    resumed = train(parts, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from checkpoint-2" in resumed.output
    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "parts")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)  # and the steps did move it
    rewards = {
        run: [r["reward"] for r in logged(tmp_path / run) if "loss" in r] for run in ("whole", "parts")
    }
    assert rewards["parts"] == pytest.approx(rewards["whole"])  # the same completions, scored the same
    assert [r["step"] for r in logged(tmp_path / "parts") if "loss" in r] == [1, 2, 3, 4]


def test_a_qlora_base_trains(tmp_path, tiny_llama):
    raw = rl_recipe(tmp_path, tiny_llama, quantization={"load_in_4bit": True}, training={"max_steps": 2})
    result = train(write_recipe(tmp_path / "r.yaml", raw))
    assert result.exit_code == 0, result.output
    record = read_run(tmp_path / "out")
    assert record.base_model.quantization == "4bit" and record.train["global_step"] == 2
    assert all(math.isfinite(r["loss"]) for r in logged(tmp_path / "out") if "loss" in r)


def test_a_reward_that_fails_stops_the_run_with_its_name(tmp_path, tiny_llama):
    (tmp_path / "bad.py").write_text("def score(completions, **kw):\n    return [1.0]\n")
    raw = rl_recipe(tmp_path, tiny_llama, training={"max_steps": 2})
    raw["grpo"]["rewards"] = [{"function": f"{tmp_path / 'bad.py'}:score", "name": "too_few"}]
    result = train(write_recipe(tmp_path / "r.yaml", raw))
    assert result.exit_code == 1
    assert "error: reward 'too_few' (grpo.rewards.0) returned 1 scores for 4 completions" in result.output
    assert "Traceback" not in result.output
    assert read_run(tmp_path / "out").status == "failed"


def test_a_missing_reward_function_is_refused_before_anything_loads(tmp_path, tiny_llama):
    raw = rl_recipe(tmp_path, tiny_llama)
    raw["grpo"]["rewards"] = [{"function": f"{tmp_path / 'my_rewards.py'}:nowhere"}]
    result = train(write_recipe(tmp_path / "r.yaml", raw), "--dry-run")
    assert result.exit_code == 1 and "grpo.rewards.0.function:" in result.output
    assert "has no function 'nowhere'" in result.output and "mentions_the_word" in result.output
    assert not (tmp_path / "out").exists()


def test_the_trained_adapter_loads_on_the_base(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (
        train(
            write_recipe(tmp_path / "r.yaml", rl_recipe(tmp_path, tiny_llama, training={"max_steps": 1}))
        ).exit_code
        == 0
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "out")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_a_reward_model_run_scores_the_completions(tmp_path, tiny_llama):
    """A finished `reward` run (trained here for 2 steps) as a reward: its scores of prompt + completion
    are what trl logs, and they are the ones the reward model gives those texts."""
    from helpers.dpo import TRAIN_WORDS, pair
    from loratool.train.rewards import load_reward_run, score_texts

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [pair(w) for w in TRAIN_WORDS])
    reward_raw = smoke_recipe(
        tiny_llama, pairs, tmp_path / "rm", data={"train": [{"path": str(pairs)}], "max_length": 64},
        reward={}, training={"max_steps": 2, "save_steps": 2},
    )  # fmt: skip
    assert train(write_recipe(tmp_path / "rm.yaml", reward_raw)).exit_code == 0
    raw = rl_recipe(tmp_path, tiny_llama, training={"max_steps": 2})
    raw["grpo"]["rewards"] = [
        {"model": str(tmp_path / "rm"), "name": "judge"},
        {"function": raw["grpo"]["rewards"][3]["function"]},
    ]
    result = train(write_recipe(tmp_path / "r.yaml", raw))
    assert result.exit_code == 0, result.output
    rows = [r for r in logged(tmp_path / "out") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["rewards/judge/mean"]) for r in rows)
    model, tokenizer, max_length = load_reward_run(tmp_path / "rm")
    prompt = [{"role": "user", "content": "Say apple."}]
    a, b = score_texts(model, tokenizer, max_length, [prompt, prompt], ["apple is nice. yes yes", "no"])
    assert a != b  # the score depends on the completion
    alone = score_texts(model, tokenizer, max_length, [prompt], ["no"])
    assert alone[0] == pytest.approx(b, abs=1e-5)  # padding in a batch changes nothing

    # Not a reward model: refused before anything loads.
    raw["grpo"]["rewards"] = [{"model": str(tmp_path / "out")}]
    raw["training"]["output_dir"] = str(tmp_path / "out2")
    refused = train(write_recipe(tmp_path / "r2.yaml", raw))
    assert refused.exit_code == 1 and "is a grpo run, not a reward model" in refused.output
