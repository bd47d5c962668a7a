"""Supervised fine-tuning: trl's SFTTrainer on the rows the data module tokenized and masked.

One of the sibling trainer builders (sft.py, dpo.py): each offers the same few functions, and
`train/preflight.py` picks one per recipe, the one place where the methods part ways."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.data import build_datasets
from loratool.errors import LoratoolError
from loratool.train.arguments import make_config, trainer_fields
from loratool.train.validation_loss import pad_for_processes, report_token_weighted_eval_loss

if TYPE_CHECKING:
    from trl import SFTConfig, SFTTrainer

    from loratool.data import PreparedData
    from loratool.recipe import DataSection, Recipe, TrainingSection

STAGE = "sft"  # run.json's "stage"


def check(recipe: Recipe) -> None:
    """Checks of this method's own settings before anything loads: SFT has none beyond the recipe's."""


def build_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    """Every row read, formatted, templated, tokenized and masked (data/)."""
    return build_datasets(recipe.data, tokenizer, seed=recipe.training.seed)


def record(recipe: Recipe) -> dict[str, Any]:
    """What run.json says about the method."""
    return {"stage": STAGE}


def prepare_model(model: Any, recipe: Recipe, base_fingerprint: str | None, log: Any) -> None:
    """Nothing to do: SFT trains the freshly attached adapter."""


def build_config(
    recipe: Recipe,
    *,
    checkpoints_dir: Path,
    has_validation: bool,
    bf16: bool,
    fp16: bool,
    train_lengths: Sequence[int] | None = None,
) -> SFTConfig:
    """The trainer's arguments; `train_lengths` (each training row's token count) sizes packed batches."""
    return build_sft_config(
        recipe.training,
        recipe.data,
        checkpoints_dir=checkpoints_dir,
        has_validation=has_validation,
        bf16=bf16,
        fp16=fp16,
        train_lengths=train_lengths if recipe.data.packing else None,
    )


def build_trainer(
    model: Any,
    recipe: Recipe,
    *,
    args: SFTConfig,
    data: PreparedData,
    tokenizer: Any,
    callbacks: list[Any],
    optimizer: Any,
    num_processes: int,
) -> SFTTrainer:
    """trl's SFTTrainer, with the validation loss token-weighted over every row once (validation_loss.py)."""
    from trl import SFTTrainer  # deferred: trl loads torch and transformers

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=pad_for_processes(
                data.validation, num_processes, args.per_device_eval_batch_size, pad
            ),
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=(optimizer, None),
        )
    except (ValueError, ImportError) as exc:
        raise LoratoolError(
            f"trl's SFTTrainer refused this setup: {exc}",
            hint="check the training section of the recipe",
        ) from None
    report_token_weighted_eval_loss(trainer)
    return trainer


def before_save(model: Any) -> None:
    """Nothing to remove: the model holds the trained adapter only."""


def build_sft_config(
    training: TrainingSection,
    data: DataSection,
    *,
    checkpoints_dir: Path,
    has_validation: bool,
    bf16: bool,
    fp16: bool,
    train_lengths: Sequence[int] | None = None,
) -> SFTConfig:
    from trl import SFTConfig

    fields = trainer_fields(
        training, checkpoints_dir=checkpoints_dir, has_validation=has_validation, bf16=bf16, fp16=fp16
    )
    if data.packing and train_lengths:
        fields["per_device_train_batch_size"] = packed_rows_per_batch(training, data, train_lengths)
    return make_config(
        SFTConfig,
        training,
        **fields,
        # The data module already tokenized, masked and truncated every row (input_ids + labels):
        # TRL only batches. Padding-free batches must not be re-truncated per row, hence max_length=None.
        max_length=data.max_length if data.packing else None,
        packing=data.packing,
        packing_strategy="bfd",
        padding_free=data.padding_free,
        completion_only_loss=None,
        shuffle_dataset=False,  # the data module shuffles with training.seed; the sampler shuffles per epoch
        dataset_kwargs=None,
        remove_unused_columns=True,
    )


def packed_rows_per_batch(training: TrainingSection, data: DataSection, lengths: Sequence[int]) -> int:
    """Packed rows per micro-batch: the fewest that hold, on average, per_device_train_batch_size examples
    as TRL's best-fit-decreasing packing will group them (counted by packing the lengths alone). A packed
    step then holds at least the examples, and so the tokens, of a padding-free step (at most one row more),
    instead of per_device_train_batch_size full rows of max_length (2-10x more). Fewer tokens per step
    would make packing slower per token than padding-free: the per-step costs are the same."""
    import math

    return max(
        1,
        math.ceil(
            training.per_device_train_batch_size * packed_rows(lengths, data.max_length) / len(lengths)
        ),
    )


def packed_rows(lengths: Sequence[int], max_length: int) -> int:
    """How many rows of max_length TRL's best-fit-decreasing packing makes of examples of these lengths."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    # One byte per token: only the lengths matter to the packing.
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(int(offsets[-1]), dtype=np.uint8)))
    packed = pack_dataset(
        Dataset(pa.table({"input_ids": ids})), max_length, strategy="bfd", map_kwargs={"keep_in_memory": True}
    )
    return len(packed)
