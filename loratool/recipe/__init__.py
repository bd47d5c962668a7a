"""The recipe: one strict, typed schema. Every field is documented once, here, at its definition.

Inside `quantization`, `lora` and `training` the keys carry the names of transformers'
`BitsAndBytesConfig`, peft's `LoraConfig` and trl's `SFTConfig`, so that what a user knows from those
libraries works as expected. `lora` and `training` also accept any other field of `LoraConfig` /
`SFTConfig` that loratool does not document itself; it is handed to the library untouched.

Loading is strict: an unknown key anywhere is an error naming its full path and the closest valid key,
a wrong type names the path and the expected type, and every problem in a recipe is reported at once.
The loaded recipe is frozen; derived values are functions, never fields written back.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from loratool.errors import LoratoolError
from loratool.recipe.library_fields import LORA_CONFIG_FIELDS, SFT_CONFIG_FIELDS

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
PositiveInt = Annotated[int, Field(gt=0)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are frozen after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelSection(Section):
    """How the base model and its tokenizer are loaded."""

    revision: str | None = None
    """Hub branch, tag or commit of `base_model`; ignored for a local directory. Pin it for reproducibility."""

    dtype: Dtype = "auto"
    """Precision the base weights are loaded in. `auto`: bfloat16 on GPUs that have it, float16 on older
    GPUs, float32 on CPU (CPUs are slow in half precision and fp16 underflows without a GPU scaler)."""

    attn_implementation: str | None = None
    """`sdpa`, `eager`, `flash_attention_2`, `flash_attention_3`, ... None lets transformers choose (sdpa
    where the model supports it). Packed / padding-free batches stay separated with all of these. With
    such batches, sdpa and eager run per example (`sdpa_per_example` / `eager_per_example`, same kernels):
    attention costs the sum of each example's length squared, not the whole row's length squared;
    flash_attention_2/3 use their own varlen kernels. Padded batches and generation use the stock path."""

    trust_remote_code: bool = False
    """Run Python code shipped with the model repository. Off unless you have read that code."""

    tokenizer: str | None = None
    """Load the tokenizer from another hub id or directory than `base_model`."""


class QuantizationSection(Section):
    """bitsandbytes quantization of the frozen base (QLoRA). Leave the section out for plain LoRA."""

    load_in_4bit: bool = False
    """Store the base in 4 bits (QLoRA): ~0.55 bytes per parameter instead of 2 in bf16."""

    load_in_8bit: bool = False
    """Store the base in 8 bits (LLM.int8): ~1 byte per parameter; slower than 4-bit on most GPUs."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type. nf4 (NormalFloat) matches normally distributed weights better than fp4."""

    bnb_4bit_use_double_quant: bool = True
    """Quantize the quantization constants too: saves ~0.4 bit per parameter (~3 GB on a 65B model)."""

    bnb_4bit_compute_dtype: Dtype = "auto"
    """Precision the 4-bit weights are dequantized to for each matmul. `auto` follows `model.dtype`."""

    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] | None = None
    """Storage type of packed 4-bit weights. FSDP needs it equal to the compute dtype to shard them."""

    llm_int8_threshold: float = 6.0
    """8-bit only: activations above this magnitude go through the fp16 outlier path."""

    llm_int8_skip_modules: list[str] | None = None
    """Module names kept unquantized (for example `lm_head`)."""


