"""The `kto` section: preference tuning of the LoRA adapter from unpaired judgements with trl's KTOTrainer.

The data module has already tokenized and masked every row (data/unpaired.py: prompt_ids, completion_ids,
label); the trainer adds the mismatched completions of its KL estimate and batches them. The reference
model is the one DPO uses (dpo.py): the base with the adapter disabled, or a frozen copy of the starting
adapter (`init_adapter`, a non-zero init) — never a second copy of the model.

One of the sibling trainer builders (sft.py, dpo.py, kto.py, ...), with the same few functions;
`train/preflight.py` picks one per recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import KTOConfig, KTOTrainer

from loratool.data.unpaired import build_unpaired_datasets
from loratool.errors import LoratoolError
from loratool.train.arguments import make_config, trainer_fields
from loratool.train.dpo import (
    check_init_adapter,
    drop_reference_adapter,
    drop_unneeded_reference,
    load_init_adapter,
    reference_description,
)

if TYPE_CHECKING:
    from peft import PeftModel

    from loratool.data import PreparedData
    from loratool.recipe import KtoSection, Recipe

STAGE = "kto"  # run.json's "stage"


def check(recipe: Recipe) -> None:
    """Before anything loads: `kto.init_adapter` names a finished run on the same base and lora section."""
    check_init_adapter(recipe)


def build_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    """Every row read, templated, tokenized and masked (data/unpaired.py), with trl's warning about the
    desirable / undesirable balance given before training rather than in its log."""
    assert recipe.kto is not None
    data = build_unpaired_datasets(recipe.data, tokenizer, seed=recipe.training.seed)
    labels = data.train["label"]
    if warning := weight_warning(recipe.kto, sum(labels), len(labels) - sum(labels)):
        data.summary.warnings.append(warning)
    return data


def weight_warning(kto: KtoSection, desirable: int, undesirable: int) -> str | None:
    """The KTO paper's rule (its Eq. 8, as trl checks it): with unequal counts, desirable_weight *
    desirable / (undesirable_weight * undesirable) should lie in [1, 4/3]. None when it does (or when
    one kind is missing: data/unpaired.py warns about that)."""
    if not desirable or not undesirable or desirable == undesirable:
        return None
    ratio = kto.desirable_weight * desirable / (kto.undesirable_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    low = undesirable * kto.undesirable_weight / desirable
    return (
        f"train: {desirable:,} desirable and {undesirable:,} undesirable completions, weighted "
        f"{kto.desirable_weight} and {kto.undesirable_weight}: the KTO paper recommends "
        f"kto.desirable_weight between {low:.2f} and {low * 4 / 3:.2f} for this balance"
    )


def record(recipe: Recipe) -> dict[str, Any]:
    """What run.json says about the method: its settings and the reference model."""
    assert recipe.kto is not None
    kto = recipe.kto
    return {
        "stage": STAGE,
        "kto": {
            "beta": kto.beta,
            "loss_type": kto.loss_type,
            "desirable_weight": kto.desirable_weight,
            "undesirable_weight": kto.undesirable_weight,
            "reference": reference_description(recipe),
            "init_adapter": str(Path(kto.init_adapter).expanduser().resolve()) if kto.init_adapter else None,
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
) -> KTOConfig:
    """The trainer's arguments (`train_lengths` is for packing, which KTO batches do not use)."""
    assert recipe.kto is not None
    kto = recipe.kto
    fields = trainer_fields(
        recipe.training,
        checkpoints_dir=checkpoints_dir,
        has_validation=has_validation,
        bf16=bf16,
        fp16=fp16,
    )
    # As for DPO (dpo.py): trl turns checkpointing off for each reference pass and back on for every layer.
    kwargs = {
        k: v
        for k, v in (fields.get("activation_checkpointing_kwargs") or {}).items()
        if k != "every_n_layers"
    }
    fields["activation_checkpointing_kwargs"] = kwargs or None
    return make_config(
        KTOConfig,
        recipe.training,
        **fields,
        beta=kto.beta,
        loss_type=kto.loss_type,
        desirable_weight=kto.desirable_weight,
        undesirable_weight=kto.undesirable_weight,
        max_length=None,  # the data module cut every row to data.max_length and counted it
        # The KL term pairs each row with its neighbour's completion in a fixed order; the data module
        # shuffled the rows once with training.seed.
        train_sampling_strategy="sequential",
        remove_unused_columns=True,
    )


def prepare_model(
    model: PeftModel, recipe: Recipe, base_fingerprint: str | None, log: Callable[[str], None]
) -> None:
    """Start from the adapter of `kto.init_adapter`, if set (before trl copies it into its reference)."""
    load_init_adapter(model, recipe, base_fingerprint, log)


class UnpairedTrainer(KTOTrainer):
    """trl's KTOTrainer on rows that are already tokenized and masked (prompt_ids, completion_ids, label).
    trl's dataset preparation would render and tokenize them again, which needs text columns; of it, only
    the KL completions are added here, as trl builds them."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not self.calculate_KL:
            return dataset
        return dataset.map(
            with_kl_completions,
            batched=True,
            batch_size=args.per_device_train_batch_size,
            desc=f"KL completions of the {dataset_name} rows",
        )


def with_kl_completions(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """trl's KL estimate: each row's prompt with the previous row's completion, within a micro-batch
    ((x1, y_n), (x2, y1), ..., (x_n, y_{n-1})), so the KL completions are the batch's own completions."""
    completions = rows["completion_ids"]
    return {**rows, "KL_completion_ids": [completions[-1], *completions[:-1]]}


def build_trainer(
    model: PeftModel,
    recipe: Recipe,
    *,
    args: KTOConfig,
    data: PreparedData,
    tokenizer: Any,
    callbacks: list[Any],
    optimizer: Any,
    num_processes: int,
) -> UnpairedTrainer:
    """The trainer on the judged rows (the reference model as the module docstring says)."""
    try:
        trainer = UnpairedTrainer(
            model=model,
            ref_model=None,  # the reference comes from the same model: no second copy in memory
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=(optimizer, None),
        )
    except (ValueError, ImportError, NotImplementedError) as exc:
        raise LoratoolError(
            f"trl's KTOTrainer refused this setup: {exc}", hint="check the kto and training sections"
        ) from None
    drop_unneeded_reference(trainer.model, recipe)
    return trainer


def before_save(model: PeftModel) -> None:
    """The run saves the trained adapter only, not trl's reference copy."""
    drop_reference_adapter(model)
