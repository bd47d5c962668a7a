"""Reward models (the `reward` section) without training: recipe rules, the pairs as two whole sequences,
the base with its score head and a SEQ_CLS adapter, the trainer's settings, the dry run, the plan, what
`loratool data` shows, and the evaluation's figures."""

from __future__ import annotations

import pytest

from conftest import REPO, smoke_recipe
from helpers.dpo import TRAIN_WORDS, data_section, fresh, pair, write_jsonl

# a fixture, imported for pytest to find in this module
from helpers.dpo import tokenizer as tokenizer
from loratool.data.preference import build_preference_datasets
from loratool.errors import LoratoolError
from loratool.recipe import load_recipe, validate_recipe


def recipe_with(**sections) -> dict:
    raw = {"base_model": "m", "data": {"train": [{"path": "p.jsonl"}]}, "training": {"output_dir": "out/x"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def problems(raw: dict) -> str:
    with pytest.raises(LoratoolError) as info:
        validate_recipe(raw)
    return info.value.message


def reward_recipe(tmp_path, tiny_llama, **sections):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(w) for w in TRAIN_WORDS])
    return validate_recipe(
        smoke_recipe(
            tiny_llama,
            path,
            tmp_path / "out",
            data={"train": [{"path": str(path)}], "max_length": 64},
            reward={},
            **sections,
        )
    )


# --- the recipe -------------------------------------------------------------------------------------------


def test_the_reward_section_selects_a_reward_model():
    recipe = validate_recipe(recipe_with(reward={}))
    assert recipe.stage == "reward" and recipe.reward.center_rewards_coefficient is None
    assert (
        validate_recipe(
            recipe_with(reward={"center_rewards_coefficient": 0.01})
        ).reward.center_rewards_coefficient
        == 0.01
    )


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"reward": {}, "dpo": {}}, "dpo and reward: each section chooses the training method"),
        ({"reward": {"beta": 0.1}}, "reward.beta: unknown key here — it belongs in dpo.beta"),
        ({"reward": {"center_rewards_coeficient": 0.1}}, "did you mean reward.center_rewards_coefficient?"),
        ({"reward": {"center_rewards_coefficient": 0}}, "reward.center_rewards_coefficient: expected"),
        (
            {"reward": {}, "data": {"train": [{"path": "p.jsonl", "format": "messages"}]}},
            "data.train.0.format: messages rows have no rejected answer to learn from with reward",
        ),
        (
            {"reward": {}, "data": {"train": [{"path": "p.jsonl", "format": "unpaired"}]}},
            "data.train.0.format: unpaired rows have no rejected answer",
        ),
        ({"reward": {}, "data": {"packing": True}}, "data.packing: reward-model batches are padded pairs"),
        (
            {"reward": {}, "lora": {"init_lora_weights": "pissa"}},
            "cannot carry the reward model's score head",
        ),
    ],
)
def test_recipe_problems_name_the_key_and_the_fix(sections, expected):
    assert expected in problems(recipe_with(**sections))


# --- data, model, adapter, trainer settings ---------------------------------------------------------------


def test_each_pair_is_scored_as_two_whole_sequences(tmp_path, tokenizer):
    from loratool.train.reward import scored_sequences

    path = write_jsonl(tmp_path / "p.jsonl", [pair(w) for w in TRAIN_WORDS[:3]])
    pairs = build_preference_datasets(data_section(path), fresh(tokenizer), seed=0).train
    scored = scored_sequences(pairs)
    assert scored.column_names == [
        "chosen_ids",
        "rejected_ids",
    ]  # what trl's RewardTrainer takes as tokenized
    for row, p in zip(scored, pairs, strict=True):
        assert row["chosen_ids"] == p["prompt_ids"] + p["chosen_ids"]
        assert row["rejected_ids"] == p["prompt_ids"] + p["rejected_ids"]


def test_the_base_gets_a_score_head_and_the_adapter_trains_it(tmp_path, tiny_llama):
    from loratool.adapter.lora import attach_adapter
    from loratool.model import hardware
    from loratool.model.load import load_model

    recipe = reward_recipe(tmp_path, tiny_llama)
    model = load_model(recipe, hardware.detect(), log=lambda _: None)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id is not None  # the head reads the last token that is not padding
    adapted = attach_adapter(model, recipe.lora, quantized=False, gradient_checkpointing=False)
    config = adapted.peft_config["default"]
    assert config.task_type == "SEQ_CLS" and "score" in config.modules_to_save
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in n for n in trainable) and any("lora_A" in n for n in trainable)


def test_the_config_carries_the_reward_settings(tmp_path):
    from loratool.train.reward import build_config

    recipe = validate_recipe(recipe_with(reward={"center_rewards_coefficient": 0.01}))
    args = build_config(recipe, checkpoints_dir=tmp_path / "c", has_validation=True, bf16=False, fp16=False)
    assert args.center_rewards_coefficient == 0.01
    assert args.max_length is None  # data.max_length / data.truncation already applied, and counted
    assert not (tmp_path / "c").exists()


def test_dry_run_and_plan_check_a_reward_recipe_and_write_nothing(tmp_path, tiny_llama):
    from loratool.train.dry_run import dry_run
    from loratool.train.plan import plan_recipe

    recipe = reward_recipe(tmp_path, tiny_llama)
    logged: list[str] = []
    dry_run(recipe, log=logged.append)
    text = "\n".join(logged)
    assert "data: train 12 rows" in text and "adapter:" in text
    notes: list[str] = []
    plan = plan_recipe(recipe, log=notes.append)
    assert not any("data not read" in note for note in notes), notes
    # The score head is trained whole (modules_to_save): one weight per hidden unit, on top of LoRA.
    sft = plan_recipe(recipe.model_copy(update={"reward": None}), log=lambda _: None, read_data=False)
    assert plan.trainable_parameters == sft.trainable_parameters + 64
    assert not (tmp_path / "out").exists()


def test_loratool_data_shows_reward_pairs_and_kto_rows(tmp_path, tiny_llama, tokenizer):
    from loratool.data.inspect import InspectedPair, InspectedRow, inspect_data

    recipe = reward_recipe(tmp_path, tiny_llama)
    report = inspect_data(recipe, fresh(tokenizer))
    assert len(report.rows) == 12 and all(isinstance(r, InspectedPair) for r in report.rows)
    kto = recipe.model_copy(update={"reward": None, "kto": validate_recipe(recipe_with(kto={})).kto})
    report = inspect_data(kto, fresh(tokenizer))
    assert len(report.rows) == 24 and all(isinstance(r, InspectedRow) for r in report.rows)
    assert not any(f.check == "duplicates" for f in report.findings)  # a pair's halves differ by their label


def test_pair_metrics_count_a_tie_as_wrong():
    from loratool.eval.reward import pair_metrics

    metrics = pair_metrics([(1.0, 0.0), (0.5, 0.5), (-1.0, 1.0), (2.0, -2.0)])
    assert metrics["pairwise_accuracy"] == 0.5 and metrics["pairs"] == 4
    assert metrics["mean_margin"] == pytest.approx((1 + 0 - 2 + 4) / 4)
    assert metrics["mean_chosen_reward"] == pytest.approx(2.5 / 4)


def test_the_shipped_tiny_recipes_select_their_methods_on_the_shipped_pairs():
    for name, stage in (("tiny-kto", "kto"), ("tiny-reward", "reward")):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert recipe.stage == stage and recipe.training.output_dir == f"out/{name}"
        assert recipe.data.train[0].path.endswith("recipes/data/smoke-preferences.jsonl")
