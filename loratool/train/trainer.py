"""The method's trainer (train/sft.py or train/dpo.py) with loratool's callbacks around it: metrics.jsonl,
sealed checkpoints, early stopping, AdaLoRA's rank budget, concise progress and the divergence guard."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.adapter.adalora import RankBudget
from loratool.adapter.lora import build_optimizer, keep_adapter_in
from loratool.model import hardware
from loratool.recipe import Recipe
from loratool.rundir.records import RunDir
from loratool.train.checkpoints import CheckpointSeal
from loratool.train.divergence import DivergenceGuard
from loratool.train.preflight import Preflight
from loratool.train.progress import ConciseProgress, MetricsLog


@dataclass
class Training:
    """A trainer ready to train, and what the run record needs from around it."""

    trainer: Any
    seal: CheckpointSeal  # seals checkpoints; carries whole-run loss and time across resumes
    rank_budget: RankBudget | None  # AdaLoRA only
    bf16: bool
    fp16: bool
    first_step: int  # the checkpoint's step when resuming, else 0


def build_trainer(
    model: Any,
    recipe: Recipe,
    checks: Preflight,
    run: RunDir,
    checkpoint: Path | None,
    *,
    num_processes: int,
    base_fingerprint: str | None,
) -> Training:
    """The trainer of the recipe's method, on the preflight's data, saving checkpoints into the run."""
    import torch  # deferred: torch
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import ProgressCallback

    bf16, fp16 = hardware.mixed_precision(recipe, checks.hw)
    args = checks.method.build_config(
        recipe,
        checkpoints_dir=run.checkpoints,
        has_validation=checks.data.validation is not None,
        bf16=bf16,
        fp16=fp16,
        train_lengths=_lengths(checks.data.train) if recipe.data.packing else None,
    )
    if checkpoint is not None:
        args.eval_on_start = False  # the step-0 evaluation was logged by the first part of the run
    seal = CheckpointSeal(resumed_from=checkpoint, base_fingerprint=base_fingerprint)
    callbacks: list[Any] = [MetricsLog(run.metrics), seal]
    if recipe.training.early_stopping_patience is not None:
        callbacks.append(
            EarlyStoppingCallback(
                recipe.training.early_stopping_patience, recipe.training.early_stopping_threshold
            )
        )
    trainer = checks.method.build_trainer(
        model,
        recipe,
        args=args,
        data=checks.data,
        tokenizer=checks.tokenizer,
        callbacks=callbacks,
        optimizer=build_optimizer(model, recipe.lora, args),
        num_processes=num_processes,
    )
    seal.trainer = trainer
    rank_budget = None
    if recipe.lora.method == "adalora":
        rank_budget = RankBudget(model)  # the trainer does not move AdaLoRA's rank budget itself
        trainer.add_callback(rank_budget)
    # LoRA-FA: trl would cast only the trainable B to bf16 (A is frozen by then); keep the pair in one dtype.
    if recipe.is_quantized() and (
        hardware.compute_dtype(recipe, checks.hw) == torch.float32 or recipe.lora.method == "lorafa"
    ):
        keep_adapter_in(model, torch.float32)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ConciseProgress())
    trainer.add_callback(DivergenceGuard(trainer))  # raises at the step where training diverges
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    first_step = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0
    return Training(trainer, seal, rank_budget, bf16, fp16, first_step)


def final_evaluation(trainer: Any) -> dict[str, float]:
    """Validation metrics of the final adapter: the last evaluation if it ran at the last step, else a new one."""
    last = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
    if (
        last is not None
        and last.get("step") == trainer.state.global_step
        and not trainer.args.load_best_model_at_end
    ):
        return last
    return trainer.evaluate()


def eval_trend(trainer: Any, final_eval: dict[str, float]) -> str:
    """`4.1234`, or `6.5000 -> 2.4000` when the run also evaluated before its first step."""
    first = next((r for r in trainer.state.log_history if "eval_loss" in r), None)
    if first is not None and first.get("step") == 0:
        return f"{first['eval_loss']:.4f} -> {final_eval['eval_loss']:.4f}"
    return f"{final_eval['eval_loss']:.4f}"


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


def _lengths(dataset: Any) -> list[int]:
    """Each row's token count, read from the Arrow column without decoding the rows (an index mapping, if
    the dataset has one, is applied)."""
    import pyarrow.compute as pc

    column = dataset.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_pylist()