class LoraSection(Section):
    """The adapter: `peft.LoraConfig` fields, plus the method and its own settings (AdaLoRA, VeRA, LoRA+)."""

    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)

    method: Literal["lora", "adalora", "vera", "lorafa"] = "lora"
    """The adaptation method (README, "Methods"). `lora`: a low-rank pair B @ A per layer (DoRA, rsLoRA,
    LoRA+ and the inits are options of it). `adalora`: LoRA in SVD form whose rank budget moves during
    training to the layers that need it (init_r -> target_r on average; the final rank per layer is in
    run.json and the model card). `vera`: one pair of frozen random projections shared by every layer, only
    two scaling vectors per layer trained: ~10x fewer parameters than LoRA, wants a high `r` (256) and a
    ~10x higher learning_rate (1e-3 to 1e-2). `lorafa`: LoRA with A frozen after its random init and only B
    trained (PEFT's LoRA-FA optimizer, AdamW-like; training.optim is not used): less optimizer memory.
    Settings of another method are refused, naming the field."""

    r: PositiveInt = 16
    """Adapter rank. Higher fits more but costs memory and can overfit small datasets; 8-64 is typical."""

    lora_alpha: float = 32
    """Scale of the update: delta_W = (lora_alpha / r) * B @ A. Rule of thumb: alpha = 2 * r."""

    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input. 0.05-0.1 for small datasets; 0 for speed on large ones."""

    target_modules: list[str] | str = "all-linear"
    """Which layers get adapters: `all-linear` (every linear layer but the output head; the QLoRA paper's
    advice), a list of module-name suffixes such as [q_proj, v_proj], or a regex matched on full names."""

    exclude_modules: list[str] | str | None = None
    """Module-name suffixes (or a regex) to leave without an adapter even if `target_modules` matches them."""

    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train. `none` keeps the adapter mergeable without touching base biases."""

    use_dora: bool = False
    """DoRA: learn a magnitude vector as well as the direction. Better at low rank, ~20-30% slower."""

    use_rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(r): keeps learning stable when r is large (64+)."""

    init_lora_weights: bool | str = True
    """`true` (B = 0, so training starts from the base model), `gaussian`, `orthogonal`, `pissa`,
    `pissa_niter_N`, `olora`, `corda`, `eva`, `loftq`. pissa, olora and corda move the top of each weight
    into the adapter and train on the rest; the final adapter is converted to a plain LoRA adapter of rank
    2r on the original base, so merge and export work as usual (these three need an unquantized base).
    eva and corda first run a calibration pass on the training data (`init_calibration_batches`); their
    settings go in `eva_config` ({rho: 2.0, ...}) / `corda_config` ({corda_method: ipm | kpm}). loftq (GPU
    only, needs `loftq_config`) trains on its own quantized copy of the base and cannot be merged."""

    init_calibration_batches: PositiveInt = 64
    """eva / corda: how many batches of training rows (per_device_train_batch_size each, the first rows
    of the shuffled data) the calibration pass reads before training. More gives steadier statistics."""

    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (for example `embed_tokens`, `lm_head` after
    adding tokens)."""

    layers_to_transform: list[int] | int | None = None
    """Only put adapters on these layer indices."""

    layers_pattern: list[str] | str | None = None
    """Name of the layer container that `layers_to_transform` indexes (`layers`, `h`, ...)."""

    rank_pattern: dict[str, int] = {}
    """Per-module rank overrides: {regex or name: rank}."""

    alpha_pattern: dict[str, float] = {}
    """Per-module alpha overrides: {regex or name: alpha}."""

    fan_in_fan_out: bool = False
    """Set for layers that store weights transposed (GPT-2's Conv1D)."""

    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+: the B matrices learn at learning_rate * ratio. 16 is the paper's advice; unset = plain LoRA."""

    loraplus_lr_embedding: float = Field(1e-6, gt=0)
    """LoRA+: learning rate of adapters on embedding layers."""

    # AdaLoRA (method: adalora). Unset = PEFT's default, given in each line. total_step is not a setting:
    # loratool sets it to the run's number of optimizer steps.
    init_r: PositiveInt | None = None
    """AdaLoRA: starting rank of every layer (unset: 12, PEFT's default). `r` is not used by AdaLoRA."""

    target_r: PositiveInt | None = None
    """AdaLoRA: average rank per layer at the end (unset: 8, PEFT's default); the total budget is
    target_r x layers."""

    tinit: Annotated[int, Field(ge=0)] | None = None
    """AdaLoRA: optimizer steps at the start trained at init_r before any rank is cut (unset: 0, PEFT's
    default)."""

    tfinal: Annotated[int, Field(ge=0)] | None = None
    """AdaLoRA: optimizer steps at the end trained with the final ranks fixed (unset: 0, PEFT's default).
    tinit + tfinal must leave steps to reallocate in."""

    deltaT: PositiveInt | None = None
    """AdaLoRA: reallocate the rank budget every deltaT optimizer steps (unset: 1, PEFT's default)."""

    beta1: Annotated[float, Field(gt=0, lt=1)] | None = None
    """AdaLoRA: smoothing of the importance scores, an exponential moving average (unset: 0.85, PEFT's
    default)."""

    beta2: Annotated[float, Field(gt=0, lt=1)] | None = None
    """AdaLoRA: smoothing of the scores' uncertainty (unset: 0.85, PEFT's default)."""

    orth_reg_weight: Annotated[float, Field(ge=0)] | None = None
    """AdaLoRA: weight of the penalty keeping A and B orthogonal, added to the loss (unset: 0.5, PEFT's
    default)."""

    # VeRA (method: vera). `r` is the rank of the shared projections; lora_dropout is VeRA's dropout.
    projection_prng_key: int | None = None
    """VeRA: seed of the shared random projections (unset: 0, PEFT's default). They are saved with the
    adapter."""

    d_initial: Annotated[float, Field(gt=0)] | None = None
    """VeRA: initial value of the per-layer scaling vector d (unset: 0.1, PEFT's default); the vector b starts at 0."""

    # PEFT compiles these only when the adapter is attached, after the model has loaded: check them now.
    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _module_regex(cls, value: list[str] | str | None) -> list[str] | str | None:
        # A string is a regex PEFT fullmatches on full module names; a list holds plain names (suffixes).
        if isinstance(value, str):
            _check_regex(
                value,
                value,
                "a string is a regex matched on full module names; list plain names as [q_proj, v_proj]",
            )
        return value

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            _check_regex(rf"(.*\.)?({key})$", key, "each key is a regex matched on the end of module names")
        return value

    @field_validator("modules_to_save")
    @classmethod
    def _saved_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            _check_regex(rf"(^|.*\.){name}($|\..*)", name, "PEFT puts each name into a regex")
        return value


