"""The `dpo` section: preference tuning of the LoRA adapter with trl's DPOTrainer.

The data module has already tokenized and masked every pair (data/preference.py); the trainer only
batches them. The reference model costs no memory: trl computes it with the adapter disabled (a fresh
adapter, so the base itself) or, when training starts from a finished run's adapter (`init_adapter`),
from a frozen copy of that adapter — never a second copy of the model.

One of the sibling trainer builders (sft.py, dpo.py), with the same few functions; `train/preflight.py`
picks one per recipe. trl is imported at the top: `train` needs it whichever the method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import DPOConfig, DPOTrainer

from loratool.data.preference import build_preference_datasets
from loratool.errors import LoratoolError
from loratool.recipe import recipe_to_dict
from loratool.rundir.records import read_run
from loratool.train.arguments import make_config, trainer_fields

if TYPE_CHECKING:
    from peft import PeftModel

    from loratool.data import PreparedData
    from loratool.recipe import DpoSection, Recipe, TrainingSection

REFERENCE_ADAPTER = "ref"  # the name trl gives its frozen copy of a PeftModel's starting adapter
STAGE = "dpo"  # run.json's "stage"


def check(recipe: Recipe) -> None:
    """Before anything loads: `dpo.init_adapter` names a finished run on the same base and lora section."""
    check_init_adapter(recipe)


def build_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    """Every preference pair read, templated, tokenized and masked (data/preference.py)."""
    return build_preference_datasets(recipe.data, tokenizer, seed=recipe.training.seed)


def record(recipe: Recipe) -> dict[str, Any]:
    """What run.json says about the method: its settings and the reference model."""
    assert recipe.dpo is not None
    init = recipe.dpo.init_adapter
    return {
        "stage": STAGE,
        "dpo": {
            "beta": recipe.dpo.beta,
            "loss_type": recipe.dpo.loss_type,
            "reference": reference_description(recipe),
            "init_adapter": str(Path(init).expanduser().resolve()) if init else None,
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
) -> DPOConfig:
    """The trainer's arguments (`train_lengths` is for packing, which preference batches do not use)."""
    assert recipe.dpo is not None
    return build_dpo_config(
        recipe.training,
        recipe.dpo,
        checkpoints_dir=checkpoints_dir,
        has_validation=has_validation,
        bf16=bf16,
        fp16=fp16,
    )


def prepare_model(
    model: PeftModel, recipe: Recipe, base_fingerprint: str | None, log: Callable[[str], None]
) -> None:
    """Start from the adapter of `dpo.init_adapter`, if set (before the initial adapter is kept and before
    trl copies the starting adapter into its reference)."""
    load_init_adapter(model, recipe, base_fingerprint, log)


def build_trainer(
    model: PeftModel,
    recipe: Recipe,
    *,
    args: DPOConfig,
    data: PreparedData,
    tokenizer: Any,
    callbacks: list[Any],
    optimizer: Any,
    num_processes: int,
) -> PreferenceTrainer:
    """The trainer on the preference pairs (the reference model as the module docstring says)."""
    return build_dpo_trainer(
        model,
        recipe,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        tokenizer=tokenizer,
        callbacks=callbacks,
        optimizer=optimizer,
    )


def before_save(model: PeftModel) -> None:
    """The run saves the trained adapter only, not trl's reference copy."""
    drop_reference_adapter(model)


def build_dpo_config(
    training: TrainingSection,
    dpo: DpoSection,
    *,
    checkpoints_dir: Path,
    has_validation: bool,
    bf16: bool,
    fp16: bool,
) -> DPOConfig:
    fields = trainer_fields(
        training, checkpoints_dir=checkpoints_dir, has_validation=has_validation, bf16=bf16, fp16=fp16
    )
    # trl's DPO trainer turns checkpointing off for each reference pass and back on for every layer, with
    # these kwargs handed to torch's checkpoint as they are: every n-th layer becomes every layer here.
    kwargs = {
        k: v
        for k, v in (fields.get("activation_checkpointing_kwargs") or {}).items()
        if k != "every_n_layers"
    }
    fields["activation_checkpointing_kwargs"] = kwargs or None
    return make_config(
        DPOConfig,
        training,
        **fields,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing,
        max_length=None,  # the data module cut every pair to data.max_length and counted it
        padding_free=False,  # trl 1.x pads preference batches (its padding-free path is disabled)
        remove_unused_columns=True,
    )


