"""The `lora` section: the PEFT config of the chosen method (LoRA, AdaLoRA, VeRA, LoRA-FA), the adapter
attached to the base, and the optimizers some methods bring (LoRA+, LoRA-FA)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loratool.adapter.inits import calibrate_adapter, calibrate_base, check_runs_here
from loratool.errors import LoratoolError
from loratool.recipe.methods import OWN_FIELDS

if TYPE_CHECKING:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import PreTrainedModel, TrainingArguments

    from loratool.recipe import LoraSection

# Recipe fields that are not LoraConfig fields: the method, LoRA+ and the other methods' own settings.
_NOT_LORA_CONFIG = {
    "method",
    "loraplus_lr_ratio",
    "loraplus_lr_embedding",
    "init_calibration_batches",
    *(field for fields in OWN_FIELDS.values() for field in fields),
}


def build_lora_config(
    lora: LoraSection, total_steps: int | None = None, *, task_type: str = "CAUSAL_LM"
) -> PeftConfig:
    """The PEFT config of `lora.method`. AdaLoRA needs the run's number of optimizer steps: `total_steps`,
    or a provisional count that the trainer's own replaces before the first step (adalora.py).
    `task_type` SEQ_CLS (a reward model): PEFT then trains and saves the score head with the adapter."""
    from peft import AdaLoraConfig, LoraConfig, TaskType, VeraConfig

    own = {f: getattr(lora, f) for f in OWN_FIELDS.get(lora.method, ()) if getattr(lora, f) is not None}
    if lora.method == "vera":
        config_class: Any = VeraConfig
        fields = {
            "r": lora.r,
            "target_modules": lora.target_modules,
            "vera_dropout": lora.lora_dropout,
            "bias": "vera_only" if lora.bias == "lora_only" else lora.bias,
            "fan_in_fan_out": lora.fan_in_fan_out,
            "modules_to_save": lora.modules_to_save,
            "layers_to_transform": lora.layers_to_transform,
            "layers_pattern": lora.layers_pattern,
            "save_projection": True,  # merge and reloads read the projections from the adapter file
            **own,
        }
    else:
        # AdaLoRA's own rank settings replace r and rank_pattern (its rank_pattern is an output).
        skip = {"r", "rank_pattern", "alpha_pattern"} if lora.method == "adalora" else set()
        fields = lora.model_dump(exclude=_NOT_LORA_CONFIG | skip)
        fields.update(lora.model_extra or {})  # other LoraConfig fields the recipe passes through
        config_class = LoraConfig
        if lora.method == "adalora":
            from loratool.adapter.adalora import provisional_total_steps  # deferred: loads transformers

            config_class = AdaLoraConfig
            fields.update(own, total_step=total_steps or provisional_total_steps(lora))
    try:
        return config_class(task_type=TaskType(task_type), **fields)
    except (TypeError, ValueError) as exc:
        raise LoratoolError(
            f"lora: peft rejected the {lora.method} settings: {exc}", hint="check the lora section"
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
    config = calibrate_base(model, build_lora_config(lora, task_type=task_type_of(model)), calibration, log)
    try:
        adapted = get_peft_model(model, config)
    except ValueError as exc:
        raise LoratoolError(
            f"lora: cannot attach the adapter: {exc}", hint="check lora.target_modules"
        ) from None
    calibrate_adapter(adapted, calibration, log)
    return adapted


def task_type_of(model: PreTrainedModel) -> str:
    """SEQ_CLS for a base with a score head (a reward model, model/load.py), else CAUSAL_LM."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def build_optimizer(
    model: PeftModel, lora: LoraSection, args: TrainingArguments
) -> torch.optim.Optimizer | None:
    """The optimizer the method brings (LoRA-FA, LoRA+), or None: the trainer builds `training.optim`."""
    if lora.method == "lorafa":
        return build_lorafa_optimizer(model, lora, args)
    return build_loraplus_optimizer(model, lora, args)


def build_lorafa_optimizer(
    model: PeftModel, lora: LoraSection, args: TrainingArguments
) -> torch.optim.Optimizer:
    """LoRA-FA: every lora_A is frozen as initialized (PEFT sets requires_grad False) and each lora_B is
    trained by AdamW on its gradient projected through A, which is what full fine-tuning of the layer would
    do in B's subspace. Optimizer state for B only: less memory than LoRA at the same rank."""
    from peft.optimizers import create_lorafa_optimizer

    return create_lorafa_optimizer(
        model, r=lora.r, lora_alpha=lora.lora_alpha, lr=args.learning_rate, weight_decay=args.weight_decay
    )


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