def _check_regex(pattern: str, given: str, what: str) -> None:
    """Raise ValueError (a recipe problem at the field's path) when PEFT's regex would not compile."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"'{given}' is not a valid regular expression ({exc}) — {what}") from None


class DataSource(Section):
    """One dataset: a local file, a directory of files, or a hub dataset id."""

    path: str
    """A .json, .jsonl, .csv, .parquet or .txt file, a directory of them, or a hub dataset id. Relative
    paths are resolved against the recipe file's directory."""

    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference"] = (
        "auto"
    )
    """Row layout. `auto` detects it from the first row: messages -> messages, conversations -> sharegpt,
    instruction + output -> alpaca, prompt + completion -> prompt_completion, text -> text. With a `dpo`
    section the rows are preference pairs: `preference` (prompt / chosen / rejected, each a string or a
    list of chat messages) or `sharegpt` (conversations + chosen / rejected messages); `auto` tells them
    apart."""

    columns: dict[str, str] = {}
    """Rename the fields the format reads to the names in your file, e.g. {instruction: question,
    output: answer} for alpaca, {messages: dialog, role: speaker, content: said} for messages/sharegpt."""

    roles: dict[str, str] = {}
    """Map roles in the file to user / assistant / system / tool, on top of the defaults (ShareGPT: human
    -> user, gpt -> assistant, function_call -> assistant, observation -> tool)."""

    system_prompt: str | None = None
    """A system message put before every conversation from this source that has none of its own."""

    subset: str | None = None
    """Hub datasets: the configuration name."""

    split: str = "train"
    """Hub datasets: the split to read."""

    max_rows: PositiveInt | None = None
    """Read only the first N rows of this source (quick experiments, mixing proportions)."""


class DataSection(Section):
    """What the model reads, how it is templated, tokenized, masked and batched."""

    train: list[DataSource] = Field(min_length=1)
    """Training sources; several are concatenated and shuffled together."""

    validation: list[DataSource] | Annotated[float, Field(gt=0, lt=1)] | None = None
    """Held-out sources, or a fraction (0-1) of the training rows split off with `training.seed`."""

    chat_template: str | None = None
    """None: the tokenizer's own. A built-in name (chatml, llama2, llama3, mistral, zephyr, alpaca, gemma) for
    tokenizers that have none, or the path of a Jinja file. The template used is saved with the adapter."""

    max_length: PositiveInt = 2048
    """Longest tokenized example, in tokens. What happens to longer ones: `truncation`."""

    truncation: Literal["truncate", "drop"] = "truncate"
    """`truncate`: keep the first max_length tokens (the cut part, end-of-turn included, is not learned);
    `drop`: skip the row. Rows left with no loss token are always dropped, and counted."""

    completion_only_loss: bool = True
    """Loss only on completions / assistant turns (their end-of-turn token included, so the model learns
    to stop). False: loss on every token, prompts included."""

    packing: bool = False
    """Pack examples into rows of max_length (best-fit decreasing). Examples never attend to each other.
    A micro-batch takes the fewest rows that hold, on average, per_device_train_batch_size examples (the
    lengths are packed once beforehand to count them), so a step holds at least the examples and tokens
    of a padding-free step, and every step is about the same size. Changes which examples share a step.
    With per-example attention it computes what padding-free computes; it helps where steps of even size
    matter (memory headroom, fixed-shape kernels). Measured in docs/benchmarks.md."""

    padding_free: bool = True
    """Concatenate each batch into one row with no pad tokens (position ids keep examples apart, and
    attention runs per example: see model.attn_implementation). Same examples, same loss as padding,
    less compute: no reason to turn it off but debugging."""

    on_bad_row: Literal["fail", "skip"] = "fail"
    """A malformed row (bad JSON, missing field, wrong type, empty conversation): `fail` stops with its file
    and line; `skip` leaves it out and counts it in the data summary."""


