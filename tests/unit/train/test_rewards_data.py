"""Online RL recipes before anything trains: prompt rows read and checked against the rewards (data/
prompts.py), the rules of a grpo / rloo recipe, the trainer configs, vLLM's refusal and the plan."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, smoke_recipe
from helpers.dpo import fresh, write_jsonl

# a fixture, imported for pytest to find in this module
from helpers.dpo import tokenizer as tokenizer
from loratool.data.prompts import build_prompt_datasets
from loratool.errors import LoratoolError
from loratool.model.hardware import Hardware
from loratool.recipe import DataSection, RewardFunction, load_recipe, validate_recipe

REWARDS = [RewardFunction(exact_match="answer"), RewardFunction(number="total", name="total")]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def build(tokenizer, path, rewards=REWARDS, **data):
    section = DataSection(train=[{"path": str(path)}], **{"max_length": 128, **data})
    return build_prompt_datasets(section, fresh(tokenizer), seed=0, rewards=rewards, section="grpo")


def test_chat_prompts_keep_their_columns_for_the_rewards(tmp_path, tokenizer):
    rows = [
        {"prompt": chat("What is 2+3?"), "answer": "5", "total": 5, "topic": "sums"},
        {"prompt": chat("What is 4+4?"), "answer": "8", "total": "8"},
    ]
    data = build(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows))
    assert data.train.column_names == ["prompt", "columns", "prompt_tokens"]
    by_answer = {
        json.loads(c)["answer"]: (p, json.loads(c))
        for p, c in zip(data.train["prompt"], data.train["columns"], strict=True)
    }
    prompt, columns = by_answer["5"]
    assert prompt == chat("What is 2+3?") and columns == {"answer": "5", "total": 5, "topic": "sums"}
    assert by_answer["8"][1] == {"answer": "8", "total": "8"}  # each value as the file wrote it
    assert data.summary.train.rows == 2 and data.summary.train.kind == "prompts"
    assert "prompt tokens" in data.summary.format() and "loss on" not in data.summary.format()
    # A chat prompt is counted as trl renders it: the template with the assistant turn opened.
    rendered = fresh(tokenizer).apply_chat_template(
        chat("What is 2+3?"), add_generation_prompt=True, tokenize=False
    )
    assert len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) in data.train["prompt_tokens"]


def test_text_prompts_and_a_mix_of_kinds(tmp_path, tokenizer):
    text = [{"prompt": "Q: 4+4?\nA:", "answer": "8", "total": 8}]
    data = build(tokenizer, write_jsonl(tmp_path / "t.jsonl", text))
    assert data.train["prompt"] == ["Q: 4+4?\nA:"]
    assert data.train["prompt_tokens"] == [len(tokenizer("Q: 4+4?\nA:")["input_ids"])]
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"prompt": chat("2+2?"), "answer": "4", "total": 4}, *text])
    with pytest.raises(
        LoratoolError, match=rf"{mixed}:2: a text prompt, while {mixed}:1 .* hold chat messages"
    ):
        build(tokenizer, mixed)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "2+2?", "total": 4}, r"column 'answer' is missing \(grpo.rewards.0 compares"),
        ({"prompt": "2+2?", "answer": "4", "total": "four"}, r"column 'total' holds no number \('four'\)"),
        (
            {"prompt": 42, "answer": "4", "total": 4},
            r"field 'prompt' must be a string or a list of chat messages",
        ),
        (
            {"prompt": chat("2+2?") + [{"role": "assistant", "content": "4"}], "answer": "4", "total": 4},
            r"ends with an assistant message",
        ),  # fmt: skip
        (
            {"prompt": [{"role": "wizard", "content": "hi"}], "answer": "4", "total": 4},
            r"unknown role 'wizard'",
        ),
    ],
    ids=["reference missing", "not a number", "not a prompt", "ends with the answer", "bad role"],
)
def test_a_bad_row_fails_with_its_file_and_line(tmp_path, tokenizer, row, message):
    good = {"prompt": "1+1?", "answer": "2", "total": 2}
    path = write_jsonl(tmp_path / "p.jsonl", [good, good, row])
    with pytest.raises(LoratoolError, match=message) as caught:
        build(tokenizer, path)
    assert caught.value.message.startswith(f"{path}:3: ")
    skipped = build(tokenizer, path, on_bad_row="skip")
    assert skipped.summary.train.rows == 2
    assert skipped.summary.train.sources[0].dropped["malformed"] == 1


def test_a_prompt_is_never_cut_but_dropped_and_counted(tmp_path, tokenizer):
    rows = [
        {"prompt": "short?", "answer": "a", "total": 1},
        {"prompt": "word " * 300, "answer": "b", "total": 2},
    ]
    data = build(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), max_length=32)
    assert data.summary.train.rows == 1 and data.summary.train.sources[0].dropped["too_long"] == 1
    assert data.train["prompt"] == ["short?"]


def test_a_file_without_prompts_names_its_keys(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(LoratoolError, match=r"has no prompt; its keys are: answer, question") as caught:
        build(tokenizer, path)
    assert "columns: {prompt: question}" in caught.value.hint
    renamed = DataSection(train=[{"path": str(path), "columns": {"prompt": "question"}}], max_length=64)
    data = build_prompt_datasets(renamed, fresh(tokenizer), seed=0, rewards=REWARDS[:1], section="rloo")
    assert data.train["prompt"] == ["2+2?"]


# --- the recipe ------------------------------------------------------------------------------------------------


def rl_recipe(tmp_path, method="grpo", **sections):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"}] * 8)
    base = {"rewards": [{"exact_match": "answer"}], "num_generations": 4}
    return smoke_recipe(
        tmp_path / "model", data, tmp_path / "out",
        data={"train": [{"path": str(data)}]},
        **{method: {**base, **sections.pop(method, {})}},
        **sections,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"data": {"train": [{"path": "x.jsonl", "format": "alpaca"}]}},
            r"data.train.0.format: grpo reads prompt rows",
        ),
        (
            {"training": {"per_device_train_batch_size": 6}},
            r"\(6\) must be a multiple of grpo.num_generations \(4\)",
        ),
        ({"data": {"packing": True}}, r"data.packing: grpo generates its completions"),
        ({"dpo": {}}, r"dpo and grpo: each section chooses the training method"),
        ({"grpo": {"num_generations": 1}}, r"grpo.num_generations: expected greater than or equal to 2"),
        ({"grpo": {"losstype": "dapo"}}, r"grpo.losstype: unknown key — did you mean grpo.loss_type"),
        (
            {"data": {"validation": 0.2}, "training": {"per_device_eval_batch_size": 6}},
            r"per_device_eval_batch_size \(6\) must be a multiple",
        ),  # fmt: skip
    ],
)
def test_an_online_rl_recipe_is_checked_when_it_loads(tmp_path, change, message):
    raw = rl_recipe(tmp_path)
    for section, values in change.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    with pytest.raises(LoratoolError, match=message):
        validate_recipe(raw)


def test_rloo_has_its_own_settings_and_defaults(tmp_path):
    recipe = validate_recipe(rl_recipe(tmp_path, "rloo", rloo={"normalize_advantages": True}))
    assert recipe.stage == "rloo" and recipe.rloo.beta == 0.05 and recipe.rloo.normalize_advantages
    with pytest.raises(LoratoolError, match=r"rloo.loss_type: unknown key"):
        validate_recipe(rl_recipe(tmp_path, "rloo", rloo={"loss_type": "dapo"}))


def test_prompt_rows_without_an_rl_section_are_refused(tmp_path):
    raw = rl_recipe(tmp_path)
    del raw["grpo"]
    raw["data"]["train"][0]["format"] = "prompt"
    with pytest.raises(LoratoolError, match=r"prompt rows \(a prompt, no answer\) are for online RL"):
        validate_recipe(raw)


def test_a_reward_file_is_found_next_to_the_recipe(tmp_path):
    import yaml

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.py").write_text(
        "def score(completions, **kw):\n    return [0.0] * len(completions)\n"
    )
    raw = rl_recipe(tmp_path, grpo={"rewards": [{"function": "mine.py:score"}]})
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(path).grpo.rewards[0].function == f"{tmp_path / 'sub' / 'mine.py'}:score"


def test_the_trainer_configs_get_the_sections_settings(tmp_path):
    from loratool.train import grpo

    raw = rl_recipe(tmp_path, grpo={"beta": 0.01, "max_completion_length": 32, "loss_type": "grpo"})
    raw["grpo"]["rewards"].append({"length": 10, "weight": 0.25})
    recipe = validate_recipe(raw)
    config = grpo.build_config(
        recipe, checkpoints_dir=tmp_path / "c", has_validation=False, bf16=False, fp16=False
    )
    assert type(config).__name__ == "GRPOConfig"
    assert (config.num_generations, config.max_completion_length, config.beta, config.loss_type) == (
        4,
        32,
        0.01,
        "grpo",
    )
    assert config.reward_weights == [1.0, 0.25] and config.remove_unused_columns is False
    rloo = validate_recipe(rl_recipe(tmp_path, "rloo"))
    config = grpo.build_config(
        rloo, checkpoints_dir=tmp_path / "c", has_validation=False, bf16=False, fp16=False
    )
    assert type(config).__name__ == "RLOOConfig" and config.beta == 0.05
    assert grpo.record(rloo)["rloo"]["rewards"] == [
        {"name": "exact_match", "kind": "exact_match", "weight": 1.0, "setting": "answer"}
    ]


def test_vllm_is_refused_without_vllm_or_a_gpu(tmp_path, monkeypatch):
    import importlib.util

    from loratool.train import grpo

    recipe = validate_recipe(rl_recipe(tmp_path, grpo={"use_vllm": True}))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoratoolError, match=r"grpo.use_vllm: vllm is not installed"):
        grpo.check_vllm(recipe)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    with pytest.raises(LoratoolError, match=r"grpo.use_vllm: vLLM generates on a CUDA GPU"):
        grpo.check_vllm(recipe, Hardware("cpu", "x86_64", 0, False, 2))
    grpo.check_vllm(recipe, Hardware("cuda", "NVIDIA H100", 1, True, 16))  # both there: accepted


def test_the_plan_adds_generation_to_memory_and_time(tiny_llama):
    from transformers import AutoConfig

    from loratool.train.plan import make_plan, model_shape

    recipe = load_recipe(REPO / "recipes" / "tiny-grpo.yaml").model_copy(
        update={"base_model": str(tiny_llama)}
    )
    shape = model_shape(recipe, AutoConfig.from_pretrained(tiny_llama))
    plan = make_plan(recipe, shape, lengths=[80] * 16, rows=16)
    longer = recipe.model_copy(update={"grpo": recipe.grpo.model_copy(update={"max_completion_length": 64})})
    more = make_plan(longer, shape, lengths=[80] * 16, rows=16)
    assert plan.components["generation KV cache"] > 0
    assert more.components["generation KV cache"] > plan.components["generation KV cache"]
    assert more.wall_seconds > plan.wall_seconds and more.peak_memory_bytes > plan.peak_memory_bytes
    assert any(
        a.startswith("generation: ~") and "8 completions of up to 16 tokens" in a for a in plan.assumptions
    )


def test_the_console_line_shows_each_reward_the_kl_and_the_completion_length():
    from loratool.train.progress import online_rl_parts

    logs = {"loss": 0.1, "reward": 0.75, "rewards/exact_match/mean": 0.5, "rewards/exact_match/std": 0.5,
            "rewards/short/mean": -0.25, "kl": 0.002, "completions/mean_length": 12.5}  # fmt: skip
    assert online_rl_parts(logs) == [
        "reward 0.7500 (exact_match 0.5000, short -0.2500)", "kl 0.002", "completion 12.5 tokens",
    ]  # fmt: skip
    assert online_rl_parts({"eval_loss": 0.1, "eval_reward": 1.0})[0] == "eval_reward 1.0000"
    assert online_rl_parts({"loss": 1.0, "grad_norm": 0.5}) == []  # SFT and DPO lines are unchanged


def test_the_data_view_shows_what_the_model_is_prompted_with(tmp_path, tiny_llama, tokenizer):
    from loratool.data.inspect import format_report, inspect_data

    raw = rl_recipe(tmp_path)
    raw["base_model"] = str(tiny_llama)
    rows = [{"prompt": chat(f"What is {n}+{n}?"), "answer": str(2 * n)} for n in range(3)]
    raw["data"]["train"] = [{"path": str(write_jsonl(tmp_path / "q.jsonl", rows + rows[:1]))}]
    report = inspect_data(validate_recipe(raw), fresh(tokenizer))
    text = format_report(report, rows=2, color=False)
    assert "first 2 prompts as the model is prompted with them" in text
    assert "What is 0+0?<|im_end|>\n<|im_start|>assistant\n" in text  # the assistant turn opened
    assert 'answer: "0"' in text and "[[" not in text  # the reference shown; no token carries loss
    assert [f.check for f in report.findings] == ["duplicates"]  # q.jsonl:4 repeats q.jsonl:1
