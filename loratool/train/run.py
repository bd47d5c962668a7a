"""`loratool train`: recipe in, run directory out. Reads top to bottom like the run it performs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool import __version__
from loratool.adapter import inits as lora_init
from loratool.adapter.lora import attach_adapter, build_optimizer, keep_adapter_in
from loratool.data import build_datasets
from loratool.errors import InternalError, LoratoolError
from loratool.model import hardware
from loratool.model.fingerprint import fingerprint_matches, weights_fingerprint
from loratool.model.gguf_base import gguf_record, is_gguf, resolve_base_model
from loratool.model.load import load_model, load_tokenizer, local_model_dir
from loratool.recipe import Recipe, recipe_to_dict
from loratool.rundir.outputs import command_line, output_lock, remove_entry
from loratool.rundir.records import LOSS_CURVE, TRACEBACK, RunDir, is_disk_full, read_run
from loratool.rundir.signals import terminate_as_interrupt
from loratool.train.divergence import DivergenceGuard, check_finite_adapter
from loratool.train.inputs import check_inputs
from loratool.train.progress import ConciseProgress, MetricsLog, plot_loss_curve, read_metrics, trim_metrics
from loratool.train.resume import check_resume, tokenizer_sha256
from loratool.train.runlog import RunLog
from loratool.train.sft import build_sft_config, check_trainer_settings
from loratool.train.validation_loss import pad_for_processes, report_token_weighted_eval_loss


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
    # Under `accelerate launch` or `torchrun` every process runs this function; only the main one prints,
    # holds the output's lock and touches the run directory (the trainer saves checkpoints from it only).
    state = processes()
    output_dir = Path(recipe.training.output_dir).expanduser().resolve()
    with RunLog() as run_log, ExitStack() as held:
        if not state.is_main_process:
            log = _quiet
        on_main_first(state, lambda: held.enter_context(output_lock(output_dir, command_line(), log)))
        if state.is_main_process:
            held.enter_context(terminate_as_interrupt())
        return _train(recipe, overwrite=overwrite, resume=resume, log=log, run_log=run_log, smoke=smoke)


def _train(
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: bool,
    log: Callable[[str], None],
    run_log: RunLog,
    smoke: dict[str, Any] | None = None,
) -> Path:
    import torch
    from accelerate import PartialState
    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTTrainer

    from loratool.train.checkpoints import CheckpointSeal
    from loratool.train.memory.cheap_recompute import recompute_cheap_activations
    from loratool.train.memory.lora_dropout import keep_masks_not_copies
    from loratool.train.memory.loss_positions import score_only_loss_positions, small_vocab_tiles_on_cpu

    started = time.time()
    state = PartialState()
    main_process = state.is_main_process
    # The main process checks first (and fills the datasets cache); the others follow once it has passed.
    checks = on_main_first(
        state,
        lambda: preflight(recipe, overwrite=overwrite, resume=resume, log=log),
        then_others=lambda: preflight(
            recipe, overwrite=overwrite, resume=resume, log=log, main_process=False
        ),
    )
    hw, tokenizer, data = checks.hw, checks.tokenizer, checks.data
    manifest = {
        **_manifest_header(recipe, hw, started),
        **_layout(recipe, state.num_processes),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "data": data.summary.to_dict(),
        **_stage_record(recipe),
        **({"smoke": smoke} if smoke is not None else {}),
    }
    checkpoint, resume_entry = None, None
    if resume:
        # The main process reads the record; every process resumes from the checkpoint it picked.
        checkpoint, resume_entry = on_main_first(
            state, lambda: _check_resume(recipe, checks.run, manifest, log), share=True
        )

    set_seed(recipe.training.seed)
    log(f"loading {recipe.base_model} on {hw.device} ({hw.name})")
    model = load_model(recipe, hw, log)
    model = attach_adapter(
        model,
        recipe.lora,
        quantized=recipe.is_quantized(),
        gradient_checkpointing=recipe.training.gradient_checkpointing,
        calibration=lora_init.calibration_data(
            recipe.lora,
            data.train,
            tokenizer,
            batch_size=recipe.training.per_device_train_batch_size,
            device=model.device,
        ),
        log=log,
    )
    keep_masks_not_copies(model)  # the same dropout, a fraction of its memory and time (lora_dropout.py)
    score_only_loss_positions()  # the LM head skips rows without loss on CPU too (loss_positions.py)
    if hw.device == "cpu":
        small_vocab_tiles_on_cpu()  # the LM head's backward in smaller, faster tiles (loss_positions.py)
    recompute_cheap_activations(model)  # norm and MLP outputs rebuilt, not kept (cheap_recompute.py)
    if recipe.dpo is not None and recipe.dpo.init_adapter is not None:
        from loratool.train.dpo import load_init_adapter

        load_init_adapter(model, recipe, manifest["base_model"]["fingerprint"], log)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"adapter: {trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})")
    if (adapter_init := lora_init.init_record(recipe.lora, model)) is not None:
        manifest["adapter_init"] = adapter_init

    # The run directory is created (or emptied of the previous run) only now that data and model loaded.
    def start_run() -> tuple[RunDir, dict[str, Any]]:
        run = RunDir.prepare(recipe.training.output_dir, overwrite=overwrite, resume=resume, log=log)
        if resume_entry is not None:
            started_manifest = _continue_record(run, manifest, resume_entry, log)
            run.write_recipe(recipe_to_dict(recipe))
        else:
            started_manifest = manifest
            run.start(recipe_to_dict(recipe), manifest)
        run_log.attach(run.log_file, resumed=resume_entry is not None)
        return run, started_manifest

    started_run = on_main_first(state, start_run)
    if started_run is not None:
        run, manifest = started_run
    else:
        run = RunDir(Path(recipe.training.output_dir).expanduser().resolve())
    try:
        # Base-changing inits: the adapter before the first step, to convert the final one (lora_init.py).
        initial = on_main_first(state, lambda: lora_init.keep_initial_adapter(model, run.checkpoints, log))
        bf16, fp16 = hardware.mixed_precision(recipe, hw)
        if recipe.dpo is not None:
            from loratool.train.dpo import build_dpo_config, build_dpo_trainer

            args = build_dpo_config(
                recipe.training,
                recipe.dpo,
                checkpoints_dir=run.checkpoints,
                has_validation=data.validation is not None,
                bf16=bf16,
                fp16=fp16,
            )
        else:
            args = build_sft_config(
                recipe.training,
                recipe.data,
                checkpoints_dir=run.checkpoints,
                has_validation=data.validation is not None,
                bf16=bf16,
                fp16=fp16,
                train_lengths=_lengths(data.train) if recipe.data.packing else None,
            )
        if checkpoint is not None:
            args.eval_on_start = False  # the step-0 evaluation was logged by the first part of the run
        seal = CheckpointSeal(resumed_from=checkpoint)
        callbacks: list[Any] = [MetricsLog(run.metrics), seal]
        if recipe.training.early_stopping_patience is not None:
            callbacks.append(
                EarlyStoppingCallback(
                    recipe.training.early_stopping_patience, recipe.training.early_stopping_threshold
                )
            )
        if recipe.dpo is not None:  # preference pairs: the same run, another trainer (dpo.py)
            trainer = build_dpo_trainer(
                model,
                recipe,
                args=args,
                train_dataset=data.train,
                eval_dataset=data.validation,
                tokenizer=tokenizer,
                callbacks=callbacks,
                optimizer=build_optimizer(model, recipe.lora, args),
            )
        else:
            try:
                trainer = SFTTrainer(
                    model=model,
                    args=args,
                    train_dataset=data.train,
                    eval_dataset=pad_for_processes(
                        data.validation,
                        state.num_processes,
                        args.per_device_eval_batch_size,
                        tokenizer.pad_token_id
                        if tokenizer.pad_token_id is not None
                        else tokenizer.eos_token_id,
                    ),
                    processing_class=tokenizer,
                    callbacks=callbacks,
                    optimizers=(build_optimizer(model, recipe.lora, args), None),
                )
            except (ValueError, ImportError) as exc:
                raise LoratoolError(
                    f"trl's SFTTrainer refused this setup: {exc}",
                    hint="check the training section of the recipe",
                ) from None
            # The same validation loss for any batching and number of processes (validation_loss.py).
            report_token_weighted_eval_loss(trainer)
        seal.trainer = trainer
        rank_budget = None
        if recipe.lora.method == "adalora":
            from loratool.adapter.adalora import RankBudget

            rank_budget = RankBudget(model)  # the trainer does not move AdaLoRA's rank budget itself
            trainer.add_callback(rank_budget)
        # LoRA-FA: trl would cast only the trainable B to bf16 (A is frozen by then); keep the pair in one dtype.
        if recipe.is_quantized() and (
            hardware.compute_dtype(recipe, hw) == torch.float32 or recipe.lora.method == "lorafa"
        ):
            keep_adapter_in(model, torch.float32)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(ConciseProgress())
        trainer.add_callback(DivergenceGuard(trainer))  # raises at the step where training diverges
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        first_step = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        final_eval = _final_evaluation(trainer) if data.validation is not None else {}

        global_step = trainer.state.global_step
        manifest["train"] = {
            "global_step": global_step,
            "epochs": trainer.state.epoch,
            # Whole-run figures: a resumed run adds what its checkpoint carried (checkpoints.py).
            "train_loss": seal.whole_run_train_loss(result.training_loss, global_step, first_step),
            "train_seconds": round(seal.train_seconds(), 2),
            "final_eval_loss": final_eval.get("eval_loss"),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "tokens_trained": int(trainer.state.num_input_tokens_seen),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "checkpointed_layers": checkpointed_layers(trainer.model),
            "bf16": bf16,
            "fp16": fp16,
        }
        if rank_budget is not None:
            manifest["adalora"] = rank_budget.record()
        manifest["peak_memory_bytes"] = _peak_memory(hw)
        manifest["wall_time_s"] = round(seal.seconds_before + time.time() - started, 2)
        manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

        def write_outputs(folder: Path) -> None:
            lora_init.save_adapter(trainer.model, folder, adapter_state, initial)
            tokenizer.save_pretrained(folder)  # with the chat template the data was rendered with
            plot_loss_curve(
                read_metrics(run.metrics),
                folder / LOSS_CURVE,
                title=f"{run.path.name} · LoRA on {recipe.base_model}",
            )
            from loratool.rundir.model_card import finish_adapter_dir

            finish_adapter_dir(folder, recipe_to_dict(recipe), manifest)  # model card, the real base's name
            if smoke is not None:
                from loratool.smoke import mark_model_card

                mark_model_card(folder / "README.md")

        if recipe.dpo is not None:
            from loratool.train.dpo import drop_reference_adapter

            drop_reference_adapter(trainer.model)  # the run saves the trained adapter only
        # Every process takes part: under FSDP each holds only a shard of the adapter.
        adapter_state = whole_adapter_state(trainer.model)
        if main_process:
            check_finite_adapter(trainer.model)
            run.finish(write_outputs, manifest)
    except BaseException as exc:
        if main_process:
            run.fail(manifest, exc)
        raise _as_training_error(exc, run) from exc
    train = manifest["train"]
    log(
        f"done in {manifest['wall_time_s']:.0f}s: {train['global_step']} steps, "
        f"{train['tokens_trained']:,} tokens, train loss {train['train_loss']:.4f}"
        + (f", validation loss {_eval_trend(trainer, final_eval)}" if final_eval else "")
    )
    log(f"adapter written to {run.path}")
    return run.path


@dataclass
class Preflight:
    """What train and --dry-run both check and load before any weights: see `preflight`."""

    hw: hardware.Hardware
    run: RunDir
    tokenizer: Any
    data: Any


def preflight(
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: bool,
    log: Callable[[str], None],
    main_process: bool = True,
) -> Preflight:
    """The checks `train` and `train --dry-run` share, in order, before any weights load: hardware and
    launch rules, the values only the libraries know (optimizer, scheduler, trackers), the output
    directory, the tokenizer and chat template, and every data row. Nothing is written.

    The output directory belongs to the main process: the others skip its check (by the time they run
    it, the main process may already have started the run there)."""
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
    tokenizer = load_tokenizer(recipe.base_model, recipe.model, log)
    if recipe.dpo is not None:
        from loratool.data.preference import build_preference_datasets
        from loratool.train.dpo import check_init_adapter

        check_init_adapter(recipe)
        data = build_preference_datasets(recipe.data, tokenizer, seed=recipe.training.seed)
    else:
        data = build_datasets(recipe.data, tokenizer, seed=recipe.training.seed)
    log(data.summary.format())
    return Preflight(hw, run, tokenizer, data)


def processes() -> Any:
    """accelerate's process state, set up before anything else runs: one process, or one of several
    started by `accelerate launch` or `torchrun`.

    On a machine without CUDA, accelerate joins the processes into one (gloo) group only when told to
    use the CPU: `accelerate launch --cpu` says so through ACCELERATE_USE_CPU, `torchrun` does not, and
    each of its processes would then train a run of its own. Setting the same variable here makes both
    launchers give one run; transformers' TrainingArguments reads it too when it rebuilds the state."""
    import os

    import torch
    from accelerate import PartialState

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))