class TrainingSection(Section):
    """The optimization run: `trl.SFTConfig` / `transformers.TrainingArguments` fields."""

    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)

    output_dir: str
    """The run directory. At the end it is a PEFT adapter directory (loadable with
    PeftModel.from_pretrained) plus the tokenizer, the resolved recipe, run.json, metrics and checkpoints/.
    Relative paths are resolved against the current directory."""

    num_train_epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps > 0)."""

    max_steps: int = -1
    """Stop after this many optimizer steps; -1 = run num_train_epochs."""

    per_device_train_batch_size: PositiveInt = 4
    """Examples per device per forward pass. Effective batch = this * gradient_accumulation_steps * devices."""

    per_device_eval_batch_size: PositiveInt = 8
    """Examples per device per evaluation forward pass."""

    gradient_accumulation_steps: PositiveInt = 4
    """Forward passes summed before each optimizer step: a bigger effective batch at the same memory."""

    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate. LoRA wants ~10x a full fine-tune: 1e-4 to 3e-4 is typical."""

    lr_scheduler_type: str = "cosine"
    """linear, cosine, cosine_with_min_lr, constant, constant_with_warmup, warmup_stable_decay, ..."""

    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up. Mutually exclusive with warmup_steps."""

    warmup_steps: int | None = Field(None, ge=0)
    """Warm-up length in steps. If neither this nor warmup_ratio is set, 3% of the steps."""

    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay. Rarely useful for LoRA."""

    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm; 0 disables it."""

    optim: str = "adamw_torch"
    """Optimizer. `paged_adamw_8bit` (bitsandbytes) survives memory spikes on long batches (QLoRA paper)."""

    gradient_checkpointing: bool | Annotated[int, Field(ge=1)] = 2
    """Recompute decoder-layer activations in the backward pass instead of keeping them. A number n:
    every n-th layer (layers 0, n, 2n, ...); the default 2 keeps half of the activation memory for about
    half the recompute (measured in docs/benchmarks.md). `true` (= 1): every layer, the least memory
    (needed for 7B+ models on 24 GB cards), ~30% slower than `false`. `false`: none, the fastest and
    the most memory. Layers not checkpointed still rebuild their norm and gated-MLP outputs in the
    backward pass rather than keep them (~39% fewer bytes on a Llama layer, same gradients). Preference
    tuning (`dpo:`) checkpoints every layer whenever this is not `false`: trl's DPO trainer turns
    checkpointing back on for all layers after each reference pass."""

    bf16: bool | None = None
    """Mixed precision in bfloat16. None = on when the model computes in bf16 (GPUs that support it)."""

    fp16: bool | None = None
    """Mixed precision in float16 with loss scaling. None = on when the model computes in fp16."""

    logging_steps: PositiveInt = 10
    """Print and record the loss every N optimizer steps."""

    eval_steps: PositiveInt | None = None
    """Evaluate on the validation data every N steps. None = at the end of each epoch, if there is any."""

    save_steps: PositiveInt | None = None
    """Write a checkpoint (to resume from) every N steps into checkpoints/. None = at the end of each epoch."""

    save_total_limit: PositiveInt | None = 2
    """Keep at most this many checkpoints."""

    early_stopping_patience: PositiveInt | None = None
    """Stop after this many evaluations without improvement of the validation loss (needs validation data);
    the best checkpoint is the one saved as the adapter."""

    early_stopping_threshold: float = Field(0.0, ge=0)
    """Minimum decrease of the validation loss that counts as an improvement."""

    seed: int = 42
    """Seeds shuffling, the validation split, dropout and adapter initialization."""

    report_to: list[str] | str = "none"
    """Experiment trackers (tensorboard, wandb, trackio, ...). loratool always writes metrics.jsonl."""

    def resolved_warmup(self) -> float:
        """warmup_steps as TrainingArguments reads it: >= 1 is a step count, < 1 a fraction of the steps."""
        if self.warmup_steps is not None:
            return float(self.warmup_steps)
        return self.warmup_ratio if self.warmup_ratio is not None else 0.03


class DpoSection(Section):
    """Preference tuning with trl's DPOTrainer."""

    beta: float = Field(0.1, gt=0)
    """How far the tuned model may move from the reference: higher keeps it closer. 0.1 is the DPO paper's
    value; 0.01-0.5 is typical (for loss_type ipo it is the paper's tau)."""

    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    ] = "sigmoid"  # fmt: skip
    """trl's DPO loss: `sigmoid` (the DPO paper), `ipo` (less overfitting on deterministic preferences),
    `hinge` (SLiC), `robust` (noisy labels, with label_smoothing), ... see trl's DPOConfig."""

    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Probability that a pair's preference is wrong: used by the `robust` and `exo_pair` losses (0.1 and
    1e-3 are their papers' values; exo_pair needs it above 0)."""

    init_adapter: str | None = None
    """Start from the adapter of a finished loratool run on the same base (usually an SFT run, e.g.
    out/sft-run) instead of a fresh one; that adapter is also the reference. The `lora` section must match
    the run's. A relative path is resolved against the current directory."""


class Recipe(Section):
    """A fine-tuning recipe: the base model, how it is loaded, the adapter, the data and the run."""

    base_model: str
    """Hub id (meta-llama/Llama-2-7b-hf), local directory, or local .gguf file of the model to fine-tune. A
    .gguf is dequantized once into a Hugging Face checkpoint cached under $LORATOOL_CACHE (default
    ~/.cache/loratool), float32 up to 2B parameters, bfloat16 above. A path starting with ./ or ../ is
    resolved against the recipe file's directory when it exists there."""

    model: ModelSection = ModelSection()
    """How the base model is loaded."""

    quantization: QuantizationSection | None = None
    """bitsandbytes settings; absent = plain LoRA on a 16/32-bit base."""

    lora: LoraSection = LoraSection()
    """The LoRA adapter."""

    data: DataSection
    """Training and validation data."""

    training: TrainingSection
    """Optimizer, schedule, precision, logging, evaluation and checkpoints."""

    dpo: DpoSection | None = None
    """Preference tuning (DPO). Absent: supervised fine-tuning, the model imitates the data's answers.
    Present (`dpo: {}` for the defaults): the adapter learns from preference pairs (a prompt, a chosen and
    a rejected answer) with trl's DPOTrainer. The reference is the base with the adapter disabled (no
    second copy of the model in memory), or the base with `init_adapter`. The prompt is never trained; the
    answers (their end-of-turn included) are masked as for supervised fine-tuning. Batches are padded
    (data.padding_free does not apply; data.packing must stay off). DPO wants a far lower learning rate
    than SFT: 5e-6 to 5e-5 for LoRA on a real model (training.learning_rate)."""

    # Not a recipe key: where the recipe file was (set by load_recipe), so that an input that cannot be
    # found can name every place a relative path was looked for (inputs.py).
    _directory: Path | None = PrivateAttr(default=None)

    @property
    def directory(self) -> Path | None:
        """The directory of the recipe file this recipe was loaded from (None when built in code)."""
        return self._directory

    def is_quantized(self) -> bool:
        q = self.quantization
        return q is not None and (q.load_in_4bit or q.load_in_8bit)

    @property
    def stage(self) -> Literal["sft", "dpo"]:
        """What the adapter learns from: `sft` (answers to imitate) or `dpo` (preference pairs)."""
        return "dpo" if self.dpo is not None else "sft"


