"""The `lora` section: a peft LoraConfig, the adapter attached to the base, and the LoRA+ optimizer."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, TrainingArguments

    from loratool.recipe import LoraSection

_NOT_LORA_CONFIG = {"loraplus_lr_ratio", "loraplus_lr_embedding", "init_calibration_batches"}


def build_lora_config(lora: LoraSection) -> LoraConfig:
    from peft import LoraConfig, TaskType

    fields = lora.model_dump(exclude=_NOT_LORA_CONFIG)
    fields.update(lora.model_extra or {})  # other LoraConfig fields the recipe passes through
    try:
        return LoraConfig(task_type=TaskType.CAUSAL_LM, **fields)
    except (TypeError, ValueError) as exc:
        raise LoratoolError(
            f"lora: peft rejected the settings: {exc}", hint="check the lora section"
        ) from None


def check_target_modules(model: PreTrainedModel, lora: LoraSection) -> None:
    """Fail with the names that exist when target_modules matches nothing (peft's own message is vague)."""
    import torch

    if lora.target_modules == "all-linear":
        return
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding) or _is_bnb(m)
    ]
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n in names})
    if isinstance(lora.target_modules, str):
        if not any(re.fullmatch(lora.target_modules, n) for n in names):
            raise LoratoolError(
                f"lora.target_modules: the pattern {lora.target_modules!r} matches no layer of the model",
                hint=f"layer names end in: {', '.join(leaf_names)} (or use all-linear)",
            )
        return
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise LoratoolError(
            f"lora.target_modules: {', '.join(missing)} match{'es' if len(missing) == 1 else ''} no layer of "
            f"the model",
            hint=f"this model's layers end in: {', '.join(leaf_names)} (or use all-linear)",
        )


def _is_bnb(module: Any) -> bool:
    return type(module).__name__ in {"Linear4bit", "Linear8bitLt"}


def attach_adapter(
    model: PreTrainedModel,
    lora: LoraSection,
    *,
    quantized: bool,
    gradient_checkpointing: bool,
    calibration: list[dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> PeftModel:
    """Wrap the frozen base with a fresh adapter. Quantized bases get peft's k-bit preparation first.
    `calibration`: batches of training rows for the inits that need them (eva, corda; lora_init.py)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from loratool.lora_init import calibrate_adapter, calibrate_base, check_runs_here

    check_target_modules(model, lora)
    check_runs_here(lora)
    if quantized:
        # Casts norms to fp32 and hooks input grads so checkpointing works through frozen 4/8-bit layers.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    config = calibrate_base(model, build_lora_config(lora), calibration, log)
    try:
        adapted = get_peft_model(model, config)
    except ValueError as exc:
        raise LoratoolError(
            f"lora: cannot attach the adapter: {exc}", hint="check lora.target_modules"
        ) from None
    calibrate_adapter(adapted, calibration, log)
    return adapted


def build_loraplus_optimizer(
    model: PeftModel, lora: LoraSection, args: TrainingArguments
) -> torch.optim.Optimizer | None:
    """LoRA+ (B matrices at lr * ratio) with the optimizer class `training.optim` names; None for plain LoRA."""
    if lora.loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_kwargs.pop("lr", None)
    return create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=args.learning_rate,
        loraplus_lr_ratio=lora.loraplus_lr_ratio,
        loraplus_lr_embedding=lora.loraplus_lr_embedding,
        loraplus_weight_decay=args.weight_decay,
        **optimizer_kwargs,
    )


def keep_adapter_in(model: PeftModel, dtype: torch.dtype) -> None:
    """Cast the trainable adapter weights to `dtype`.

    trl's SFTTrainer casts the adapter of any quantized model to bf16 (the QLoRA paper's setting for bf16
    GPUs). Where the model computes in fp32 (CPU, or compute dtype float32), bf16 adapters only lose
    precision and speed, and the saved adapter would not match the one a user reloads in fp32.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