class StoppedWithMainProcess(SystemExit):
    """Raised on the other processes when the main one stopped with an error: it printed the error; these
    leave quietly (exit code 1) rather than wait for it at the next collective until a timeout."""

    def __init__(self) -> None:
        super().__init__(1)


def on_main_first(
    state: Any,
    step: Callable[[], Any],
    *,
    then_others: Callable[[], Any] | None = None,
    share: bool = False,
) -> Any:
    """Run `step` on the main process while the others wait, then `then_others` on the others. If `step`
    fails, the main process raises its error and every other process raises StoppedWithMainProcess.
    With share, the others receive the main process's result (it must pickle); else they get
    `then_others()`, or None."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if state.is_main_process:
        try:
            result = step()
        except BaseException as exc:  # KeyboardInterrupt too: the others must not wait for a dead process
            error = exc
    if state.num_processes > 1:
        message = [error is not None, result if share and error is None else None]
        failed, shared = broadcast_object_list(message, from_process=0)
    else:
        failed, shared = error is not None, result
    if error is not None:
        raise error
    if failed:
        raise StoppedWithMainProcess()
    if state.is_main_process:
        return result
    if share:
        return shared
    return then_others() if then_others is not None else None


def _lengths(dataset: Any) -> list[int]:
    """Each row's token count, read from the Arrow column without decoding the rows (an index mapping, if
    the dataset has one, is applied)."""
    import pyarrow.compute as pc

    column = dataset.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_pylist()


def checkpointed_layers(model: Any) -> int:
    """How many decoder layers of `model` recompute their activations in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(
        1
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False)
    )


