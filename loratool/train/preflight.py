"""What `train` and `train --dry-run` check and load before any weights: every input, the hardware and
launch rules, the values only the libraries know, the output directory, the tokenizer and every data row.

It also picks the method's trainer builder (sft.py, dpo.py, kto.py, reward.py, ...): the one place where the
methods part ways."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from loratool.errors import LoratoolError
from loratool.model import hardware
from loratool.model.load import Base, load_tokenizer, resolve_base
from loratool.recipe import Recipe
from loratool.rundir.records import CHECKPOINTS, RunDir
from loratool.train import dpo, grpo, kto, reward, sft
from loratool.train.arguments import check_enum_values, check_report_to
from loratool.train.inputs import check_inputs
from loratool.train.processes import on_main_first


@dataclass
class Preflight:
    """What the checks found and loaded: see `preflight`."""

    hw: hardware.Hardware
    base: Base  # resolved once here (a .gguf converted), handed to everything that loads or records it
    run: RunDir
    tokenizer: Any
    data: Any  # PreparedData: the training and validation rows, tokenized and masked, with their summary
    method: ModuleType  # the trainer builder: train/sft.py, dpo.py, kto.py, reward.py, ...


def method_of(recipe: Recipe) -> ModuleType:
    """The trainer builder of the recipe's method (`recipe.stage`: its one method section, or sft)."""
    methods = {"sft": sft, "dpo": dpo, "kto": kto, "reward": reward, "grpo": grpo, "rloo": grpo}
    return methods[recipe.stage]


def preflight_every_process(
    state: Any, recipe: Recipe, *, overwrite: bool, resume: bool, log: Callable[[str], None]
) -> Preflight:
    """`preflight` on the main process first (it fills the datasets cache), then on the others."""
    return on_main_first(
        state,
        lambda: preflight(recipe, overwrite=overwrite, resume=resume, log=log),
        then_others=lambda: preflight(
            recipe, overwrite=overwrite, resume=resume, log=log, main_process=False
        ),
    )


def preflight(
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: bool,
    log: Callable[[str], None],
    main_process: bool = True,
) -> Preflight:
    """The checks, in order; nothing is written. The output directory belongs to the main process: the
    others skip its check (by the time they run it, the main process may already have started the run)."""
    check_inputs(recipe, log)  # base model, tokenizer, every data source: all missing ones in one error
    if resume and recipe.lora.method == "adalora":
        raise LoratoolError(
            "--resume: an AdaLoRA run cannot be continued (its checkpoints keep the ranks of their step but not "
            "the importance scores that move them)",
            hint="train it again with --overwrite",
        )
    hw = hardware.detect()
    hardware.check(recipe, hw)
    check_trainer_settings(recipe, hw)  # library-only values (optim, lr_scheduler_type, report_to, ...)
    if main_process:
        run = RunDir.prepare(
            recipe.training.output_dir, overwrite=overwrite, resume=resume, dry_run=True, log=log
        )
    else:
        run = RunDir(Path(recipe.training.output_dir).expanduser().resolve())
    base = resolve_base(recipe.base_model, recipe.model.revision, log)
    tokenizer = load_tokenizer(base, recipe.model, log)
    method = method_of(recipe)
    method.check(recipe)
    data = method.build_data(recipe, tokenizer)
    log(data.summary.format())
    return Preflight(hw, base, run, tokenizer, data, method)


def check_trainer_settings(recipe: Recipe, hw: hardware.Hardware | None = None) -> None:
    """Build the trainer's settings exactly as training will, so that a value only the libraries know
    (training.optim, lr_scheduler_type, report_to, any pass-through SFTConfig field) is refused before
    anything is written or loaded. The configs only validate: they create no directory and write no file."""
    check_report_to(recipe.training)
    check_enum_values(recipe.training)
    hw = hw or hardware.detect()
    bf16, fp16 = hardware.mixed_precision(recipe, hw)
    method_of(recipe).build_config(
        recipe,
        checkpoints_dir=Path(recipe.training.output_dir).expanduser().resolve() / CHECKPOINTS,
        has_validation=recipe.data.validation is not None,
        bf16=bf16,
        fp16=fp16,
    )