class PreferenceTrainer(DPOTrainer):
    """trl's DPOTrainer on pairs that are already tokenized and masked (prompt_ids, chosen_ids,
    rejected_ids). trl's documentation of `evaluate` says its dataset preparation skips tokenized
    datasets; 1.x still renders and tokenizes them again, which needs text columns. Skipping it keeps the
    masks the data summary counted."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


def build_dpo_trainer(
    model: PeftModel,
    recipe: Recipe,
    *,
    args: DPOConfig,
    train_dataset: Any,
    eval_dataset: Any,
    tokenizer: Any,
    callbacks: list[Any],
    optimizer: Any,
) -> PreferenceTrainer:
    """The trainer, with the reference model as the module docstring says."""
    try:
        trainer = PreferenceTrainer(
            model=model,
            ref_model=None,  # the reference comes from the same model: no second copy in memory
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=(optimizer, None),
        )
    except (ValueError, ImportError, NotImplementedError) as exc:
        raise LoratoolError(
            f"trl's DPOTrainer refused this setup: {exc}", hint="check the dpo and training sections"
        ) from None
    drop_unneeded_reference(trainer.model, recipe)
    return trainer


def drop_unneeded_reference(model: PeftModel, recipe: Recipe) -> None:
    """trl's DPO and KTO trainers copy a PeftModel's adapter into a frozen "ref" adapter to compute the
    reference with. A fresh adapter (B = 0) adds nothing to the base, so the base with the adapter disabled
    is the same reference for one adapter less. Non-zero inits (pissa, olora, gaussian...) and an
    init_adapter keep the copy: their starting model is base + initial adapter, which disabling the
    adapter would not give."""
    if init_adapter_setting(recipe)[1] is None and recipe.lora.init_lora_weights is True:
        drop_reference_adapter(model)


def drop_reference_adapter(model: PeftModel) -> None:
    """Remove trl's frozen reference copy, if any, so that only the trained adapter is saved."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter("default")


def reference_description(recipe: Recipe) -> str:
    """What the run used as its reference model, for run.json."""
    if init_adapter_setting(recipe)[1] is not None:
        return "base + init_adapter (a frozen copy)"
    if recipe.lora.init_lora_weights is True:
        return "base (adapter disabled)"
    return "base + initial adapter (a frozen copy)"


# ---------------------------------------------------------------------------------------------------------
# Starting from a finished run's adapter
# ---------------------------------------------------------------------------------------------------------


def init_adapter_setting(recipe: Recipe) -> tuple[str, str | None]:
    """The key and value of the method section's `init_adapter` (dpo or kto): ("kto.init_adapter", None)."""
    section = getattr(recipe, recipe.stage, None)
    return f"{recipe.stage}.init_adapter", getattr(section, "init_adapter", None)


def check_init_adapter(recipe: Recipe, base_fingerprint: str | None = None) -> Path | None:
    """The run directory `dpo.init_adapter` (or `kto.init_adapter`) names, checked to be a finished
    loratool run on the same base (and, given `base_fingerprint`, the same weights) with the same `lora`
    section; None when unset."""

    key, value = init_adapter_setting(recipe)
    if value is None:
        return None
    path = Path(value).expanduser().resolve()
    record = read_run(path) if path.is_dir() else None
    if record is None:
        raise LoratoolError(
            f"{key}: {path} is not a loratool run directory",
            hint="point it at the training.output_dir of a finished `loratool train` run (the adapter to "
            "start from), or remove it to start from a fresh adapter",
        )
    if not record.complete or not (path / "adapter_config.json").is_file():
        raise LoratoolError(
            f"{key}: the run in {path} did not finish (status: {record.status})",
            hint=f"finish it first (`loratool train {path / 'recipe.yaml'} --resume`), or use another run",
        )
    if record.base_model.id != recipe.base_model:
        raise LoratoolError(
            f"{key}: the run in {path} trained on {record.base_model.id}, this recipe on {recipe.base_model}",
            hint="an adapter only fits the base it was trained on; use the same base_model",
        )
    if (
        base_fingerprint
        and record.base_model.fingerprint
        and record.base_model.fingerprint != base_fingerprint
    ):
        raise LoratoolError(
            f"{key}: the weights of {recipe.base_model} changed since the run in {path} trained on them",
            hint="train the starting adapter again on these weights, or restore the base it was trained on",
        )
    theirs = (record.recipe_dict() or {}).get("lora") or {}
    ours = recipe_to_dict(recipe)["lora"]
    different = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if different:
        shown = "; ".join(f"lora.{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in different)
        raise LoratoolError(
            f"{key}: the adapter of {path} was built with another lora section ({shown})",
            hint=f"copy the lora section of {path / 'recipe.yaml'} into this recipe",
        )
    return path


def load_init_adapter(
    model: PeftModel, recipe: Recipe, base_fingerprint: str | None, log: Callable[[str], None]
) -> None:
    """Put the weights of `dpo.init_adapter` (or `kto.init_adapter`) into the freshly attached adapter."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    path = check_init_adapter(recipe, base_fingerprint)
    if path is None:
        return
    weights = load_peft_weights(str(path), device="cpu")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise LoratoolError(
            f"{init_adapter_setting(recipe)[0]}: the adapter in {path} does not fit this model's adapter "
            f"({len(missing)} weights missing, {len(result.unexpected_keys)} unexpected, e.g. "
            f"{(missing or result.unexpected_keys)[0]})",
            hint="use a run trained on the same base with the same lora section",
        )
    log(f"adapter: starting from {path} (also the reference model)")
