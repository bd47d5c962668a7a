"""The `training` section as a trainer's arguments: the transformers.TrainingArguments part every trl config
(SFTConfig, DPOConfig) shares, and the checks of values only the libraries know."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loratool.errors import LoratoolError
from loratool.train.heartbeat import wait_limit_here

if TYPE_CHECKING:
    from loratool.recipe import TrainingSection

_Config = TypeVar("_Config")
_OURS_NOT_SFT = {"warmup_ratio", "warmup_steps", "early_stopping_patience", "early_stopping_threshold"}
# How the library's enum-typed settings are named in messages.
_WHAT = {"optim": "optimizer", "lr_scheduler_type": "learning-rate scheduler"}


def trainer_fields(
    training: TrainingSection, *, checkpoints_dir: Path, has_validation: bool, bf16: bool, fp16: bool
) -> dict[str, Any]:
    """The `training` section as keyword arguments of any trl config (SFTConfig, DPOConfig): the
    transformers.TrainingArguments part, with loratool's defaults and the strategies it derives."""
    fields = training.model_dump(
        exclude=_OURS_NOT_SFT
        | {"output_dir", "eval_steps", "save_steps", "bf16", "fp16", "gradient_checkpointing", "ddp_timeout"}
    )
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    fields["activation_checkpointing"] = bool(training.gradient_checkpointing)
    if checkpoint_every_n_layers(training) > 1:
        check_every_n_layers_supported(training.gradient_checkpointing)
        fields["activation_checkpointing_kwargs"] = {
            **(fields.get("activation_checkpointing_kwargs") or {}),
            "every_n_layers": checkpoint_every_n_layers(training),
        }
    # Defaults a recipe may override with a pass-through key (e.g. disable_tqdm: true for log files).
    # Under several processes (DDP) every adapter weight takes part in every forward pass, so DDP need not
    # search the graph for unused parameters (transformers turns that search on without checkpointing).
    # With validation data, one evaluation before the first step shows where the base started (the loss
    # curve's step-0 point): a pass over the validation set, usually seconds.
    fields = {
        "disable_tqdm": False,
        "include_num_input_tokens_seen": "non_padding",
        "ddp_find_unused_parameters": False,
        "eval_on_start": has_validation,
        **fields,
    }
    fields.update(training.model_extra or {})
    eval_strategy = "no" if not has_validation else ("steps" if training.eval_steps else "epoch")
    # Early stopping restores the best checkpoint, so checkpoints must line up with evaluations.
    early = training.early_stopping_patience is not None
    save_steps = training.save_steps or (training.eval_steps if early else None)
    return {
        **fields,
        "output_dir": str(checkpoints_dir),
        "bf16": bf16,
        "fp16": fp16,
        "warmup_steps": training.resolved_warmup(),
        # The process group already has this timeout (processes.py creates it); said again for the record.
        "ddp_timeout": wait_limit_here(training.ddp_timeout),
        "eval_strategy": eval_strategy,
        "eval_steps": training.eval_steps,
        "save_strategy": "steps" if save_steps else "epoch",
        "save_steps": save_steps or 500,
        "load_best_model_at_end": early,
        "metric_for_best_model": "eval_loss" if early else None,
        "greater_is_better": False if early else None,
    }


def make_config(config_class: type[_Config], training: TrainingSection, **fields: Any) -> _Config:
    """`config_class(**fields)`, with the library's refusal as a LoratoolError naming the recipe keys."""
    try:
        return config_class(**fields)
    except (TypeError, ValueError) as exc:
        # Name the recipe keys the library's message mentions ("--save_steps ...", "optim ..."), if any.
        given = sorted(set(training.model_fields_set) | set(training.model_extra or {}))
        named = [key for key in given if re.search(rf"\b{re.escape(key)}\b", str(exc))]
        where = ", ".join(f"training.{key}" for key in named) or "training"
        raise LoratoolError(
            f"{where}: the trainer rejected the settings: {exc}",
            hint=f"check the training section against trl.{config_class.__name__} / "
            "transformers.TrainingArguments",
        ) from None


def check_enum_values(training: TrainingSection) -> None:
    """Values of SFTConfig's enum-typed fields (optim, lr_scheduler_type, save_strategy, ...) checked against
    the library's own enums, every wrong one named with its key and the closest valid value. SFTConfig
    would refuse them too, but with the enum's name and one value at a time."""
    import dataclasses
    import enum
    import typing

    from trl import SFTConfig

    given = {**training.model_dump(), **(training.model_extra or {})}
    problems, valid_lists = [], []
    for field in dataclasses.fields(SFTConfig):
        value = given.get(field.name)
        enums = [t for t in typing.get_args(field.type) if isinstance(t, type) and issubclass(t, enum.Enum)]
        if not isinstance(value, str) or not enums:
            continue
        valid = [str(member.value) for member in enums[0]]
        if value in valid:
            continue
        close = difflib.get_close_matches(value, valid, n=1)
        what = _WHAT.get(field.name, "value")
        problems.append(
            f"training.{field.name}: {value!r} is not a valid {what}"
            + (f" — did you mean {close[0]}?" if close else "")
        )
        valid_lists.append(f"{field.name}: {', '.join(valid)}")
    if problems:
        raise LoratoolError(
            "\n".join(problems),
            hint="valid values (from transformers' own list) — " + "; ".join(valid_lists),
        )


def check_report_to(training: TrainingSection) -> None:
    """Refuse experiment trackers that are not installed before anything loads (the trainer would only
    fail after the model is in memory)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    wanted = [training.report_to] if isinstance(training.report_to, str) else list(training.report_to)
    wanted = [w for w in wanted if w not in ("none", "all")]
    unknown = [w for w in wanted if w not in INTEGRATION_TO_CALLBACK]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(INTEGRATION_TO_CALLBACK), n=1)
        raise LoratoolError(
            f"training.report_to: unknown tracker {', '.join(unknown)}"
            + (f" — did you mean {close[0]}?" if close else ""),
            hint=f"choose from none, all, {', '.join(sorted(INTEGRATION_TO_CALLBACK))}",
        )
    available = set(get_available_reporting_integrations())
    missing = [w for w in wanted if w not in available]
    if missing:
        raise LoratoolError(
            f"training.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed",
            hint=f"pip install {' '.join(missing)} into loratool's environment, or set training.report_to: none "
            "(metrics.jsonl and loss_curve.png are written either way)",
        )


def checkpoint_every_n_layers(training: TrainingSection) -> int:
    """1 when every decoder layer is checkpointed (or none: see `gradient_checkpointing`), else n."""
    value = training.gradient_checkpointing
    return 1 if isinstance(value, bool) else value


def check_every_n_layers_supported(n: int) -> None:
    """transformers gained `every_n_layers` within 5.x; an older one would hand it to torch's checkpoint,
    which fails at the first step. Refuse before training starts."""
    import inspect

    from transformers import PreTrainedModel, __version__

    enable = getattr(PreTrainedModel, "activation_checkpointing_enable", None)
    if enable is None or "every_n_layers" not in inspect.signature(enable).parameters:
        raise LoratoolError(
            f"training.gradient_checkpointing: {n} checkpoints one decoder layer in {n}, which needs a "
            f"transformers with every_n_layers; {__version__} has none",
            hint="upgrade transformers (pip install -U 'transformers<6'), or set "
            "training.gradient_checkpointing to true or false",
        )
