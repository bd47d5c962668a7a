"""`loratool train`: recipe in, run directory out. `run_train` reads top to bottom like the run it performs;
the steps it names follow it in the same order."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from loratool.adapter import inits
from loratool.adapter.lora import attach_adapter
from loratool.model.load import load_model
from loratool.recipe import Recipe, recipe_to_dict
from loratool.rundir.metrics import plot_loss_curve, read_metrics
from loratool.rundir.model_card import finish_adapter_dir, mark_smoke_run
from loratool.rundir.records import LOSS_CURVE, RunDir, RunRecord
from loratool.train import heartbeat, memory
from loratool.train.divergence import check_finite_adapter
from loratool.train.failures import as_training_error
from loratool.train.preflight import Preflight, preflight_every_process
from loratool.train.processes import main_holds_output, on_main_first, processes, quiet
from loratool.train.record import finish_record, new_record
from loratool.train.resume import continue_run, resume_point
from loratool.train.runlog import RunLog
from loratool.train.trainer import Training, build_trainer, eval_trend, final_evaluation, whole_adapter_state


def run_train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
    smoke: dict[str, Any] | None = None,
) -> Path:
    """Fine-tune `recipe.base_model` with a LoRA adapter and return the finished run directory. `smoke`:
    the record of a smoke run (smoke.py), kept in run.json and on the model card."""
    from transformers import set_seed  # deferred: transformers loads torch

    limit = heartbeat.wait_limit_here(recipe.training.ddp_timeout)  # seconds one process waits for the others
    started, state = time.time(), processes(limit)
    log = log if state.is_main_process else quiet  # every process runs this under a launcher; one reports
    with (
        RunLog() as run_log,
        heartbeat.watching(state, limit),
        main_holds_output(state, output_path(recipe), log),
    ):
        # 1. Every input checked and every data row tokenized before any weights load (main process first).
        checks = preflight_every_process(state, recipe, overwrite=overwrite, resume=resume, log=log)
        record = new_record(recipe, checks, world_size=state.num_processes, started=started, smoke=smoke)
        checkpoint, resumed = None, None
        if resume:  # the main process reads the record; every process resumes from the checkpoint it picked
            checkpoint, resumed = on_main_first(
                state, lambda: resume_point(recipe, checks.run, record, log), share=True
            )
        # 2. The base, with the adapter attached and the memory savers installed.
        set_seed(recipe.training.seed)
        model, parameters, record = load_with_adapter(recipe, checks, record, log)
        # 3. The run directory is created (or emptied of the previous run) only now that data and model loaded.
        run, record = start_run(state, recipe, record, resumed, overwrite, resume, run_log, log)
        try:
            # 4. The method's trainer (sft.py or dpo.py) with loratool's callbacks, then the training itself.
            initial = on_main_first(state, lambda: inits.keep_initial_adapter(model, run.checkpoints, log))
            training = build_trainer(
                model, recipe, checks, run, checkpoint, num_processes=state.num_processes,
                base_fingerprint=record.base_model.fingerprint,
            )  # fmt: skip
            heartbeat.wait_for_main_saves(training.trainer)
            result = training.trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            final_eval = final_evaluation(training.trainer) if checks.data.validation is not None else {}
            record = finish_record(
                record, training, result.training_loss, final_eval, parameters, checks.hw, started
            )
            # 5. The adapter and what reproduces it, written last: run.finish renames them into place.
            checks.method.before_save(training.trainer.model)
            adapter_state = whole_adapter_state(training.trainer.model)  # collective: FSDP shards the adapter
            if state.is_main_process:
                check_finite_adapter(training.trainer.model)
                write = functools.partial(
                    write_adapter_dir, recipe, checks, run, training, record, adapter_state, initial
                )
                run.finish(write, record)
        except BaseException as exc:
            cause = heartbeat.explain(exc)  # another process failed or stopped answering: name it
            if state.is_main_process:
                run.fail(record, cause)
            raise as_training_error(cause, run) from exc
        log(summary(record, training.trainer, final_eval))  # inside: train.log keeps these lines too
        log(f"adapter written to {run.path}")
    return run.path


def output_path(recipe: Recipe) -> Path:
    return Path(recipe.training.output_dir).expanduser().resolve()


def load_with_adapter(
    recipe: Recipe, checks: Preflight, record: RunRecord, log: Callable[[str], None]
) -> tuple[Any, tuple[int, int], RunRecord]:
    """The base on this hardware with the recipe's adapter attached (its init computed from the training
    rows where it needs data) and the memory savers installed; the (trainable, total) parameter counts;
    the record with the init that was used."""
    model = load_model(recipe, checks.hw, log, base=checks.base)
    model = attach_adapter(
        model,
        recipe.lora,
        quantized=recipe.is_quantized(),
        gradient_checkpointing=recipe.training.gradient_checkpointing,
        calibration=inits.calibration_data(
            recipe.lora,
            checks.data.train,
            checks.tokenizer,
            batch_size=recipe.training.per_device_train_batch_size,
            device=model.device,
        ),
        log=log,
    )
    savers = memory.apply(model, checks.hw)
    record = replace(record, memory_savers=savers.record())
    log(f"memory savers: {savers.describe()}")
    checks.method.prepare_model(model, recipe, record.base_model.fingerprint, log)  # DPO: init_adapter
    trainable, total = model.get_nb_trainable_parameters()
    log(f"adapter: {trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})")
    if (adapter_init := inits.init_record(recipe.lora, model)) is not None:
        record = replace(record, adapter_init=adapter_init)
    return model, (trainable, total), record


def start_run(
    state: Any,
    recipe: Recipe,
    record: RunRecord,
    resumed: dict[str, Any] | None,
    overwrite: bool,
    resume: bool,
    run_log: RunLog,
    log: Callable[[str], None],
) -> tuple[RunDir, RunRecord]:
    """The run directory, started afresh (run.json "running", recipe.yaml) or continued at the resume
    point, by the main process; train.log from here on lands in it. The others only learn where it is."""

    def on_main() -> tuple[RunDir, RunRecord]:
        run = RunDir.prepare(recipe.training.output_dir, overwrite=overwrite, resume=resume, log=log)
        if resumed is not None:
            continued = continue_run(run, record, resumed, log)
            run.write_recipe(recipe_to_dict(recipe))
        else:
            continued = record
            run.start(recipe_to_dict(recipe), record)
        run_log.attach(run.log_file, resumed=resumed is not None)
        return run, continued

    started = on_main_first(state, on_main)
    return started if started is not None else (RunDir(output_path(recipe)), record)


def write_adapter_dir(
    recipe: Recipe,
    checks: Preflight,
    run: RunDir,
    training: Training,
    record: RunRecord,
    adapter_state: dict[str, Any] | None,
    initial: Path | None,
    folder: Path,
) -> None:
    """The finished run's files, into the staging folder that run.finish moves into place: the adapter
    (converted when its init changed the base), the tokenizer with the chat template the data was rendered
    with, the loss curve and the model card."""
    inits.save_adapter(training.trainer.model, folder, adapter_state, initial)
    checks.tokenizer.save_pretrained(folder)
    plot_loss_curve(
        read_metrics(run.metrics), folder / LOSS_CURVE, title=f"{run.path.name} · LoRA on {recipe.base_model}"
    )
    finish_adapter_dir(folder, recipe_to_dict(recipe), record)  # model card, the real base's name
    if record.smoke is not None:
        mark_smoke_run(folder / "README.md")


def summary(record: RunRecord, trainer: Any, final_eval: dict[str, float]) -> str:
    """The run's last line: time, steps, tokens and losses."""
    train = record.train
    return (
        f"done in {record.wall_time_s:.0f}s: {train['global_step']} steps, "
        f"{train['tokens_trained']:,} tokens, train loss {train['train_loss']:.4f}"
        + (f", validation loss {eval_trend(trainer, final_eval)}" if final_eval else "")
    )