def whole_adapter_state(model: Any) -> dict[str, Any] | None:
    """The trainable weights as whole tensors when FSDP shards them across processes (else None: PEFT
    reads them from the model itself). Every process must call it: gathering the shards is collective."""
    from torch.distributed.tensor import DTensor

    names = {name for name, param in model.named_parameters() if param.requires_grad}
    state = {name: value for name, value in model.state_dict().items() if name in names}
    if not any(isinstance(value, DTensor) for value in state.values()):
        return None
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for name, value in state.items()
    }


def _stage_record(recipe: Recipe) -> dict[str, Any]:
    """What the adapter learned from (run.json "stage"), and for DPO its settings and reference model."""
    if recipe.dpo is None:
        return {"stage": "sft"}
    from loratool.train.dpo import reference_description

    init = recipe.dpo.init_adapter
    return {
        "stage": "dpo",
        "dpo": {
            "beta": recipe.dpo.beta,
            "loss_type": recipe.dpo.loss_type,
            "reference": reference_description(recipe),
            "init_adapter": str(Path(init).expanduser().resolve()) if init else None,
        },
    }


def _layout(recipe: Recipe, world_size: int) -> dict[str, int]:
    """How many processes train and how many rows one optimizer step sees across all of them."""
    t = recipe.training
    return {
        "world_size": world_size,
        "effective_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size,
    }


