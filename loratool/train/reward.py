"""The `reward` section: a reward model — the base with a one-number score head (model/load.py) and a
LoRA adapter (task_type SEQ_CLS, so PEFT trains and saves the head with it) — trained on preference pairs
with trl's RewardTrainer to score the chosen answer above the rejected one.

The pairs are read, templated, tokenized and cut to data.max_length by the data module exactly as for
DPO (data/preference.py); the trainer gets each pair as two whole sequences, prompt + chosen and prompt +
rejected, and scores each at its last token.

One of the sibling trainer builders (sft.py, dpo.py, kto.py, reward.py, ...), with the same few
functions; `train/preflight.py` picks one per recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import RewardConfig, RewardTrainer

from loratool.data.preference import build_preference_datasets
from loratool.errors import LoratoolError
from loratool.train.arguments import make_config, trainer_fields

if TYPE_CHECKING:
    from peft import PeftModel

    from loratool.data import PreparedData
    from loratool.recipe import Recipe

STAGE = "reward"  # run.json's "stage"


def check(recipe: Recipe) -> None:
    """Checks of this method's own settings before anything loads: none beyond the recipe's."""


def build_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    """Every preference pair read, templated, tokenized and cut (data/preference.py), as the two whole
    sequences the reward trainer scores: chosen_ids (prompt + chosen), rejected_ids (prompt + rejected)."""
    data = build_preference_datasets(recipe.data, tokenizer, seed=recipe.training.seed)
    return replace(
        data,
        train=scored_sequences(data.train),
        validation=scored_sequences(data.validation) if data.validation is not None else None,
    )


def scored_sequences(pairs: Any) -> Any:
    """Preference pairs (prompt_ids, chosen_ids, rejected_ids) as two whole sequences each."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "chosen_ids": [p + c for p, c in zip(pairs["prompt_ids"], pairs["chosen_ids"], strict=True)],
            "rejected_ids": [p + r for p, r in zip(pairs["prompt_ids"], pairs["rejected_ids"], strict=True)],
        }
    )


def record(recipe: Recipe) -> dict[str, Any]:
    """What run.json says about the method: its settings and the head the adapter carries."""
    assert recipe.reward is not None
    return {
        "stage": STAGE,
        "reward": {
            "center_rewards_coefficient": recipe.reward.center_rewards_coefficient,
            "head": "score (one label), saved with the adapter",
        },
    }


def build_config(
    recipe: Recipe,
    *,
    checkpoints_dir: Path,
    has_validation: bool,
    bf16: bool,
    fp16: bool,
    train_lengths: Any = None,
) -> RewardConfig:
    """The trainer's arguments (`train_lengths` is for packing, which reward batches do not use)."""
    assert recipe.reward is not None
    fields = trainer_fields(
        recipe.training,
        checkpoints_dir=checkpoints_dir,
        has_validation=has_validation,
        bf16=bf16,
        fp16=fp16,
    )
    return make_config(
        RewardConfig,
        recipe.training,
        **fields,
        center_rewards_coefficient=recipe.reward.center_rewards_coefficient,
        # The data module cut (data.truncation: truncate) or dropped (drop, trl's own way) longer pairs.
        max_length=None,
        remove_unused_columns=True,
    )


def prepare_model(
    model: PeftModel, recipe: Recipe, base_fingerprint: str | None, log: Callable[[str], None]
) -> None:
    """Nothing to do: the fresh adapter and the score head (model/load.py) train from the start."""


def build_trainer(
    model: PeftModel,
    recipe: Recipe,
    *,
    args: RewardConfig,
    data: PreparedData,
    tokenizer: Any,
    callbacks: list[Any],
    optimizer: Any,
    num_processes: int,
) -> RewardTrainer:
    """trl's RewardTrainer on the scored sequences (it sets the pad id the head reads on the config)."""
    try:
        return RewardTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=(optimizer, None),
        )
    except (ValueError, ImportError, NotImplementedError) as exc:
        raise LoratoolError(
            f"trl's RewardTrainer refused this setup: {exc}", hint="check the reward and training sections"
        ) from None


def before_save(model: PeftModel) -> None:
    """Nothing to remove: the model holds the trained adapter and its head only."""
