"""The recipe's sections: one strict, typed schema, every field documented once, at its definition.

Inside `quantization`, `lora` and `training` the keys carry the names of transformers'
`BitsAndBytesConfig`, peft's `LoraConfig` and trl's `SFTConfig`, so that what a user knows from those
libraries works as expected. `lora` and `training` also accept any other field of `LoraConfig` /
`SFTConfig` that loratool does not document itself; it is handed to the library untouched.

A section checks its own fields (types, ranges, regexes); rules that span fields are in rules.py, and
reading a file (extends, --set, the one error listing every problem) in load.py. The loaded recipe is
frozen; derived values are functions, never fields written back.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
PositiveInt = Annotated[int, Field(gt=0)]

# Every number in a recipe, in every section (pass-through library fields and the numbers inside lists
# and mappings included), is finite and at most this large either way: far beyond any real run (4 billion
# steps, tokens, rows or rank; a learning rate of 4e9), and small enough that nothing downstream overflows
# on it after the model has loaded (`.inf`, or a typo such as 1.0e+23 steps). It is numpy's largest seed.
NUMBER_LIMIT = 2**32 - 1


def number_problem(value: Any) -> str | None:
    """Why a number (or a number inside a list or mapping) cannot be in a recipe; None when it can."""
    if isinstance(value, dict):
        return next((f"{k}: {p}" for k, v in value.items() if (p := number_problem(v))), None)
    if isinstance(value, list | tuple):
        return next((f"item {i}: {p}" for i, v in enumerate(value) if (p := number_problem(v))), None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if abs(value) > NUMBER_LIMIT:
        return f"{value:g} is out of range (a recipe number is at most {NUMBER_LIMIT:,} either way)"
    return None


def _sane_number(value: Any) -> Any:
    problem = number_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty (an empty path means the current directory)")
    return value


# A file, directory or hub id: never empty (an empty output_dir would write into the current directory).
PathText = Annotated[str, AfterValidator(_not_empty)]
# A `lora` / `training` key loratool passes to peft / trl untouched: checked only for sane numbers.
PassThrough = Annotated[Any, AfterValidator(_sane_number)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are frozen after load, and every
    number is finite and within NUMBER_LIMIT."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _numbers_in_range(cls, value: Any) -> Any:
        # Every field of every section, so that a new field cannot forget its bound.
        return _sane_number(value)


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

    tokenizer: PathText | None = None
    """Load the tokenizer from another hub id or directory than `base_model`."""

    gguf_source: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
    """For a .gguf `base_model`: the hub id of the checkpoint the file was converted from (e.g.
    HuggingFaceTB/SmolLM2-135M-Instruct). adapter_config.json and the model card name it as the base, so
    the shared adapter loads on another machine; unset, the file's metadata is read (general.source.url
    and the like), else the file's name and sha256 are given. Refused for any other base (it names itself)."""


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
    __pydantic_extra__: dict[str, PassThrough] = Field(init=False)

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

    path: PathText
    """A .json, .jsonl, .csv, .parquet or .txt file, a directory of them, or a hub dataset id. Relative
    paths are resolved against the recipe file's directory."""

    format: Literal[
        "auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference", "unpaired",
        "prompt",
    ] = "auto"  # fmt: skip
    """Row layout. `auto` detects it from the first row: messages -> messages, conversations -> sharegpt,
    instruction + output -> alpaca, prompt + completion -> prompt_completion, text -> text. With a `dpo` or
    `reward` section the rows are preference pairs: `preference` (prompt / chosen / rejected, each a string
    or a list of chat messages) or `sharegpt` (conversations + chosen / rejected messages); `auto` tells
    them apart. With a `kto` section also `unpaired` (prompt / completion / label: true or false). With a
    `grpo` or `rloo` section the rows are `prompt` rows: a prompt to answer (a string, or a list of chat
    messages) and the columns the rewards read."""

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

    chat_template: PathText | None = None
    """None: the tokenizer's own. A built-in name (chatml, llama2, llama3, mistral, zephyr, alpaca, gemma) for
    tokenizers that have none, or the path of a Jinja file. The template used is saved with the adapter."""

    max_length: PositiveInt = 2048
    """Longest tokenized example, in tokens. What happens to longer ones: `truncation`."""

    truncation: Literal["truncate", "drop"] = "truncate"
    """`truncate`: keep the first max_length tokens (the cut part, end-of-turn included, is not learned);
    `drop`: skip the row. Rows left with no loss token are always dropped, and counted."""

    prompt_truncation: Literal["keep_start", "keep_end"] = "keep_start"
    """Preference pairs (dpo, reward) and unpaired rows (kto) longer than max_length, with truncation
    `truncate`; trl's DPOConfig
    truncation_mode. `keep_start`: the answers are cut from their end, and a pair whose prompt alone fills
    max_length is dropped. `keep_end`: the prompt is cut from its start instead: it keeps its last tokens
    (the turns nearest the answers; a system prompt at its start goes) and leaves the answers whole, or at
    least half of max_length for them. The data summary counts the pairs dropped and the prompts cut.
    keep_end is refused where it would do nothing: other methods, or truncation `drop`."""

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
    __pydantic_extra__: dict[str, PassThrough] = Field(init=False)

    output_dir: PathText
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
    checkpointing back on for all layers after each reference pass; online RL (`grpo:`, `rloo:`) too,
    after each generation."""

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

    seed: Annotated[int, Field(ge=0)] = 42
    """Seeds shuffling, the validation split, dropout and adapter initialization. 0 to 4,294,967,295
    (numpy's range)."""

    report_to: list[str] | str = "none"
    """Experiment trackers (tensorboard, wandb, trackio, ...). loratool always writes metrics.jsonl."""

    ddp_timeout: PositiveInt | None = None
    """Several processes (torchrun, accelerate launch): seconds a process waits for the others. A process
    that is silent this long (stopped, a hung machine: no heartbeat) or fails makes every other one stop
    with an error naming it; the run stays resumable. None: 60 on CPU, 600 on CUDA (the first step
    compiles, big checkpoints take minutes to write), not transformers' 1800. The main process's work
    alone (tokenizing, writing checkpoints) is waited for as long as it keeps beating."""

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

    init_adapter: PathText | None = None
    """Start from the adapter of a finished loratool run on the same base (usually an SFT run, e.g.
    out/sft-run) instead of a fresh one; that adapter is also the reference. The `lora` section must match
    the run's. A relative path is resolved against the current directory."""


class KtoSection(Section):
    """Preference tuning from unpaired judgements with trl's KTOTrainer."""

    beta: float = Field(0.1, gt=0)
    """How far the tuned model may move from the reference: higher keeps it closer (the KTO paper's 0.1 is
    typical)."""

    desirable_weight: float = Field(1.0, gt=0)
    """Weight of the loss on desirable (label: true) completions. With unequal counts, the KTO paper
    recommends desirable_weight * desirable rows / (undesirable_weight * undesirable rows) in [1, 4/3];
    the data summary warns, with the range for your counts, when it is not."""

    undesirable_weight: float = Field(1.0, gt=0)
    """Weight of the loss on undesirable (label: false) completions; see desirable_weight."""

    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """`kto` (the KTO paper: needs training.per_device_train_batch_size of 2 or more, since each row's KL
    term is estimated from another row's completion in the same micro-batch) or `apo_zero_unpaired`
    (APO-zero, no KL term)."""

    init_adapter: PathText | None = None
    """Start from the adapter of a finished loratool run on the same base (usually an SFT run) instead of a
    fresh one; that adapter is also the reference. As for dpo.init_adapter."""


class RewardSection(Section):
    """A reward model: the base with a one-number score head, trained on preference pairs with trl's
    RewardTrainer (loss -log sigmoid(score(chosen) - score(rejected)))."""

    center_rewards_coefficient: float | None = Field(None, gt=0)
    """Adds this times the mean squared score to the loss, which keeps scores centred on zero (trl's
    RewardConfig; 0.01 is the recommended value). None: no centring term."""


# The kinds of reward a `rewards:` item can be; exactly one of these keys is set in each.
REWARD_KINDS = ("exact_match", "number", "regex", "valid_json", "length", "function", "model")


class RewardFunction(Section):
    """One reward of an online RL run (`grpo`, `rloo`): set exactly one of exact_match, number, regex,
    valid_json, length, function and model. Each completion is scored by every reward; the run maximizes
    their weighted sum."""

    exact_match: str | None = None
    """1 when the completion, stripped of surrounding whitespace, equals this column of its row (the
    reference answer, e.g. `answer`), else 0."""

    number: str | None = None
    """1 when the last number in the completion equals the number in this column of its row (within
    `tolerance`), else 0: for answers worked out in prose ("... so the total is 42")."""

    tolerance: float = Field(0.0, ge=0)
    """`number` only: the largest difference still counted as equal (0: exactly equal)."""

    regex: str | None = None
    """1 when the whole completion (stripped) matches this regular expression, else 0: a format check,
    e.g. `name=.+; qty=\\d+`. `.` matches newlines too; wrap it in `.*` to look for it anywhere."""

    valid_json: bool = False
    """1 when the completion (stripped) parses as JSON, else 0."""

    length: PositiveInt | None = None
    """A target completion length in tokens: the reward is 0 at the target and falls linearly to -1 at no
    tokens and at twice the target: max(-1, -|tokens - length| / length). Keeps answers short."""

    function: PathText | None = None
    """Your own reward, `file.py:function`, loaded from that file only (a relative path is resolved against
    the recipe's directory). Called as function(completions=[str, ...], prompts=[...], completion_ids=[[int,
    ...], ...], **columns), with each other column of the data as a list of the same length (`answer=[...]`);
    it returns one number per completion (None: this reward does not apply to that completion)."""

    model: PathText | None = None
    """A reward model: the run directory of a finished `loratool train` run with a `reward` section. It
    scores each prompt + completion."""

    weight: float = 1.0
    """How much this reward counts in the sum the run maximizes (negative: a penalty). Each reward is also
    logged on its own, unweighted: rewards/NAME/mean and rewards/NAME/std in metrics.jsonl."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """The name it is logged under (rewards/NAME/mean). Default: its kind (exact_match, number, regex,
    valid_json, length), the function's name, or the reward model directory's name."""

    @model_validator(mode="after")
    def _one_kind(self) -> RewardFunction:
        kinds = self.kinds()
        if len(kinds) != 1:
            given = f"{' and '.join(kinds)} are both set" if kinds else "none is set"
            raise ValueError(f"a reward sets exactly one of {', '.join(REWARD_KINDS)}; {given}")
        if self.tolerance and self.number is None:
            raise ValueError("tolerance: only used by a `number` reward")
        if self.regex is not None:
            _check_regex(self.regex, self.regex, "the completion must match it whole")
        if self.function is not None:
            file, _, function = self.function.rpartition(":")
            if not file.endswith(".py") or not function.isidentifier():
                raise ValueError(
                    f"function: {self.function!r} must be `file.py:function` (a Python file and the name of "
                    "a function in it)"
                )
        return self

    def kinds(self) -> list[str]:
        """The kind keys set (exactly one in a valid reward)."""
        return [k for k in REWARD_KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    def reference_column(self) -> str | None:
        """The data column each row must hold for this reward (exact_match, number), or None."""
        return self.exact_match or self.number

    def logged_name(self) -> str:
        """The name trl logs it under: `name`, else the kind, the function's name or the model's folder."""
        if self.name:
            return self.name
        if self.function is not None:
            return self.function.rpartition(":")[2]
        if self.model is not None:
            return Path(self.model).name or "reward_model"
        return self.kind


class OnlineRlSection(Section):
    """What GRPO and RLOO share: the model answers each prompt `num_generations` times, every completion is
    scored by the rewards, and the adapter learns to make the better-scored completions of a prompt more
    likely. Both trl trainers take these fields under the same names (GRPOConfig, RLOOConfig)."""

    rewards: list[RewardFunction] = Field(min_length=1)
    """The rewards, each with its weight: built-in checks against the row's columns (exact_match, number),
    format checks (regex, valid_json), a length target, your own Python function, or a reward model run."""

    num_generations: Annotated[int, Field(ge=2)] = 8
    """Completions sampled per prompt; each is scored against the others of its prompt. More gives a better
    baseline at proportionally more generation time. training.per_device_train_batch_size counts
    completions, not prompts: it x gradient_accumulation_steps x processes must be a multiple of this."""

    max_completion_length: PositiveInt = 256
    """Longest completion generated, in tokens (generation stops earlier at the end-of-turn token). Prompts
    are not cut: a prompt longer than data.max_length is dropped and counted."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the completions. Lower makes the completions of a prompt more alike (less to
    compare); 0.7-1.0 is typical."""

    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: sample only from the most likely tokens that make up this probability (1: all)."""

    epsilon: float = Field(0.2, gt=0)
    """Clipping of the policy ratio (as in PPO): how far one update may move a completion's probability."""

    num_iterations: PositiveInt = 1
    """Updates made on each batch of completions before new ones are generated (1: always fresh ones)."""

    mask_truncated_completions: bool = False
    """Leave completions cut at max_completion_length out of the loss (the DAPO paper's advice when many
    are): an unfinished answer is then not punished for being unfinished."""

    use_vllm: bool = False
    """Generate with vLLM (much faster). Needs vllm installed and a CUDA GPU; otherwise the run is refused.
    Off: transformers' generate, on any device."""

    init_adapter: PathText | None = None
    """Start from the adapter of a finished loratool run on the same base (usually an SFT run that taught
    the format) instead of a fresh one; the reference of the KL term (`beta`) is then that adapter. The
    `lora` section must match the run's. A relative path is resolved against the current directory."""

    @field_validator("rewards")
    @classmethod
    def _distinct_names(cls, rewards: list[RewardFunction]) -> list[RewardFunction]:
        names = [reward.logged_name() for reward in rewards]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"two rewards are logged as {', '.join(twice)} — give each a `name:` of its own")
        return rewards