# Keys that SFTConfig has but that belong to another section of the recipe (or that loratool sets itself).
MOVED_KEYS: dict[str, str] = {
    "max_length": "data.max_length",
    "packing": "data.packing",
    "padding_free": "data.padding_free",
    "completion_only_loss": "data.completion_only_loss",
    "assistant_only_loss": "data.completion_only_loss",
    "chat_template_path": "data.chat_template",
    "truncation_mode": "data.truncation",
    "trust_remote_code": "model.trust_remote_code",
    "model_init_kwargs": "model",
    "resume_from_checkpoint": "the --resume option of `loratool train`",
}
# Set by loratool from the rest of the recipe; a recipe cannot override them.
RESERVED_TRAINING_KEYS = frozenset(
    {
        "dataset_text_field",
        "dataset_kwargs",
        "dataset_num_proc",
        "eos_token",
        "pad_token",
        "eval_packing",
        "packing_strategy",
        "shuffle_dataset",
        "remove_unused_columns",
        "label_names",
        "do_train",
        "do_eval",
        "do_predict",
        "eval_strategy",
        "save_strategy",
        "logging_strategy",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "local_rank",
        "push_to_hub",
        "hub_token",
    }
)
# LoraConfig fields that describe the adapter's bookkeeping, not a choice.
RESERVED_LORA_KEYS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "total_step",  # AdaLoRA: the run's number of optimizer steps (adalora.py)
    }
)


def cross_field_problems(recipe: Recipe) -> list[str]:
    """Rules that span fields, checked before anything heavy loads. Hardware rules: hardware.py."""
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
        known = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal")
        if init not in known and not init.startswith("pissa_niter_"):
            problems.append(
                f"lora.init_lora_weights: {init!r} is not a known initialization — use true, "
                + ", ".join(known)
                + " or pissa_niter_N"
            )
        if init == "loftq" and q is not None:
            problems.append(
                "lora.init_lora_weights: loftq quantizes the base itself — remove the quantization section"
            )
        from loratool.adapter.inits import init_problems

        problems += init_problems(recipe.lora, quantized=q is not None)
    from loratool.recipe.methods import method_problems

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


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML -> raw dict -> --set overrides -> unknown-key walk -> pydantic -> one error listing it all.
# ---------------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises LoratoolError listing every problem."""
    return load_recipe_with_origins(path, overrides)[0]


# Where a value of the recipe came from: "recipes/base.yaml:12", "--set lora.r=8"; absent = the default.
Origins = dict[str, str]


def load_recipe_with_origins(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Recipe, Origins]:
    """load_recipe, and for each key path given (`lora.r`, `data.train.0.path`) the file and line or the
    --set that set it. `extends:` chains are followed and deep-merged first; --set applies last."""
    path = Path(path)
    raw, duplicates, origins = _read_with_bases(path, chain=())
    for override in overrides:
        apply_override(raw, override)
        key_path = override.partition("=")[0].strip()
        _forget_under(origins, key_path)
        where = f"--set {override}"
        origins[key_path] = where
        for sub in _leaf_paths(_get_path(raw, key_path), key_path):
            origins[sub] = where
    recipe = validate_recipe(raw, source=str(path), problems=duplicates)
    recipe._directory = path.parent.resolve()
    return recipe, origins


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], list[str], Origins]:
    """One recipe file merged onto the files it extends: (raw mapping, duplicate-key problems, origins)."""
    raw, duplicates, lines = _read_one(path)
    if chain:  # a base file: its problems name it
        duplicates = [f"{path}: {problem}" for problem in duplicates]
    origins = {key: f"{path}:{line}" for key, line in lines.items() if not key.startswith("extends")}
    _resolve_relative_paths(raw, path.parent)
    base = raw.pop("extends", None)
    if base is None:
        return raw, duplicates, origins
    if not isinstance(base, str) or not base.strip():
        raise LoratoolError(
            f"{path}:{lines.get('extends', 1)}: extends must be the path of one base recipe, got {base!r}",
            hint="for example `extends: base.yaml` (relative to this recipe's directory)",
        )
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = Path(os.path.normpath(path.parent / base_path))  # sub/../base.yaml -> base.yaml
    here = (*chain, path)
    if any(_same_file(base_path, seen) for seen in here):
        cycle = " -> ".join(str(p) for p in (*here, base_path))
        raise LoratoolError(
            f"{path}: `extends` makes a cycle: {cycle}",
            hint="a recipe cannot extend itself or a recipe that extends it; remove one `extends`",
        )
    if not base_path.is_file():
        raise LoratoolError(
            f"{path}:{lines.get('extends', 1)}: extends {base!r}: no such recipe file ({base_path})",
            hint="the path is relative to the directory of the recipe that extends it",
        )
    base_raw, base_duplicates, base_origins = _read_with_bases(base_path, here)
    merged = _deep_merge(base_raw, raw, base_origins, "")
    return merged, base_duplicates + duplicates, {**base_origins, **origins}


