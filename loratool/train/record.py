"""run.json as training builds it: what is known before the first step, then the figures of the run.

The record is read back through `loratool.rundir.records.RunRecord` (merge, export, eval, resume)."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from loratool import __version__
from loratool.model.fingerprint import weights_fingerprint
from loratool.model.gguf_base import gguf_record, is_gguf
from loratool.model.hardware import Hardware
from loratool.model.load import Base
from loratool.recipe import Recipe
from loratool.rundir.records import BaseModelRecord, RunRecord
from loratool.train.elastic import elastic_launch
from loratool.train.preflight import Preflight
from loratool.train.resume import tokenizer_sha256
from loratool.train.trainer import Training


def new_record(
    recipe: Recipe, checks: Preflight, *, world_size: int, started: float, smoke: dict[str, Any] | None
) -> RunRecord:
    """Everything run.json says before training: versions, base, hardware, layout, data and method."""
    t = recipe.training
    method = checks.method.record(recipe)
    return RunRecord(
        path=Path(t.output_dir).expanduser().resolve(),
        status="running",
        **header(recipe, checks.hw, checks.base, started),
        world_size=world_size,
        # How many rows one optimizer step sees across all processes.
        effective_batch_size=t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size,
        launch=elastic_launch(),
        tokenizer_sha256=tokenizer_sha256(checks.tokenizer),
        data=checks.data.summary.to_dict(),
        stage=method["stage"],
        dpo=method.get("dpo"),
        kto=method.get("kto"),
        reward=method.get("reward"),
        grpo=method.get("grpo"),
        rloo=method.get("rloo"),
        smoke=smoke,
    )


def finish_record(
    record: RunRecord,
    training: Training,
    training_loss: float,
    final_eval: dict[str, float],
    parameters: tuple[int, int],
    hw: Hardware,
    started: float,
) -> RunRecord:
    """The record with the run's figures: steps, whole-run loss and time (resumes included), tokens,
    parameters (trainable, total: counted when the adapter was attached), memory."""
    trainer, seal = training.trainer, training.seal
    trainable, total = parameters
    global_step = trainer.state.global_step
    return replace(
        record,
        train={
            "global_step": global_step,
            "epochs": trainer.state.epoch,
            # Whole-run figures: a resumed run adds what its checkpoint carried (checkpoints.py).
            "train_loss": seal.whole_run_train_loss(training_loss, global_step, training.first_step),
            "train_seconds": round(seal.train_seconds(), 2),
            "final_eval_loss": final_eval.get("eval_loss"),
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "tokens_trained": int(trainer.state.num_input_tokens_seen),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "checkpointed_layers": checkpointed_layers(trainer.model),
            "bf16": training.bf16,
            "fp16": training.fp16,
        },
        adalora=training.rank_budget.record() if training.rank_budget is not None else None,
        peak_memory_bytes=peak_memory(hw),
        wall_time_s=round(seal.seconds_before + time.time() - started, 2),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def header(recipe: Recipe, hw: Hardware, base: Base, started: float) -> dict[str, Any]:
    """RunRecord's fields known before training: versions, base model identity, hardware, command line."""
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
    model_dir = base.weights_dir
    return {
        "loratool_version": __version__,
        "versions": versions,
        "python": platform.python_version(),
        "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "base_model": BaseModelRecord(
            id=recipe.base_model,
            revision=recipe.model.revision,
            resolved_path=str(model_dir) if model_dir else None,
            fingerprint=weights_fingerprint(model_dir) if model_dir else None,
            quantization="4bit"
            if recipe.quantization and recipe.quantization.load_in_4bit
            else "8bit"
            if recipe.quantization and recipe.quantization.load_in_8bit
            else None,
            # A .gguf base: the file and its sha256; resolved_path is then its cached conversion, which
            # merge finds (or rebuilds from the file) by this record.
            gguf=gguf_record(recipe.base_model) if is_gguf(recipe.base_model) else None,
        ),
        "hardware": {**hw.to_dict(), "platform": platform.platform()},
    }


def peak_memory(hw: Hardware) -> dict[str, int]:
    import resource

    import torch

    peak = {"process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB
    if hw.device == "cuda":
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated()
    return peak


def checkpointed_layers(model: Any) -> int:
    """How many decoder layers of `model` recompute their activations in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(
        1
        for module in model.modules()
        if isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False)
    )