def _check_resume(
    recipe: Recipe, run: RunDir, manifest: dict[str, Any], log: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and what the resume changes, or a LoratoolError listing every
    difference that would make it a different training (resume.py)."""
    record = read_run(run.path)
    assert record is not None  # RunDir.prepare refused anything else
    checkpoint, skipped = run.latest_checkpoint()
    assert checkpoint is not None
    base = manifest["base_model"]
    matches = None
    if record.base_model.fingerprint and base.get("resolved_path"):
        matches = fingerprint_matches(Path(base["resolved_path"]), record.base_model.fingerprint)
    changes = check_resume(
        record,
        recipe_to_dict(recipe),
        data=manifest["data"],
        base_fingerprint_matches=matches,
        base_fingerprint=base.get("fingerprint"),
        tokenizer_sha256=manifest["tokenizer_sha256"],
        world_size=manifest["world_size"],
        effective_batch_size=manifest["effective_batch_size"],
    )
    if skipped:
        log(
            f"note: skipping incomplete checkpoint{'s' if len(skipped) > 1 else ''} "
            f"{', '.join(p.name for p in skipped)} (interrupted while saving); resuming from {checkpoint.name}"
        )
    else:
        log(f"resuming from {checkpoint.name}")
    for key, (before, after) in changes.items():
        log(f"  {key}: {before!r} -> {after!r}")
    entry = {
        "from_checkpoint": checkpoint.name,
        "step": int(checkpoint.name.split("-")[-1]),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "changed": changes,
        "skipped_incomplete_checkpoints": [p.name for p in skipped],
        "command": sys.argv,
    }
    return checkpoint, entry


def _continue_record(
    run: RunDir, manifest: dict[str, Any], entry: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """Make the run directory ready to continue from entry's checkpoint: the finished adapter (if any)
    is superseded, incomplete checkpoints go, metrics.jsonl keeps only the steps up to the checkpoint, and
    run.json records this resume next to the earlier ones."""
    from loratool.rundir.records import ADAPTER_FILES, STAGING

    for name in (*ADAPTER_FILES, STAGING):
        path = run.path / name
        if path.is_symlink() or path.exists():
            remove_entry(path)
    run.remove_incomplete_checkpoints()
    dropped = trim_metrics(run.metrics, entry["step"])
    if dropped:
        log(
            f"metrics.jsonl: dropped {dropped} line(s) logged after {entry['from_checkpoint']} (retrained now)"
        )
    record = read_run(run.path)
    assert record is not None
    continued = {
        **manifest,
        "started_at": record.raw.get("started_at", manifest["started_at"]),
        "resumes": [*record.resumes, entry],
    }
    run.write_manifest({**continued, "status": "running"})
    return continued


def _quiet(message: str) -> None:
    """The log of non-main processes in a multi-process run."""


def _final_evaluation(trainer: Any) -> dict[str, float]:
    """Validation metrics of the final adapter: the last evaluation if it ran at the last step, else a new one."""
    last = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
    if (
        last is not None
        and last.get("step") == trainer.state.global_step
        and not trainer.args.load_best_model_at_end
    ):
        return last
    return trainer.evaluate()


def _eval_trend(trainer: Any, final_eval: dict[str, float]) -> str:
    """`4.1234`, or `6.5000 -> 2.4000` when the run also evaluated before its first step."""
    first = next((r for r in trainer.state.log_history if "eval_loss" in r), None)
    if first is not None and first.get("step") == 0:
        return f"{first['eval_loss']:.4f} -> {final_eval['eval_loss']:.4f}"
    return f"{final_eval['eval_loss']:.4f}"


def _manifest_header(recipe: Recipe, hw: hardware.Hardware, started: float) -> dict[str, Any]:
    """What is known before training: versions, base model identity, hardware, command line."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "bitsandbytes",
        "tokenizers",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    model_dir = local_model_dir(recipe.base_model, recipe.model.revision)
    return {
        "loratool_version": __version__,
        "versions": versions,
        "python": platform.python_version(),
        "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "base_model": {
            "id": recipe.base_model,
            "revision": recipe.model.revision,
            "resolved_path": str(model_dir) if model_dir else None,
            "fingerprint": weights_fingerprint(model_dir) if model_dir else None,
            "quantization": "4bit"
            if recipe.quantization and recipe.quantization.load_in_4bit
            else "8bit"
            if recipe.quantization and recipe.quantization.load_in_8bit
            else None,
            # A .gguf base: the file and its sha256; resolved_path is then its cached conversion, which
            # merge finds (or rebuilds from the file) by this record.
            **({"gguf": gguf_record(recipe.base_model)} if is_gguf(recipe.base_model) else {}),
        },
        "hardware": {**hw.to_dict(), "platform": platform.platform()},
    }