def _read_one(path: Path) -> tuple[dict[str, Any], list[str], dict[str, int]]:
    """One YAML file -> (mapping, duplicate-key problems, 1-based line of every key path)."""
    source = str(path)
    try:
        loader = RecipeLoader(_read_recipe_text(path), source)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise LoratoolError(
            f"{where}: YAML syntax error: {problem}",
            hint="check indentation and quoting around that line",
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LoratoolError(
            f"{path}: a recipe must be a YAML mapping of sections, got a {type(raw).__name__}",
            hint="start from one of the files in recipes/",
        )
    return raw, loader.duplicate_keys, loader.key_lines


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def _deep_merge(base: dict[str, Any], child: dict[str, Any], origins: Origins, prefix: str) -> dict[str, Any]:
    """child over base: mappings merge key by key; lists and values replace (their base origins go)."""
    merged = dict(base)
    for key, value in child.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value, origins, f"{path}.")
        else:
            _forget_under(origins, path)
            merged[key] = value
    return merged


def _forget_under(origins: Origins, path: str) -> None:
    for key in [k for k in origins if k == path or k.startswith(f"{path}.")]:
        del origins[key]


def _get_path(raw: Any, key_path: str) -> Any:
    node = raw
    for key in key_path.split("."):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return None
    return node


def _leaf_paths(value: Any, prefix: str) -> list[str]:
    """Every key path inside a value (a section set whole by --set, a list of sources)."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    paths = []
    for key, sub in items:
        paths += [f"{prefix}.{key}", *_leaf_paths(sub, f"{prefix}.{key}")]
    return paths


def explain(recipe: Recipe, origins: Origins) -> str:
    """The resolved recipe as YAML, each value followed by a comment saying where it came from: a file and
    line, a --set, or `default`. Itself a valid recipe."""
    lines: list[tuple[str, str]] = []

    def scalar(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
        return text.removesuffix("\n...").strip()

    def origin(path: str) -> str:
        return origins.get(path, "default")

    def walk(value: dict[str, Any], prefix: str, indent: str, first: str | None = None) -> None:
        for i, (key, sub) in enumerate(value.items()):
            lead = first if (first is not None and i == 0) else indent
            path = f"{prefix}{key}"
            if isinstance(sub, dict) and sub:
                lines.append((f"{lead}{key}:", ""))
                walk(sub, f"{path}.", indent + "  ")
            elif isinstance(sub, list) and sub and all(isinstance(x, dict) for x in sub):
                lines.append((f"{lead}{key}:", ""))
                for n, item in enumerate(sub):
                    walk(item, f"{path}.{n}.", indent + "    ", first=f"{indent}  - ")
            else:
                lines.append((f"{lead}{key}: {scalar(sub)}", origin(path)))

    walk(recipe_to_dict(recipe), "", "")
    width = min(max(len(text) for text, _ in lines), 60) + 2
    return "\n".join(f"{text:<{width}}# {where}" if where else text for text, where in lines)


def _read_recipe_text(path: Path) -> str:
    """The recipe file as text, or a LoratoolError saying why it cannot be one."""
    if path.is_dir():
        raise LoratoolError(
            f"{path} is a directory, not a recipe file",
            hint="pass the path of a YAML recipe inside it, e.g. recipes/tiny-smoke.yaml",
        )
    if not path.is_file():
        raise LoratoolError(
            f"recipe file not found: {path}",
            hint="pass the path of a YAML recipe, e.g. recipes/tiny-smoke.yaml",
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoratoolError(f"{path}: cannot read the recipe: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LoratoolError(
            f"{path}:{line}: the recipe is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            hint="save the file as UTF-8 (most editors: 'save with encoding'), or check that it is a recipe",
        ) from None


# Aliases (`*name`) may add at most this many YAML nodes to a document on top of the ones written out. A
# recipe reuses a data source or a module list at most (tens of nodes); nine nested aliases of nine items
# each ("billion laughs") would expand to 9**9 nodes, a recursive alias to infinitely many, and validation
# walks every one of them. Counting stops at the limit, so refusing costs at most this many steps.
MAX_ALIAS_NODES = 10_000


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no Python tags, same types) that also checks the node graph before building
    anything: every repeated key is collected in `duplicate_keys` (PyYAML would keep the last silently),
    and a document whose aliases expand past MAX_ALIAS_NODES is refused."""

    def __init__(self, stream: str, source: str):
        super().__init__(stream)
        self.source = source
        self.duplicate_keys: list[str] = []
        self.key_lines: dict[str, int] = {}  # "lora.r" -> 1-based line of the key, for --explain

    def construct_document(self, node: yaml.Node) -> Any:
        self.duplicate_keys = self._check(node)
        return super().construct_document(node)

    def _check(self, root: yaml.Node) -> list[str]:
        """One walk over the document as it would expand: duplicate keys of each mapping (once per mapping,
        with the path it was first reached by), and the count of nodes that aliases add."""
        problems: list[str] = []
        seen: set[int] = set()
        repeated = 0
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            first_visit = id(node) not in seen
            if first_visit:
                seen.add(id(node))
            else:  # reached again through an alias: one more node in the expanded document
                repeated += 1
                if repeated > MAX_ALIAS_NODES:
                    raise LoratoolError(
                        f"{self.source}: YAML aliases expand this document past {MAX_ALIAS_NODES:,} extra "
                        "values (nested or recursive `*alias` references); refused before building it",
                        hint="write the values out, or use aliases only for a few small repeated parts",
                    )
            if isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    self.key_lines.setdefault(f"{path}{i}", item.start_mark.line + 1)
                children = [(item, f"{path}{i}.") for i, item in enumerate(node.value)]
                stack.extend(reversed(children))  # depth first in document order: paths as first written
            elif isinstance(node, yaml.MappingNode):
                if first_visit:
                    problems += self._duplicates(node, path)
                children = []
                for key, value in node.value:
                    name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                    self.key_lines.setdefault(f"{path}{name}", key.start_mark.line + 1)
                    children += [(key, path), (value, f"{path}{name}.")]
                stack.extend(reversed(children))
        return problems

    def _duplicates(self, node: yaml.MappingNode, path: str) -> list[str]:
        marks: dict[Any, list[yaml.Mark]] = {}
        shown: dict[Any, str] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys merge by design; complex keys do not occur in recipes
            value = self.construct_object(key)  # `lora`, "lora" and 'lora' are the same key
            marks.setdefault(value, []).append(key.start_mark)
            shown[value] = key.value
        problems = []
        for value, found in marks.items():
            if len(found) > 1:
                times = "twice" if len(found) == 2 else f"{len(found)} times"
                # One line (a flow mapping such as --set lora={r: 8, r: 16}): the columns tell them apart.
                one_line = len({m.line for m in found}) == 1
                at = [m.column + 1 if one_line else m.line + 1 for m in found]
                where = ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
                unit = "columns" if one_line else "lines"
                problems.append(f"{path}{shown[value]}: key given {times} ({unit} {where}) — keep one")
        return problems