class GrpoSection(OnlineRlSection):
    """Online RL with trl's GRPOTrainer (Group Relative Policy Optimization): a completion's advantage is
    its reward minus the mean of its prompt's group, divided by the group's spread (`scale_rewards`)."""

    beta: float = Field(0.0, ge=0)
    """Weight of the KL penalty that keeps the model near the reference (the base, or init_adapter). 0
    (trl's default): no KL term and no reference pass, faster; the DeepSeek-R1 paper used 0.001."""

    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = "dapo"
    """trl's GRPO loss: `dapo` (trl's default: token-level, no length bias), `grpo` (the paper: per sequence,
    favours short correct answers), `dr_grpo` (Dr. GRPO), ... see trl's GRPOConfig."""

    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide the advantages by the reward spread of the prompt's group (`group`, the paper), of the whole
    batch (`batch`), or not at all (`none`, Dr. GRPO's advice: no bias towards easy or hard prompts)."""


class RlooSection(OnlineRlSection):
    """Online RL with trl's RLOOTrainer (REINFORCE Leave-One-Out): a completion's advantage is its reward
    minus the mean reward of the other completions of its prompt."""

    beta: float = Field(0.05, ge=0)
    """Weight of the KL penalty that keeps the model near the reference (the base, or init_adapter); trl's
    RLOO default 0.05. 0: no KL term and no reference pass."""

    normalize_advantages: bool = False
    """Divide the advantages by their standard deviation over the batch."""


class Recipe(Section):
    """A fine-tuning recipe: the base model, how it is loaded, the adapter, the data and the run."""

    base_model: PathText
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

    kto: KtoSection | None = None
    """Preference tuning from unpaired judgements (KTO). Present (`kto: {}` for the defaults): each row is
    a prompt, one completion and a `label` (true: desirable, false: undesirable), trained with trl's
    KTOTrainer; preference pairs may be given too, each split into one desirable and one undesirable
    row (as trl does). The reference model is handled as for dpo. Batches are padded (data.packing must
    stay off). Like DPO it wants a far lower learning rate than SFT (5e-6 to 5e-5 for LoRA)."""

    reward: RewardSection | None = None
    """A reward model. Present (`reward: {}` for the defaults): the base is loaded with a score head
    (transformers' AutoModelForSequenceClassification, one label), the adapter (task_type SEQ_CLS) and the
    head are trained on preference pairs (the formats dpo takes) to score the chosen answer above the
    rejected one. The run directory is a PEFT adapter whose head is saved with it (modules_to_save);
    `loratool eval RUN` reports its pairwise accuracy. Longer pairs: data.max_length and data.truncation
    (`drop` is what trl's RewardTrainer does)."""

    grpo: GrpoSection | None = None
    """Online RL with GRPO. Present: each row is a prompt (with the columns the rewards read, e.g. an
    `answer`); the model answers it grpo.num_generations times, the rewards score each completion and the
    adapter learns from how each scored against its group, with trl's GRPOTrainer. No answer is imitated:
    what is learned comes from the rewards. Usually after an SFT run (grpo.init_adapter) that taught the
    format. Wants a low learning rate: 1e-6 to 1e-5 for LoRA on a real model."""

    rloo: RlooSection | None = None
    """Online RL with RLOO (REINFORCE Leave-One-Out): as grpo, with trl's RLOOTrainer; each completion is
    compared with the mean of the other completions of its prompt."""

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
    def stage(self) -> str:
        """The training method: the one method section present (dpo, kto, reward, grpo, rloo), else `sft`
        (answers to imitate). Two sections at once are refused when the recipe loads (rules.py)."""
        present = self.method_sections()
        return present[0] if present else "sft"

    def method_sections(self) -> list[str]:
        """The method sections present, in METHOD_SECTIONS order (more than one is a recipe error)."""
        return [name for name in METHOD_SECTIONS if getattr(self, name, None) is not None]


# The sections that each choose a training method other than supervised fine-tuning; at most one is set.
METHOD_SECTIONS = ("dpo", "kto", "reward", "grpo", "rloo")


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

# `extends` is not a field: load.py reads it and merges the base before the schema sees the recipe.
EXTENDS_DOC = """Path of a base recipe (relative to this file) deep-merged under this one: mappings merge key
by key, lists and values replace. Chains are allowed, cycles refused. A recipe that extends another
needs none of the required keys itself. `key: null` for a key that cannot be null drops the inherited
value: the key is back to its default (`lora_alpha: null` when a VeRA recipe extends a LoRA one). A key
that can be null is set to null (`quantization: null` removes the base's section)."""


def section_models(annotation: Any) -> list[type[BaseModel]]:
    """The Section classes inside an annotation such as `QuantizationSection | None` or list[DataSource]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found += section_models(arg)
    return found
