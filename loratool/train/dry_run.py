"""`loratool train --dry-run`: everything `train` checks before loading weights, and what it would train."""

from __future__ import annotations

import time
from collections.abc import Callable

from loratool.adapter.inits import shapes_only
from loratool.adapter.lora import attach_adapter
from loratool.model import hardware
from loratool.model.load import model_from_config
from loratool.recipe import Recipe
from loratool.train.plan import dry_run_line
from loratool.train.preflight import preflight
from loratool.train.processes import processes, quiet
from loratool.train.record import new_record
from loratool.train.resume import resume_point


def dry_run(
    recipe: Recipe, *, overwrite: bool = False, resume: bool = False, log: Callable[[str], None] = print
) -> None:
    """Everything `train` checks and resolves before loading weights, with nothing written to disk: the
    shared preflight (hardware, library values, output directory, tokenizer, every data row), the resume
    contract with --resume, and the adapter's target modules and size on a weightless (meta-device) copy
    of the model. The exception: a .gguf base is converted to its cached checkpoint (as training would),
    since that is what is checked."""
    import torch
    from transformers import AutoConfig

    state = processes()
    if not state.is_main_process:
        log = quiet  # under a launcher, the main process reports for all
    checks = preflight(recipe, overwrite=overwrite, resume=resume, log=log)
    hw, run = checks.hw, checks.run
    if resume:
        record = new_record(recipe, checks, world_size=state.num_processes, started=time.time(), smoke=None)
        resume_point(recipe, run, record, log)
    config = AutoConfig.from_pretrained(
        checks.base.source,  # resolved (a .gguf converted) once, by the preflight
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    with torch.device("meta"):
        model = model_from_config(recipe, config)  # a reward model: with its score head
    model = attach_adapter(model, shapes_only(recipe.lora), quantized=False, gradient_checkpointing=False)
    trainable, total = model.get_nb_trainable_parameters()
    bf16, fp16 = hardware.mixed_precision(recipe, hw)
    precision = (
        "bf16 mixed"
        if bf16
        else "fp16 mixed"
        if fp16
        else str(hardware.compute_dtype(recipe, hw)).removeprefix("torch.")
    )
    log(f"hardware: {hw.device} ({hw.name}) · compute in {precision}")
    log(f"adapter: {trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})")
    log(f"output: {run.path} ({run.state()})")
    log(dry_run_line(recipe, config, hw, checks.data))