def parse_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    """YAML text -> (data, one message per duplicated key). A syntax error raises yaml.YAMLError; an alias
    bomb, LoratoolError."""
    loader = RecipeLoader(text, source)
    try:
        return loader.get_single_data(), loader.duplicate_keys
    finally:
        loader.dispose()


def validate_recipe(
    raw: dict[str, Any], source: str = "recipe", problems: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """Validate a raw recipe mapping, reporting unknown keys, wrong types and cross-field rules together
    (with `problems` already found, such as duplicated keys)."""
    problems = [*problems, *unknown_key_problems(raw, Recipe, prefix="")]
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += _describe_all([err for err in exc.errors() if err["type"] != "extra_forbidden"])
        recipe = None
    if recipe is not None:
        problems += cross_field_problems(recipe)
    if problems:
        lines = "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise LoratoolError(
            f"{source}: {count} in the recipe:\n{lines}",
            hint="fix the keys above; `loratool recipe-reference` lists every valid key with its meaning",
        )
    assert recipe is not None
    return recipe


def _describe_all(errors: list[Any]) -> list[str]:
    """One line per key path. A union type (list of sources | fraction) fails once per alternative:
    those failures are joined into one line rather than shown as contradicting lines."""
    by_path: dict[str, list[Any]] = {}
    for err in errors:
        by_path.setdefault(_key_path(err["loc"]), []).append(err)
    lines = []
    for path, errs in by_path.items():
        if any(e["type"] == "missing" for e in errs):
            lines.append(f"{path}: required key is missing")
            continue
        if errs[0]["type"] == "value_error":
            lines.append(f"{path}: {errs[0]['msg'].removeprefix('Value error, ')}")
            continue
        wanted = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in errs))
        value = errs[0].get("input")
        shown = repr(value) if len(repr(value)) < 60 else type(value).__name__
        lines.append(f"{path}: expected {wanted} (got {shown})")
    return lines


def _key_path(loc: tuple[Any, ...]) -> str:
    # pydantic adds the tried type to the location of union members (`list[DataSource]`, `float`,
    # `constrained-float`...); the user only needs the key path, which is made of names and list indices.
    keys = [str(p) for p in loc if isinstance(p, int) or p.isidentifier()]
    known = {"str", "int", "float", "bool", "list", "dict"}
    return ".".join(k for k in keys if k not in known)


def unknown_key_problems(raw: Any, model: type[BaseModel], prefix: str) -> list[str]:
    """Walk a raw mapping against the schema; one message per unknown key, with the closest valid key."""
    if not isinstance(raw, dict):
        return []
    fields = model.model_fields
    problems = []
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key in fields:
            for sub in _section_models(fields[key].annotation):
                if isinstance(value, list):
                    for i, item in enumerate(value):
                        problems += unknown_key_problems(item, sub, f"{path}.{i}.")
                else:
                    problems += unknown_key_problems(value, sub, f"{path}.")
            continue
        message = _unknown_key_message(str(key), model, prefix)
        if message:
            problems.append(message)
    return problems


