"""Rules that span fields, checked when the recipe loads, before anything heavy: one line per problem,
each naming its key path. A section's own field checks (types, ranges) are in schema.py; the rules that
depend on the machine are in model/hardware.py.

The settings each `lora.method` takes are a table of their own, in methods.py (adapter/lora.py reads the
same table to build PEFT's config); the init rules are here, as functions of the `lora` section that
adapter/inits.py and model/hardware.py use too.
"""

from __future__ import annotations

from loratool.recipe.methods import method_problems
from loratool.recipe.schema import DataSection, DataSource, LoraSection, Recipe

CONVERTED = ("pissa", "olora", "corda")  # change the base; converted to plain LoRA at save
KNOWN_INITS = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal")  # and pissa_niter_N


def cross_field_problems(recipe: Recipe) -> list[str]:
    """Every rule that spans fields, one line per problem."""
    problems = []
    q, data, training = recipe.quantization, recipe.data, recipe.training
    if q is not None:
        if q.load_in_4bit and q.load_in_8bit:
            problems.append("quantization: load_in_4bit and load_in_8bit are both true — choose one")
        elif not (q.load_in_4bit or q.load_in_8bit):
            problems.append(
                "quantization: the section is present but neither load_in_4bit nor load_in_8bit is true — "
                "set one, or remove the section for plain LoRA"
            )
    if training.bf16 and training.fp16:
        problems.append("training: bf16 and fp16 are both true — choose one")
    if training.warmup_ratio is not None and training.warmup_steps is not None:
        problems.append("training: warmup_ratio and warmup_steps are both set — keep one")
    if training.max_steps <= 0 and training.max_steps != -1:
        problems.append(
            "training.max_steps: must be a positive number of steps, or -1 to use num_train_epochs"
        )
    if data.packing and not data.padding_free:
        problems.append(
            "data.packing: packing needs data.padding_free: true (packed rows are kept apart by position ids, "
            "which padded batches with an attention mask would ignore)"
        )
    if data.validation is None:
        if training.eval_steps is not None:
            problems.append("training.eval_steps: set, but there is no data.validation to evaluate on")
        if training.early_stopping_patience is not None:
            problems.append("training.early_stopping_patience: early stopping needs data.validation")
    if training.early_stopping_patience is not None and training.eval_steps is not None:
        if training.save_steps is not None and training.save_steps % training.eval_steps != 0:
            problems.append(
                "training.save_steps: with early stopping it must be a multiple of training.eval_steps, so "
                "that the best evaluated step has a checkpoint"
            )
    problems += _preference_problems(recipe)
    init = recipe.lora.init_lora_weights
    if isinstance(init, str):
        if init not in KNOWN_INITS and not init.startswith("pissa_niter_"):
            problems.append(
                f"lora.init_lora_weights: {init!r} is not a known initialization — use true, "
                + ", ".join(KNOWN_INITS)
                + " or pissa_niter_N"
            )
        if init == "loftq" and q is not None:
            problems.append(
                "lora.init_lora_weights: loftq quantizes the base itself — remove the quantization section"
            )
        problems += init_problems(recipe.lora, quantized=q is not None)
    problems += method_problems(recipe)
    return problems


def _preference_problems(recipe: Recipe) -> list[str]:
    """The data settings that only one of SFT and DPO can use."""
    data = recipe.data
    problems = []
    if recipe.dpo is None:
        for path, source in _indexed(data):
            if source.format == "preference":
                problems.append(
                    f"data.{path}.format: preference pairs are for preference tuning — add a dpo section "
                    "(dpo: {} for its defaults), or use a supervised format"
                )
        return problems
    for path, source in _indexed(data):
        if source.format not in ("auto", "preference", "sharegpt"):
            problems.append(
                f"data.{path}.format: {source.format} rows have no rejected answer to learn from with dpo — "
                "use preference (prompt / chosen / rejected), sharegpt (conversations + chosen / rejected) "
                "or auto"
            )
    if recipe.dpo.loss_type == "exo_pair" and recipe.dpo.label_smoothing == 0:
        problems.append("dpo.label_smoothing: loss_type exo_pair needs it above 0 (its paper uses 1e-3)")
    if data.packing:
        problems.append("data.packing: DPO batches are padded pairs — set data.packing: false")
    if not data.completion_only_loss:
        problems.append(
            "data.completion_only_loss: DPO compares the chosen and rejected answers and never trains the "
            "prompt — remove the key (or set it to true)"
        )
    return problems


def _indexed(data: DataSection) -> list[tuple[str, DataSource]]:
    """("train.0", source), ("validation.1", source), ...: each data source with its key path."""
    pairs = [(f"train.{i}", s) for i, s in enumerate(data.train)]
    if isinstance(data.validation, list):
        pairs += [(f"validation.{i}", s) for i, s in enumerate(data.validation)]
    return pairs


# --- lora.init_lora_weights ------------------------------------------------------------------------------


def init_method(lora: LoraSection) -> str | None:
    """The init's family name (`pissa_niter_4` -> `pissa`), or None for PEFT's default (B = 0) or false."""
    init = lora.init_lora_weights
    if not isinstance(init, str):
        return None
    return "pissa" if init.startswith("pissa") else init


def converts(lora: LoraSection) -> bool:
    """Whether the final adapter is converted into a plain LoRA adapter on the original base."""
    return init_method(lora) in CONVERTED


def init_problems(lora: LoraSection, *, quantized: bool) -> list[str]:
    """What makes the recipe's init impossible, one line each (recipe validation collects them)."""
    method = init_method(lora)
    problems = []
    if method in CONVERTED and quantized:
        # PiSSA and CorDA cannot decompose 4/8-bit weights at all. OLoRA can, but it trains on the
        # re-quantized residual Q(W - B0 @ A0), so the converted adapter on W (or on Q(W)) is off the
        # trained model by a quantization error (a tiny test model: 1.6 logits, more than the adapter's
        # own effect), and no merge would reproduce what was trained.
        problems.append(
            f"lora.init_lora_weights: {method} changes the base, and on a 4/8-bit base the adapter cannot be "
            "converted to one that reproduces the trained model on the original base — remove the "
            "quantization section, or keep QLoRA with init_lora_weights: true (or eva)"
        )
    if method in CONVERTED:
        # PEFT's conversion rewrites only lora_A / lora_B: everything else would be lost or wrong.
        blockers = {
            "use_dora": lora.use_dora,
            "modules_to_save": bool(lora.modules_to_save),
            "bias": lora.bias != "none",
            "use_rslora with rank_pattern / alpha_pattern": lora.use_rslora
            and bool(lora.rank_pattern or lora.alpha_pattern),
        }
        for name, present in blockers.items():
            if present:
                problems.append(
                    f"lora.init_lora_weights: {method} changes the base and is converted to a plain LoRA "
                    f"adapter at save time, which cannot carry {name} — drop one of the two"
                )
    return problems
