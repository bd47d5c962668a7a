"""`loratool train`: recipe in, run directory out. Reads top to bottom like the run it performs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loratool import __version__, hardware
from loratool.data import build_datasets
from loratool.errors import LoratoolError
from loratool.fingerprint import weights_fingerprint
from loratool.gguf_base import gguf_record, is_gguf, resolve_base_model
from loratool.lora import attach_adapter, build_loraplus_optimizer, keep_adapter_in
from loratool.metrics import ConciseProgress, MetricsLog, plot_loss_curve, read_metrics
from loratool.model import load_model, load_tokenizer, local_model_dir
from loratool.recipe import Recipe, recipe_to_dict
from loratool.rundir import LOSS_CURVE, RunDir
from loratool.sft_config import build_sft_config, check_report_to


def run_train(
    recipe: Recipe, *, overwrite: bool = False, resume: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Fine-tune `recipe.base_model` with a LoRA adapter and return the finished run directory."""
    import torch
    from accelerate import PartialState
    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTTrainer

    started = time.time()
    # Under `accelerate launch` every process runs this function; only the main one prints and touches
    # the run directory (the trainer itself saves checkpoints from the main process only).
    main_process = PartialState().is_main_process
    if not main_process:
        log = _quiet
    hw = hardware.detect()
    hardware.check(recipe, hw)
    check_report_to(recipe.training)
    # Refuse a bad output directory now, but create it only once data and model have loaded: a typo in
    # a data path or base model must not leave behind a "run that did not finish".
    RunDir.prepare(recipe.training.output_dir, overwrite=overwrite, resume=resume, dry_run=True)

    set_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.base_model, recipe.model, log)
    data = build_datasets(recipe.data, tokenizer, seed=recipe.training.seed)
    log(data.summary.format())

    log(f"loading {recipe.base_model} on {hw.device} ({hw.name})")
    model = load_model(recipe, hw, log)
    model = attach_adapter(
        model,
        recipe.lora,
        quantized=recipe.is_quantized(),
        gradient_checkpointing=recipe.training.gradient_checkpointing,
    )
    trainable, total = model.get_nb_trainable_parameters()
    log(f"adapter: {trainable:,} trainable parameters ({100 * trainable / total:.3f}% of {total:,})")

    manifest = {**_manifest_header(recipe, hw, started), "data": data.summary.to_dict()}
    if main_process:
        run = RunDir.prepare(recipe.training.output_dir, overwrite=overwrite, resume=resume)
        run.start(recipe_to_dict(recipe), manifest)
    else:
        run = RunDir(Path(recipe.training.output_dir).expanduser().resolve())
    PartialState().wait_for_everyone()
    try:
        bf16, fp16 = hardware.mixed_precision(recipe, hw)
        args = build_sft_config(
            recipe.training,
            recipe.data,
            checkpoints_dir=run.checkpoints,
            has_validation=data.validation is not None,
            bf16=bf16,
            fp16=fp16,
            train_summary=data.summary.train,
        )
        callbacks: list[Any] = [MetricsLog(run.metrics)]
        if recipe.training.early_stopping_patience is not None:
            callbacks.append(
                EarlyStoppingCallback(
                    recipe.training.early_stopping_patience, recipe.training.early_stopping_threshold
                )
            )
        try:
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=data.train,
                eval_dataset=data.validation,
                processing_class=tokenizer,
                callbacks=callbacks,
                optimizers=(build_loraplus_optimizer(model, recipe.lora, args), None),
            )
        except (ValueError, ImportError) as exc:
            raise LoratoolError(
                f"trl's SFTTrainer refused this setup: {exc}", hint="check the training section of the recipe"
            ) from None
        if recipe.is_quantized() and hardware.compute_dtype(recipe, hw) == torch.float32:
            keep_adapter_in(model, torch.float32)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(ConciseProgress())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train(resume_from_checkpoint=str(run.latest_checkpoint()) if resume else None)
        final_eval = _final_evaluation(trainer) if data.validation is not None else {}

        manifest["train"] = {
            "global_step": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_loss": result.training_loss,
            "final_eval_loss": final_eval.get("eval_loss"),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "tokens_trained": int(trainer.state.num_input_tokens_seen),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "bf16": bf16,
            "fp16": fp16,
        }
        manifest["peak_memory_bytes"] = _peak_memory(hw)
        manifest["wall_time_s"] = round(time.time() - started, 2)
        manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

        def write_outputs(folder: Path) -> None:
            trainer.model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)  # with the chat template the data was rendered with
            plot_loss_curve(
                read_metrics(run.metrics), folder / LOSS_CURVE, title=f"{recipe.base_model} · LoRA"
            )

        if main_process:
            run.finish(write_outputs, manifest)
    except BaseException as exc:
        if main_process:
            run.fail(manifest, exc)
        if isinstance(exc, torch.OutOfMemoryError):
            raise LoratoolError(
                f"out of GPU memory while training (run state saved in {run.path / 'run.json'})",
                hint="lower training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
                "effective batch), lower data.max_length, set training.gradient_checkpointing: true, or load "
                "the base in 4 bits (quantization.load_in_4bit: true)",
            ) from None
        raise
    log(
        f"done in {manifest['wall_time_s']:.0f}s: {manifest['train']['global_step']} steps, "
        f"{manifest['train']['tokens_trained']:,} tokens, train loss {result.training_loss:.4f}"
        + (f", validation loss {_eval_trend(trainer, final_eval)}" if final_eval else "")
    )
    log(f"adapter written to {run.path}")
    return run.path


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
    """Everything `train` checks and resolves before loading weights, with nothing written to disk:
    hardware rules, the output directory, the tokenizer and chat template, every data row, and the
    adapter's target modules and size on a weightless (meta-device) copy of the model. The exception: a
    .gguf base is converted to its cached checkpoint (as training would), since that is what is checked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hw = hardware.detect()
    hardware.check(recipe, hw)
    check_report_to(recipe.training)
    run = RunDir.prepare(recipe.training.output_dir, overwrite=overwrite, resume=resume, dry_run=True)
    tokenizer = load_tokenizer(recipe.base_model, recipe.model, log)
    data = build_datasets(recipe.data, tokenizer, seed=recipe.training.seed)
    log(data.summary.format())
    config = AutoConfig.from_pretrained(
        resolve_base_model(recipe.base_model, log),  # a .gguf was converted (once) by load_tokenizer
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    model = attach_adapter(model, recipe.lora, quantized=False, gradient_checkpointing=False)
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