def _peak_memory(hw: hardware.Hardware) -> dict[str, int]:
    import resource

    import torch

    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
    if hw.device == "cuda":
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated()
    return peak


def dry_run(
    recipe: Recipe, *, overwrite: bool = False, resume: bool = False, log: Callable[[str], None] = print
) -> None:
    """Everything `train` checks and resolves before loading weights, with nothing written to disk: the
    shared preflight (hardware, library values, output directory, tokenizer, every data row), the resume
    contract with --resume, and the adapter's target modules and size on a weightless (meta-device) copy
    of the model. The exception: a .gguf base is converted to its cached checkpoint (as training would),
    since that is what is checked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    state = processes()
    if not state.is_main_process:
        log = _quiet  # under a launcher, the main process reports for all
    checks = preflight(recipe, overwrite=overwrite, resume=resume, log=log)
    hw, run = checks.hw, checks.run
    if resume:
        manifest = {
            **_manifest_header(recipe, hw, time.time()),
            **_layout(recipe, state.num_processes),
            "tokenizer_sha256": tokenizer_sha256(checks.tokenizer),
            "data": checks.data.summary.to_dict(),
        }
        _check_resume(recipe, run, manifest, log)
    config = AutoConfig.from_pretrained(
        resolve_base_model(recipe.base_model, log),  # a .gguf was converted (once) by load_tokenizer
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    model = attach_adapter(
        model, lora_init.shapes_only(recipe.lora), quantized=False, gradient_checkpointing=False
    )
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
    from loratool.train.plan import dry_run_line

    log(dry_run_line(recipe, config, hw, checks.data))


def _as_training_error(exc: BaseException, run: RunDir) -> BaseException:
    """The error to show for a failed training: a user-fixable one for what the user can fix (memory,
    disk, a file that cannot be written), naming the file; else an internal error that points to the
    traceback the run directory keeps."""
    import torch

    where = f"run state saved in {run.path / 'run.json'}"
    if isinstance(exc, (LoratoolError, KeyboardInterrupt, SystemExit)):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return LoratoolError(
            f"out of GPU memory while training ({where})",
            hint="lower training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
            "effective batch), lower data.max_length, set training.gradient_checkpointing: true, or load "
            "the base in 4 bits (quantization.load_in_4bit: true)",
        )
    if is_disk_full(exc):
        latest, _ = run.latest_checkpoint()
        resume = f"then continue from {latest.name} with --resume" if latest else "then train again"
        written = getattr(exc, "filename", None) or (
            f"{run.checkpoints / run.removed_incomplete[0]} (incomplete, removed)"
            if run.removed_incomplete
            else run.path
        )
        return LoratoolError(
            f"no space left on the device while writing {written} ({where})",
            hint=f"free disk space on that device, {resume}",
        )
    if isinstance(exc, OSError) and exc.filename:
        return LoratoolError(
            f"could not access {exc.filename}: {exc.strerror} ({where})",
            hint="check that the path exists, is writable and is on a working disk, then resume with --resume",
        )
    return InternalError(
        f"training failed: {type(exc).__name__}: {exc}",
        hint=f"the full traceback is in {run.path / TRACEBACK}; please report it with that file",
    )
