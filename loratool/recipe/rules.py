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
    problems += _method_problems(recipe)
    problems += _ignored_settings(recipe)
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


def _method_problems(recipe: Recipe) -> list[str]:
    """One method section at most, and the data settings each method can use."""
    present = recipe.method_sections()
    if len(present) > 1:
        return [
            f"{' and '.join(present)}: each section chooses the training method, and a run has one — keep "
            f"one of {', '.join(present)}"
        ]
    if recipe.stage == "sft":
        return _supervised_data_problems(recipe.data)
    if recipe.stage in PAIRED_FORMATS:
        return _preference_problems(recipe)
    if recipe.stage in ("grpo", "rloo"):
        return _online_rl_problems(recipe)
    return []


def _ignored_settings(recipe: Recipe) -> list[str]:
    """Settings that would be silently ignored where they are: refused, so the user knows."""
    problems = []
    source = recipe.model.gguf_source
    if source is not None and not str(recipe.base_model).lower().endswith(".gguf"):
        problems.append(
            f"model.gguf_source: names the hub id a .gguf base was converted from, and base_model "
            f"{recipe.base_model} is not a .gguf file (it is named by itself) — remove model.gguf_source"
        )
    if recipe.data.prompt_truncation == "keep_end":
        if recipe.stage not in PAIRED_FORMATS:
            problems.append(
                f"data.prompt_truncation: keep_end cuts the prompts of preference pairs and KTO rows, which "
                f"{recipe.stage} does not train on"
                + (
                    " (its prompts over max_length are dropped, never cut)"
                    if recipe.stage in ("grpo", "rloo")
                    else ""
                )
                + " — remove it"
            )
        elif recipe.data.truncation == "drop":
            problems.append(
                "data.prompt_truncation: keep_end cuts a long prompt, but data.truncation: drop skips every row "
                "over max_length first — set data.truncation: truncate, or remove data.prompt_truncation"
            )
    return problems


def _supervised_data_problems(data: DataSection) -> list[str]:
    """Preference and unpaired rows only mean something to the methods that learn from them."""
    problems = []
    for path, source in _indexed(data):
        if source.format == "preference":
            problems.append(
                f"data.{path}.format: preference pairs are for preference tuning — add a dpo section "
                "(dpo: {} for its defaults; or kto: {}, or reward: {} for a reward model), or use a "
                "supervised format"
            )
        if source.format == "unpaired":
            problems.append(
                f"data.{path}.format: unpaired rows (prompt / completion / label) are for KTO — add a kto "
                "section (kto: {} for its defaults), or use a supervised format"
            )
        if source.format == "prompt":
            problems.append(
                f"data.{path}.format: prompt rows (a prompt, no answer) are for online RL — add a grpo or "
                "rloo section with its rewards, or use a supervised format"
            )
    return problems


def _online_rl_problems(recipe: Recipe) -> list[str]:
    """What GRPO and RLOO (`grpo`, `rloo`) need from the data and training sections."""
    data, training, stage = recipe.data, recipe.training, recipe.stage
    rl = getattr(recipe, stage)
    problems = []
    for path, source in _indexed(data):
        if source.format not in ("auto", "prompt"):
            problems.append(
                f"data.{path}.format: {stage} reads prompt rows (a prompt to answer, and the columns the "
                f"rewards read) — use format: prompt or auto, not {source.format}"
            )
    if data.packing:
        problems.append(
            f"data.packing: {stage} generates its completions; there is nothing to pack — remove it"
        )
    # The completions of one prompt must land in the same step: trl counts completions, not prompts.
    per_step = training.per_device_train_batch_size * training.gradient_accumulation_steps
    if per_step % rl.num_generations:
        problems.append(
            f"training.per_device_train_batch_size x gradient_accumulation_steps ({per_step}) must be a "
            f"multiple of {stage}.num_generations ({rl.num_generations}): they count completions, and each "
            "prompt's completions are scored together"
        )
    if data.validation is not None and training.per_device_eval_batch_size % rl.num_generations:
        problems.append(
            f"training.per_device_eval_batch_size ({training.per_device_eval_batch_size}) must be a multiple "
            f"of {stage}.num_generations ({rl.num_generations}): each validation prompt is answered that "
            "many times"
        )
    if training.early_stopping_patience is not None:
        problems.append(
            f"training.early_stopping_patience: {stage}'s validation loss says little about the rewards — "
            "remove it (the validation rewards are in metrics.jsonl: eval_reward)"
        )
    return problems


# The row formats each preference method reads (`auto` tells them apart by the first row's keys).
PAIRED_FORMATS = {
    "dpo": ("auto", "preference", "sharegpt"),
    "reward": ("auto", "preference", "sharegpt"),
    "kto": ("auto", "unpaired", "preference", "sharegpt"),
}
_WHAT_ROWS = {
    "dpo": "use preference (prompt / chosen / rejected), sharegpt (conversations + chosen / rejected) or auto",
    "reward": "use preference (prompt / chosen / rejected), sharegpt (conversations + chosen / rejected) "
    "or auto",
    "kto": "use unpaired (prompt / completion / label), preference or sharegpt pairs, or auto",
}
# How each method's batches are made ("... batches are padded pairs") and what the rows lack otherwise.
_BATCHES = {"dpo": "DPO batches are padded pairs", "kto": "KTO batches are padded rows",
            "reward": "reward-model batches are padded pairs"}  # fmt: skip
_LACKS = {"dpo": "rejected answer", "kto": "label or rejected answer", "reward": "rejected answer"}
_NAMES = {"dpo": "DPO", "kto": "KTO", "reward": "a reward model"}


def _preference_problems(recipe: Recipe) -> list[str]:
    """The data settings of the methods that learn from judged answers (dpo, kto, reward)."""
    data, stage = recipe.data, recipe.stage
    problems = []
    for path, source in _indexed(data):
        if source.format not in PAIRED_FORMATS[stage]:
            problems.append(
                f"data.{path}.format: {source.format} rows have no {_LACKS[stage]} to learn from with {stage} — "
                + _WHAT_ROWS[stage]
            )
    if recipe.dpo is not None and recipe.dpo.loss_type == "exo_pair" and recipe.dpo.label_smoothing == 0:
        problems.append("dpo.label_smoothing: loss_type exo_pair needs it above 0 (its paper uses 1e-3)")
    kto = recipe.kto
    if kto is not None and kto.loss_type == "kto" and recipe.training.per_device_train_batch_size < 2:
        problems.append(
            "training.per_device_train_batch_size: KTO estimates its KL term from the other rows of a "
            "micro-batch, so it needs 2 or more (or kto.loss_type: apo_zero_unpaired)"
        )
    if init_method(recipe.lora) in ("eva", "corda"):
        problems.append(
            f"lora.init_lora_weights: {init_method(recipe.lora)} calibrates on supervised rows, and {stage} "
            "data has none — use true (or pissa, olora, gaussian, orthogonal)"
        )
    if stage == "reward" and converts(recipe.lora):
        problems.append(
            f"lora.init_lora_weights: {init_method(recipe.lora)} is converted to plain LoRA at save time, "
            "which cannot carry the reward model's score head — use true (or gaussian, orthogonal)"
        )
    if data.packing:
        problems.append(f"data.packing: {_BATCHES[stage]} — set data.packing: false")
    if not data.completion_only_loss:
        problems.append(
            f"data.completion_only_loss: {_NAMES[stage]} learns from the answers only and never trains the prompt — "
            "remove the key (or set it to true)"
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