def _unknown_key_message(key: str, model: type[BaseModel], prefix: str) -> str:
    path = f"{prefix}{key}"
    if model is TrainingSection:
        if key in MOVED_KEYS:
            return f"{path}: belongs in {MOVED_KEYS[key]}, not in training"
        if key in RESERVED_TRAINING_KEYS:
            return f"{path}: set by loratool from the rest of the recipe — remove it"
        if key in SFT_CONFIG_FIELDS:
            return ""  # a valid SFTConfig field loratool passes through untouched
    if model is LoraSection:
        if key in RESERVED_LORA_KEYS:
            return f"{path}: set by loratool — remove it"
        if key in LORA_CONFIG_FIELDS:
            return ""
    candidates = list(model.model_fields)
    if model is TrainingSection:
        candidates += sorted(SFT_CONFIG_FIELDS - RESERVED_TRAINING_KEYS - set(MOVED_KEYS))
    if model is LoraSection:
        candidates += sorted(LORA_CONFIG_FIELDS - RESERVED_LORA_KEYS)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"{path}: unknown key — did you mean {prefix}{close[0]}?"
    elsewhere = _section_owning(key)
    if elsewhere:
        return f"{path}: unknown key here — it belongs in {elsewhere}"
    return f"{path}: unknown key (valid keys here: {', '.join(model.model_fields)})"


def _section_owning(key: str) -> str | None:
    for name, field in Recipe.model_fields.items():
        for sub in _section_models(field.annotation):
            if key in sub.model_fields:
                return f"{name}.{key}"
    return None


def _section_models(annotation: Any) -> list[type[BaseModel]]:
    """The Section classes inside an annotation such as `QuantizationSection | None` or list[DataSource]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found += _section_models(arg)
    return found


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `--set key.path=value`; the value is parsed as YAML (numbers, booleans, [lists])."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path.strip():
        raise LoratoolError(
            f"--set {override!r}: expected KEY.PATH=VALUE",
            hint="for example --set training.learning_rate=1e-4 or --set data.train.0.path=my.jsonl",
        )
    value: Any = ""
    if text.strip():
        try:
            value, duplicates = parse_yaml(text, f"--set {override!r}")
        except yaml.YAMLError:
            value, duplicates = text, []
        if duplicates:
            raise LoratoolError(f"--set {override!r}: {'; '.join(duplicates)}")
    keys = key_path.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            node = _list_item(node, key, where, override)
            continue
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict | list):
            raise LoratoolError(f"--set {override!r}: {where} is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        index = _index(last, key_path, override, len(node))
        node[index] = value
    else:
        node[last] = value


def _list_item(node: list, key: str, where: str, override: str) -> Any:
    return node[_index(key, where, override, len(node))]


def _index(key: str, where: str, override: str, length: int) -> int:
    if not key.isdigit() or int(key) >= length:
        raise LoratoolError(
            f"--set {override!r}: {where} must index a list item (0 to {length - 1})",
            hint="lists are indexed by position, e.g. data.train.0.path",
        )
    return int(key)


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """Make base_model, data and template paths relative to the recipe file, so a recipe works from any
    working directory.

    A relative path that does not exist next to the recipe is left as written: it may be relative to the
    working directory, or a hub id (org/name). training.output_dir stays relative to the working directory.
    """
    model = raw.get("base_model")
    if isinstance(model, str) and model.startswith(("./", "../")) and (base / model).exists():
        raw["base_model"] = str((base / model).resolve())
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for split in ("train", "validation"):
        sources = data.get(split)
        if not isinstance(sources, list):
            continue
        for source in sources:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                candidate = base / source["path"]
                if not Path(source["path"]).is_absolute() and candidate.exists():
                    source["path"] = str(candidate)
    template = data.get("chat_template")
    if isinstance(template, str) and template.endswith((".jinja", ".j2")) and (base / template).exists():
        data["chat_template"] = str(base / template)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (every default filled in), as plain data for YAML."""
    return recipe.model_dump(mode="json")


def reference() -> str:
    """Every recipe key with its type, default and meaning, generated from the docstrings above."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            subs = _section_models(field.annotation)
            if field.is_required():
                default = "required"
            elif subs and subs[0] is not DataSource:
                default = "section" if field.default is not None else "optional section"
            else:
                default = f"default: {field.default!r}"
            out.append(f"{prefix}{name}  ({default})")
            if field.description:
                out.extend("    " + line.strip() for line in field.description.splitlines())
            for sub in subs:
                walk(sub, f"{prefix}{name}{'.N' if sub is DataSource else ''}.")

    out.append("extends  (optional)")
    out.append(
        "    Path of a base recipe (relative to this file) deep-merged under this one: mappings merge key"
    )
    out.append("    by key, lists and values replace. Chains are allowed, cycles refused.")
    walk(Recipe, "")
    out.append("")
    out.append("training also accepts any other trl.SFTConfig field; lora any other peft.LoraConfig field.")
    return "\n".join(out)


def reference_markdown() -> str:
    """docs/recipe-reference.md: the reference above, for reading on the web."""
    return (
        "# Recipe reference\n\n"
        "Generated from the schema in `loratool/recipe.py` by `loratool recipe-reference --markdown`; "
        "a test keeps it in sync.\n\n```\n" + reference() + "\n```\n"
    )
