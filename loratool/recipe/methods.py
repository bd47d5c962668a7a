"""Which `lora` settings each adaptation method (`lora.method`) takes, checked when the recipe loads.

PEFT builds AdaLoRA (`AdaLoraConfig`, a `LoraConfig` with a rank budget) and VeRA (`VeraConfig`, its own
class); LoRA-FA is plain LoRA trained by PEFT's LoRA-FA optimizer. A setting that the chosen method would
ignore or that PEFT refuses for it is a recipe error here, naming the field, rather than a silent no-op or
a PEFT traceback after the model has loaded.
"""

from __future__ import annotations

from loratool.recipe.schema import Recipe

NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "vera": "VeRA", "lorafa": "LoRA-FA"}

# Settings only one method reads (None in the schema = unset = PEFT's default).
OWN_FIELDS = {
    "adalora": ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"),
    "vera": ("projection_prng_key", "d_initial"),
}

# Common settings a method cannot use: refused when they differ from the schema's default, with why.
_NOT_FOR = {
    "adalora": {
        "r": "AdaLoRA starts every layer at lora.init_r and ends at an average of lora.target_r — set those",
        "use_dora": "PEFT's AdaLoRA has no DoRA",
        "use_rslora": "AdaLoRA scales by lora_alpha / its starting rank, not by rsLoRA's alpha / sqrt(r)",
        "init_lora_weights": "AdaLoRA has its own initialization (true or false only)",
        "rank_pattern": "AdaLoRA finds the rank of each layer itself; its result is in run.json",
        "alpha_pattern": "PEFT's AdaLoRA uses one lora_alpha for every layer",
        "loraplus_lr_ratio": "LoRA+ is an optimizer for lora.method: lora",
    },
    "vera": {
        "lora_alpha": "VeRA has no alpha: its per-layer scaling vectors are learned",
        "use_dora": "VeRA has no DoRA",
        "use_rslora": "VeRA has no alpha / r scaling",
        "init_lora_weights": "VeRA initializes its own vectors (see lora.d_initial)",
        "rank_pattern": "VeRA's projections have one rank, lora.r, shared by every layer",
        "alpha_pattern": "VeRA has no alpha",
        "exclude_modules": "peft.VeraConfig has no exclude_modules; list the layers in lora.target_modules",
        "loraplus_lr_ratio": "LoRA+ is an optimizer for lora.method: lora",
    },
    "lorafa": {
        "use_dora": "the LoRA-FA optimizer updates A/B pairs only; DoRA's magnitude vector breaks its pairing",
        "loraplus_lr_ratio": "LoRA-FA and LoRA+ are two different optimizers — choose one",
    },
}


def method_problems(recipe: Recipe) -> list[str]:
    """Every `lora` setting that does not fit `lora.method`, one line each with its key path."""
    lora = recipe.lora
    method = lora.method
    name = NAMES[method]
    problems = []
    for owner, fields in OWN_FIELDS.items():
        if owner == method:
            continue
        for field in fields:
            if getattr(lora, field) is not None:
                problems.append(
                    f"lora.{field}: {NAMES[owner]} only, and lora.method is {method} — remove it, or set "
                    f"lora.method: {owner}"
                )
    defaults = type(lora).model_fields
    for field, why in _NOT_FOR.get(method, {}).items():
        if getattr(lora, field) != defaults[field].get_default(call_default_factory=True):
            problems.append(f"lora.{field}: not used with lora.method: {method} ({why}) — remove it")
    if method == "vera":
        for field in lora.model_extra or {}:
            problems.append(
                f"lora.{field}: a peft.LoraConfig setting; VeRA (peft.VeraConfig) has none — remove it"
            )
        if lora.bias == "lora_only":
            problems.append("lora.bias: lora_only is not a VeRA choice — use none or all")
    if method == "adalora":
        tinit, tfinal = lora.tinit or 0, lora.tfinal or 0
        steps = recipe.training.max_steps
        if steps > 0 and tinit + tfinal >= steps:
            problems.append(
                f"lora.tinit + lora.tfinal ({tinit} + {tfinal}) leave none of the {steps} optimizer steps "
                "(training.max_steps) to reallocate the rank budget in — lower them"
            )
        if recipe.training.early_stopping_patience is not None:
            problems.append(
                "training.early_stopping_patience: not with lora.method: adalora (its checkpoints hold the "
                "ranks of their step, which the run's adapter cannot take back) — remove it"
            )
    optim_default = type(recipe.training).model_fields["optim"].default
    if method == "lorafa" and recipe.training.optim != optim_default:
        problems.append(
            f"training.optim: {name} brings its own optimizer (AdamW on B with A frozen), so training.optim "
            "is not used — remove it"
        )
    return problems
