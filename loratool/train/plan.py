"""`loratool plan`: what a training run will cost — memory by component, speed, wall time — from the
model's config alone (a weightless copy on the meta device), before anything heavy downloads.

Memory model (bytes; N = parameters, T = tokens in the largest micro-batch, L = layers, h = hidden size,
i = intermediate size, V = vocabulary, b = bytes per activation element):

    base weights    non-quantized params x b_w  +  quantized linear params x (0.5 + 1/64 (double quant)
                    or + 4/64 (plain absmax) for 4-bit, 1 + 4/out for 8-bit)
    adapter         LoRA params x 4 (PEFT keeps adapters in fp32), gradients the same again
    optimizer       LoRA params x 8 (AdamW: two fp32 states), x 2 (8-bit), x 0 (sgd)
    activations     L x T x (A_H h + A_I i) x b (A_H, A_I: CPU fitted, GPU from the literature); with gradient checkpointing L x T x h x b plus one
                    layer's full set; eager attention adds L x B x heads x s^2 x b x 2
    logits          T x V x LOGIT_BYTES (the logits, their fp32 copy for the loss, and its gradient)
    runtime         the process with torch/transformers/trl loaded (CPU), or CUDA workspace (GPU)

On a CPU the process peak also covers loading: safetensors pages are mapped while the weights are copied
in, so the load peak is about runtime + LOAD_FACTOR x weights. The coefficients are fitted on this
project's CPU benchmark (scripts/bench_plan.py, docs/benchmarks.md); the GPU formula is the same with
b = 2 (bf16) and is checked there against published QLoRA figures.

Speed: FLOPs per token ~ 2N (forward) + 2N (backward through the frozen base: activation gradients only)
+ 2N again with gradient checkpointing (the recomputed forward), plus the adapter's own, plus attention
(6 x L x s x h per token, x 4/3 with checkpointing); divided by the device's peak at a stated efficiency.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from loratool.adapter.inits import shapes_only
from loratool.adapter.lora import attach_adapter
from loratool.data.preference import padded_pair_lengths
from loratool.errors import LoratoolError
from loratool.model import hardware, threads
from loratool.model.gguf_base import resolve_base_model
from loratool.model.load import load_tokenizer, model_from_config
from loratool.recipe import recipe_to_dict, validate_recipe
from loratool.rundir.records import read_run
from loratool.train.arguments import checkpoint_every_n_layers
from loratool.train.plan_devices import DevicesPlan, OneDevice, spread
from loratool.train.sft import packed_rows_per_batch

if TYPE_CHECKING:
    from loratool.recipe import Recipe, TrainingSection

GiB = 1024**3

# Activation elements kept per token per layer, per unit of the hidden and the intermediate size, for a
# LoRA-adapted decoder layer without checkpointing. CPU: fitted on scripts/bench_plan.py (fp32 through
# and through). GPU: the Korthikanti et al. (2022) count for a 16-bit layer (~34 s h bytes per layer:
# 17 elements of h) plus the SwiGLU MLP's three intermediate-sized tensors and the LoRA inputs; checked
# against the published QLoRA 7B figure (tests/unit/train/test_plan.py), not measured here. Both were fitted before
# cheap_recompute.py, which rebuilds the norm and gated-MLP outputs instead of keeping them (~39% fewer bytes
# on SmolLM2's shapes, scripts/bench_memory_savers.py): they now overestimate; a refit is due.
CPU_A_H, CPU_A_I = 24.0, 6.5
GPU_A_H, GPU_A_I = 18.0, 5.0
LOGIT_BYTES = 12  # per token per vocabulary entry: fp32 logits, the loss's copy, its gradient
CPU_RUNTIME = int(0.5 * GiB)  # resident set of python + torch + transformers + trl + peft, data loaded
CPU_LOAD_FACTOR = 0.5  # extra share of the weights resident while loading (mapped file pages), fitted
# With gradient checkpointing on a CPU, the measured peak keeps ~46% of the no-checkpointing activations
# (fitted on two shapes in scripts/bench_plan.py), not the ~1/L the formula below gives for a GPU; the
# cause (what the CPU path keeps, or what glibc's allocator holds on to) is not established.
CPU_CHECKPOINT_SHARE = 0.46
GPU_RUNTIME = int(0.35 * GiB)  # cuBLAS workspace, allocator fragmentation (CUDA allocated, no context)

# name -> (memory bytes, dense bf16 peak FLOP/s). Efficiency: the share of the peak LoRA training reaches.
GPUS: dict[str, tuple[int, float]] = {
    "T4": (16 * GiB, 65e12),
    "A10": (24 * GiB, 125e12),
    "A10G": (24 * GiB, 125e12),
    "L4": (24 * GiB, 121e12),
    "RTX3090": (24 * GiB, 71e12),
    "RTX4090": (24 * GiB, 165e12),
    "A100-40GB": (40 * GiB, 312e12),
    "A100-80GB": (80 * GiB, 312e12),
    "L40S": (48 * GiB, 362e12),
    "H100": (80 * GiB, 989e12),
    "H200": (141 * GiB, 989e12),
}
GPU_EFFICIENCY = 0.35  # LoRA steps reach ~30-40% of the dense peak (small matmuls, dequantization)
CPU_FLOPS_PER_CORE = 2.5e10  # fp32, measured order of magnitude for recent x86 cores in PyTorch matmuls
CPU_EFFICIENCY = 0.5
# Decoding one token at a time reads every weight per token step: memory-bound, a small share of the peak.
GENERATION_EFFICIENCY = 0.05


@dataclass
class Plan:
    """The prediction for one recipe on one device."""

    device: str  # "cpu", a GPU name, or "budget"
    budget_bytes: int | None
    components: dict[str, int]
    peak_memory_bytes: int
    parameters: int
    trainable_parameters: int
    tokens_per_step: int
    steps: int | None
    tokens_total: int | None
    flops_per_token: float
    tokens_per_second: float
    wall_seconds: float | None
    conflicts: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # --calibrate: measured vs predicted
    devices: DevicesPlan | None = None  # --nodes / --gpus-per-node: the plan spread over them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.peak_memory_bytes <= self.budget_bytes

    def summary_line(self) -> str:
        wall = f", ~{_duration(self.wall_seconds)} for {self.steps:,} steps" if self.wall_seconds else ""
        budget = ""
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits() else "does NOT fit"
            budget = f" · {verdict} {_size(self.budget_bytes)}"
        return (
            f"plan: peak memory ~{_size(self.peak_memory_bytes)} on {self.device}{budget} · "
            f"~{self.tokens_per_second:,.0f} tokens/s{wall}"
        )

    def format(self) -> str:
        lines = [self.summary_line(), "  memory by component:"]
        for name, value in self.components.items():
            lines.append(f"    {name:<22} {_size(value):>10}")
        lines.append(f"    {'peak':<22} {_size(self.peak_memory_bytes):>10}")
        lines.append(
            f"  model: {self.parameters:,} parameters, {self.trainable_parameters:,} trainable · "
            f"{self.flops_per_token / 1e9:,.2f} GFLOP per token"
        )
        if self.tokens_total:
            lines.append(
                f"  run: {self.steps:,} steps x {self.tokens_per_step:,} tokens = {self.tokens_total:,} tokens"
            )
        lines += [f"  assumption: {a}" for a in self.assumptions]
        lines += [f"  conflict: {c}" for c in self.conflicts]
        lines += [f"  suggestion: {s}" for s in self.suggestions]
        if self.devices is not None:
            lines.append(self.devices.format())
        if self.calibration:
            c = self.calibration
            lines.append(
                f"  calibration ({c['steps']} real steps here): peak {_size(c['measured_peak_bytes'])} measured vs "
                f"{_size(self.peak_memory_bytes)} predicted ({c['peak_error']:+.0%}); "
                f"{c['measured_tokens_per_second']:,.0f} tokens/s measured vs {self.tokens_per_second:,.0f} predicted"
            )
        return "\n".join(lines)


@dataclass
class ModelShape:
    """What the plan needs of the model, counted on a weightless copy."""

    parameters: int
    quantizable: int  # parameters in linear layers bitsandbytes would quantize
    quantizable_rows: int  # their output rows (8-bit keeps one fp32 scale per row)
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    model_type: str


def model_shape(recipe: Recipe, config: Any) -> ModelShape:
    """Count parameters and adapter size on a meta-device model: no weights are read."""
    import torch

    with torch.device("meta"):
        model = model_from_config(recipe, config)  # a reward model: with its score head
    skip = set(recipe.quantization.llm_int8_skip_modules or []) if recipe.quantization else set()
    output = model.get_output_embeddings()
    quantizable = rows = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output and name.split(".")[-1] not in skip:
            quantizable += module.weight.numel()
            rows += module.weight.shape[0]
    total = sum(p.numel() for p in model.parameters())
    # The adapter's shape only: no calibration pass or weight decomposition on weights that are not there.
    lora = shapes_only(recipe.lora)
    model = attach_adapter(model, lora, quantized=False, gradient_checkpointing=False)
    trainable, _ = model.get_nb_trainable_parameters()
    get = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(get.hidden_size)
    return ModelShape(
        parameters=total,
        quantizable=quantizable,
        quantizable_rows=rows,
        trainable=int(trainable),
        layers=int(get.num_hidden_layers),
        hidden=hidden,
        intermediate=int(getattr(get, "intermediate_size", None) or 4 * hidden),
        heads=int(get.num_attention_heads),
        vocab=int(get.vocab_size),
        model_type=str(config.model_type),
    )


def layers_to_checkpoint(training: TrainingSection, layers: int) -> int:
    """How many of `layers` decoder layers `training.gradient_checkpointing` recomputes (every n-th)."""

    if training.gradient_checkpointing is False:
        return 0
    return -(-layers // checkpoint_every_n_layers(training))


def make_plan(
    recipe: Recipe,
    shape: ModelShape,
    *,
    device: str = "cpu",
    budget_bytes: int | None = None,
    cpu_count: int = 1,
    lengths: list[int] | None = None,
    rows: int | None = None,
) -> Plan:
    """The prediction. `device`: "cpu", a name in GPUS, or "budget" (a memory budget, GPU formula);
    `lengths`: token lengths of the training rows when the data was read (else max_length is assumed)."""
    on_gpu = device != "cpu"
    q = recipe.quantization
    data, t = recipe.data, recipe.training
    assumptions = []
    # Bytes per weight / activation element: fp32 on CPU (dtype auto), bf16/fp16 on GPU.
    dtype = recipe.model.dtype
    w_bytes = 4 if dtype == "float32" or (dtype == "auto" and not on_gpu) else 2
    act_bytes = w_bytes
    batch = t.per_device_train_batch_size
    max_len = data.max_length
    rl = online_rl_section(recipe)
    if rl is not None:  # a row is a prompt; each completion trains with its prompt (batch counts completions)
        max_len += rl.max_completion_length
        lengths = [n + rl.max_completion_length for n in lengths] if lengths else lengths
    if lengths:
        longest = sorted((min(n, max_len) for n in lengths), reverse=True)
        if data.packing:  # the micro-batch is a number of packed rows, sized from the data
            tokens = packed_rows_per_batch(t, data, lengths) * max_len
        elif data.padding_free:
            tokens = sum(longest[:batch])  # the worst batch: the longest rows together
        else:
            tokens = batch * longest[0]
        mean = sum(min(n, max_len) for n in lengths) / len(lengths)
    else:
        tokens = batch * max_len
        mean = float(max_len)
        assumptions.append(f"rows of max_length={max_len} tokens (data not read)")
    seq = min(max_len, tokens)  # the longest single sequence attention sees

    components: dict[str, int] = {}
    dense = shape.parameters - (
        shape.quantizable if q is not None and (q.load_in_4bit or q.load_in_8bit) else 0
    )
    weights = dense * w_bytes
    if q is not None and q.load_in_4bit:
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if q.bnb_4bit_use_double_quant else 4 / 64)
        weights += int(shape.quantizable * per)
    elif q is not None and q.load_in_8bit:
        weights += shape.quantizable + 4 * shape.quantizable_rows
    components["base weights"] = int(weights)
    components["adapter weights"] = shape.trainable * 4
    components["gradients"] = shape.trainable * 4
    optim = t.optim.lower()
    state_bytes = 0 if optim.startswith("sgd") else 2 if "8bit" in optim else 4 if "adafactor" in optim else 8
    components["optimizer states"] = shape.trainable * state_bytes
    a_h, a_i = (GPU_A_H, GPU_A_I) if on_gpu else (CPU_A_H, CPU_A_I)
    checkpointed = layers_to_checkpoint(t, shape.layers)
    per_layer = tokens * (a_h * shape.hidden + a_i * shape.intermediate) * act_bytes
    # Checkpointed layers keep their input (GPU; on CPU a fitted share, see CPU_CHECKPOINT_SHARE) plus
    # one layer's activations while it is recomputed; the others keep all of theirs.
    kept = shape.layers - checkpointed
    if checkpointed and not on_gpu:
        activations = (kept + CPU_CHECKPOINT_SHARE * checkpointed) * per_layer
    elif checkpointed:
        activations = checkpointed * tokens * shape.hidden * act_bytes + (kept + 1) * per_layer
    else:
        activations = shape.layers * per_layer
    attn = recipe.model.attn_implementation or "sdpa"
    if attn == "eager":
        activations += shape.layers * batch * shape.heads * seq * seq * act_bytes * 2
    components["activations"] = int(activations)
    components["logits and loss"] = int(tokens * shape.vocab * LOGIT_BYTES)
    if on_gpu:
        components["runtime"] = GPU_RUNTIME
    else:
        components["runtime"] = CPU_RUNTIME
    peak = sum(components.values())
    if not on_gpu:
        load_peak = CPU_RUNTIME + int(weights * (1 + CPU_LOAD_FACTOR))
        if load_peak > peak:
            assumptions.append(f"the peak is while loading the weights ({_size(load_peak)})")
            peak = load_peak

    # Speed: FLOPs per token.
    n = shape.parameters
    # forward + backward (activation grads), + the recompute of the checkpointed layers
    passes = 2 + checkpointed / max(shape.layers, 1)
    flops = 2 * n * passes + 6 * shape.trainable + 6 * shape.layers * seq * shape.hidden * (passes / 2)
    if on_gpu:
        peak_flops = GPUS.get(device, (0, 312e12))[1]
        rate = peak_flops * GPU_EFFICIENCY / flops
    else:
        rate = CPU_FLOPS_PER_CORE * cpu_count * CPU_EFFICIENCY / flops
    tokens_per_step = int(batch * t.gradient_accumulation_steps * mean)
    steps = None
    if t.max_steps > 0:
        steps = t.max_steps
    elif rows:
        per_step = batch * t.gradient_accumulation_steps
        steps = math.ceil(rows / per_step * t.num_train_epochs)
    total = steps * tokens_per_step if steps else None
    wall = total / rate if total else None
    if rl is not None:
        kv_cache, generating = generation_cost(
            recipe, shape, prompt_tokens=mean - rl.max_completion_length, act_bytes=act_bytes,
            peak_flops=(GPUS.get(device, (0, 312e12))[1] if on_gpu else CPU_FLOPS_PER_CORE * cpu_count),
            efficiency=GPU_EFFICIENCY if on_gpu else CPU_EFFICIENCY,
        )  # fmt: skip
        components["generation KV cache"] = kv_cache
        peak += kv_cache
        wall = wall + generating * steps if wall is not None and steps else wall
        completions = t.per_device_train_batch_size * t.gradient_accumulation_steps
        assumptions.append(
            f"generation: ~{generating:.1f} s per optimizer step ({completions} completions of up to "
            f"{rl.max_completion_length} tokens, decoding at {GENERATION_EFFICIENCY:.0%} of the peak); the KV "
            "cache as if every head kept its own keys and values (less with grouped-query attention)"
        )

    plan = Plan(
        device=device,
        budget_bytes=budget_bytes,
        components=components,
        peak_memory_bytes=int(peak),
        parameters=n,
        trainable_parameters=shape.trainable,
        tokens_per_step=tokens_per_step,
        steps=steps,
        tokens_total=total,
        flops_per_token=flops,
        tokens_per_second=rate,
        wall_seconds=wall,
        assumptions=assumptions,
    )
    if budget_bytes is not None and not plan.fits():
        plan.suggestions = suggestions(
            recipe, shape, plan, device=device, cpu_count=cpu_count, lengths=lengths
        )
    return plan


def online_rl_section(recipe: Recipe) -> Any:
    """The recipe's grpo / rloo section, or None for the methods that train on given rows."""
    return getattr(recipe, recipe.stage) if recipe.stage in ("grpo", "rloo") else None


def generation_cost(
    recipe: Recipe,
    shape: ModelShape,
    *,
    prompt_tokens: float,
    act_bytes: int,
    peak_flops: float,
    efficiency: float,
) -> tuple[int, float]:
    """Online RL (grpo / rloo): the KV cache of one generation batch, in bytes, and the seconds spent
    generating per optimizer step. One batch of completions is generated per optimizer step (trl's
    steps_per_generation = gradient_accumulation_steps), reused num_iterations times; each completion
    token costs a forward pass (2N FLOPs), and with beta > 0 the reference scores every token once more."""
    rl, t = online_rl_section(recipe), recipe.training
    completions = t.per_device_train_batch_size * t.gradient_accumulation_steps
    sequence = prompt_tokens + rl.max_completion_length
    kv_cache = int(2 * shape.layers * shape.hidden * sequence * completions * act_bytes)  # keys + values
    flops = 2 * shape.parameters * completions * rl.max_completion_length / GENERATION_EFFICIENCY
    if rl.beta:
        flops += 2 * shape.parameters * completions * sequence / efficiency  # a training-like forward
    return kv_cache, flops / rl.num_iterations / peak_flops


def suggestions(
    recipe: Recipe, shape: ModelShape, plan: Plan, *, device: str, cpu_count: int, lengths: list[int] | None
) -> list[str]:
    """Changes that bring the peak under the budget, each with what it costs; the cheapest first."""

    t = recipe.training
    candidates: list[tuple[str, dict[str, Any], str]] = []
    if layers_to_checkpoint(t, shape.layers) < shape.layers:
        candidates.append(
            (
                "training.gradient_checkpointing=true",
                {"training": {"gradient_checkpointing": True}},
                "recomputes every layer: ~30% slower than none"
                if not t.gradient_checkpointing
                else f"recomputes every layer, not 1 in {t.gradient_checkpointing}",
            )
        )
    batch = t.per_device_train_batch_size
    while batch > 1:
        batch //= 2
        accumulation = t.gradient_accumulation_steps * t.per_device_train_batch_size // batch
        candidates.append(
            (
                f"training.per_device_train_batch_size={batch} "
                f"training.gradient_accumulation_steps={accumulation}",
                {
                    "training": {
                        "per_device_train_batch_size": batch,
                        "gradient_accumulation_steps": accumulation,
                    }
                },
                "same effective batch, smaller matmuls: somewhat slower per token",
            )
        )
    if recipe.quantization is None:
        candidates.append(
            (
                "quantization.load_in_4bit=true",
                {"quantization": {"load_in_4bit": True}},
                "QLoRA: ~20-40% slower, a small quality cost",
            )
        )
    length = recipe.data.max_length
    while length > 256:
        length //= 2
        candidates.append(
            (
                f"data.max_length={length}",
                {"data": {"max_length": length}},
                "longer rows are cut (see loratool data)",
            )
        )
    found = []
    for text, change, cost in candidates:
        raw = recipe_to_dict(recipe)
        for section, values in change.items():
            raw[section] = {**(raw.get(section) or {}), **values}
        try:
            changed = validate_recipe(raw)
        except LoratoolError:
            continue
        new = make_plan(
            changed, shape, device=device, budget_bytes=None, cpu_count=cpu_count, lengths=lengths
        )
        if new.peak_memory_bytes <= (plan.budget_bytes or 0):
            found.append(
                f"--set {text.replace(' ', ' --set ')}: peak ~{_size(new.peak_memory_bytes)} ({cost})"
            )
    if not found:
        found.append("nothing single fits: combine the changes above, or use a larger device")
    return found[:4]


def conflicts(recipe: Recipe, device: str, world_size: int = 1) -> list[str]:
    """Every incompatibility between quantization, distribution, method, hardware and attention."""
    problems = []
    q = recipe.quantization
    on_gpu = device not in ("cpu",)
    attn = recipe.model.attn_implementation or ""
    if attn.startswith("flash_attention") and not on_gpu:
        problems.append(f"model.attn_implementation={attn} needs a CUDA GPU")
    if attn.startswith("flash_attention") and recipe.model.dtype == "float32":
        problems.append(f"model.attn_implementation={attn} needs bf16 or fp16, not model.dtype float32")
    if device in ("T4",) and (recipe.model.dtype == "bfloat16" or recipe.training.bf16):
        problems.append("bfloat16 is asked for, and a T4 has no bfloat16 support")
    if device == "T4" and attn.startswith("flash_attention"):
        problems.append(f"{attn} needs an Ampere or newer GPU; a T4 is Turing")
    if q is not None and q.load_in_8bit and recipe.lora.use_dora:
        problems.append(
            "lora.use_dora with quantization.load_in_8bit: PEFT's DoRA does not support 8-bit layers well"
        )
    if (
        q is not None
        and isinstance(recipe.lora.init_lora_weights, str)
        and recipe.lora.init_lora_weights.startswith("pissa")
    ):
        problems.append(
            "lora.init_lora_weights=pissa changes the base weights, which a quantized base cannot hold"
        )
    fsdp = recipe.training.model_extra.get("fsdp") if recipe.training.model_extra else None
    if fsdp and q is not None and q.load_in_4bit and q.bnb_4bit_quant_storage is None:
        problems.append(
            "FSDP with a 4-bit base needs quantization.bnb_4bit_quant_storage equal to the compute dtype"
        )
    if fsdp and q is not None and q.load_in_8bit:
        problems.append("FSDP cannot shard 8-bit bitsandbytes weights; use 4-bit with bnb_4bit_quant_storage")
    if world_size > 1 and "paged" in recipe.training.optim and fsdp:
        problems.append("paged optimizers are not supported with FSDP")
    if recipe.data.packing and attn == "eager":
        problems.append(
            "data.packing with eager attention: packed rows are separated by position ids, which eager ignores"
        )
    return problems


def parse_memory(text: str) -> int:
    """'24GiB', '24GB', '24g', '24000MiB' -> bytes (GB counted as GiB: what GPU vendors sell)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise LoratoolError(f"--memory {text!r}: expected a size such as 24GiB or 80GB")
    number, unit = float(match.group(1)), match.group(2)
    return int(number * 1024 ** " kmgt".index(unit or " "))


def gpu_named(name: str) -> str:
    wanted = re.sub(r"[^a-z0-9]", "", name.lower())
    for known in GPUS:
        if re.sub(r"[^a-z0-9]", "", known.lower()) == wanted:
            return known
    for known in GPUS:  # "a100" -> A100-80GB
        if re.sub(r"[^a-z0-9]", "", known.lower()).startswith(wanted):
            return known
    raise LoratoolError(
        f"--gpu {name!r}: unknown GPU", hint=f"known: {', '.join(GPUS)}; or give --memory 24GiB"
    )


def plan_recipe(
    recipe: Recipe,
    *,
    gpu: str | None = None,
    memory: str | None = None,
    read_data: bool = True,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    interconnect: str = "infiniband",
    log: Any = print,
) -> Plan:
    """Plan `recipe` for this machine, a named GPU or a memory budget, from its config (and data when
    it is at hand: the real row lengths make the activation estimate exact rather than worst-case)."""
    from transformers import AutoConfig

    hw = hardware.detect()
    if gpu:
        device = gpu_named(gpu)
        budget = GPUS[device][0]
    elif memory:
        device, budget = "budget", parse_memory(memory)
    else:
        device = "cpu" if hw.device == "cpu" else "cuda"
        budget = None
        if hw.device == "cuda":
            import torch

            budget = torch.cuda.get_device_properties(0).total_memory
            device = next((g for g in GPUS if g.lower().replace("-", " ") in hw.name.lower()), "A100-80GB")
    try:
        config = AutoConfig.from_pretrained(
            resolve_base_model(recipe.base_model, log),
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise LoratoolError(
            f"cannot read the config of {recipe.base_model}: {exc}",
            hint="a hub id needs the network (or the hub cache) for its config.json; no weights are read",
        ) from None
    shape = model_shape(recipe, config)
    lengths, rows = None, None
    if read_data:
        try:
            lengths, rows = _row_lengths(recipe, log)
        except LoratoolError as exc:
            log(f"note: data not read ({exc.message}); assuming rows of max_length")
    cores = hw.cpu_threads or hw.cpu_count  # the threads training will compute with (model/threads.py)
    plan = make_plan(
        recipe, shape, device=device, budget_bytes=budget, cpu_count=cores, lengths=lengths, rows=rows
    )
    if device == "cpu":
        plan.assumptions.append(cpu_assumption(hw.cpu_threads, hw.cpu_count, threads.busy_cores()))
    plan.conflicts = conflicts(recipe, device, world_size=(nodes or 1) * (gpus_per_node or 1))
    if nodes is not None or gpus_per_node is not None:
        one = OneDevice(plan.device, plan.budget_bytes, plan.components, plan.tokens_per_step,
                        plan.tokens_per_second, plan.steps, shape.parameters, shape.layers, shape.hidden,
                        shape.vocab)  # fmt: skip
        plan.devices = spread(recipe, one, nodes=nodes or 1, gpus_per_node=gpus_per_node or 1,
                              between_nodes=interconnect, rows=rows)  # fmt: skip
    return plan


def cpu_assumption(used: int, cores: int, busy: float | None) -> str:
    """What the CPU time estimate takes for granted: the threads, and the cores as free as they are now."""
    now = "" if busy is None else f", {busy:.1f} of them busy with other processes now"
    return (
        f"{used} CPU thread{'s' if used != 1 else ''} on {cores} core{'s' if cores != 1 else ''}{now}: "
        "other work on these cores during training slows it in proportion"
    )


def dry_run_line(recipe: Recipe, config: Any, hw: Any, data: Any) -> str:
    """The plan's summary line for `train --dry-run`, from what the dry run already loaded."""
    device = (
        "cpu"
        if hw.device == "cpu"
        else next((g for g in GPUS if g.lower().replace("-", " ") in hw.name.lower()), "A100-80GB")
    )
    lengths = _lengths(data.train)
    plan = make_plan(
        recipe,
        model_shape(recipe, config),
        device=device,
        cpu_count=hw.cpu_count,
        lengths=lengths,
        rows=len(lengths),
    )
    return plan.summary_line() + " (loratool plan RECIPE for the details)"


def _row_lengths(recipe: Recipe, log: Any) -> tuple[list[int], int]:
    """Token lengths of the training rows, read and tokenized as training does (the method's build_data)."""
    from loratool.train.preflight import method_of  # deferred: the method modules load trl

    tokenizer = load_tokenizer(recipe.base_model, recipe.model, log)
    data = method_of(recipe).build_data(recipe, tokenizer)
    lengths = _lengths(data.train)
    return lengths, len(lengths)


def _lengths(train: Any) -> list[int]:
    """Tokens per training row. A preference pair is two sequences (prompt + chosen, prompt + rejected)
    padded to the longer one: counted as one row of twice that length (a reward model's pairs too). A KTO
    row is its prompt with its completion, and again with another row's completion (the KL term):
    counted as twice the row. The plan does not add the DPO / KTO reference pass, which runs without
    gradients (no activations kept)."""
    columns = train.column_names
    if "rejected_ids" in columns and "prompt_ids" in columns:
        return padded_pair_lengths(train)
    if "rejected_ids" in columns:  # a reward model's whole sequences
        return [
            2 * max(len(c), len(r)) for c, r in zip(train["chosen_ids"], train["rejected_ids"], strict=True)
        ]
    if "prompt_tokens" in columns:  # online RL: make_plan adds the completions it generates
        return list(train["prompt_tokens"])
    if "completion_ids" in columns:
        return [
            2 * (len(p) + len(c)) for p, c in zip(train["prompt_ids"], train["completion_ids"], strict=True)
        ]
    return [len(ids) for ids in train["input_ids"]]


def calibrate(recipe: Recipe, plan: Plan, *, steps: int = 3, log: Any = print) -> dict[str, Any]:
    """Train `steps` real steps of the recipe in a fresh process (so that its resident set is the run's
    own) into a temporary directory, and compare what run.json records with the plan."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml

    with tempfile.TemporaryDirectory(prefix="loratool-calibrate-") as folder:
        raw = recipe_to_dict(recipe)
        raw["training"].update(
            output_dir=str(Path(folder) / "run"),
            max_steps=steps,
            save_steps=None,
            eval_steps=None,
            early_stopping_patience=None,
            report_to="none",
            logging_steps=1,
        )
        raw["data"]["validation"] = None
        path = Path(folder) / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        log(f"calibrating: {steps} real steps of the recipe here")
        done = subprocess.run(
            [sys.executable, "-m", "loratool", "train", str(path)], capture_output=True, text=True
        )
        record = read_run(Path(folder) / "run")
        if done.returncode != 0 or record is None:
            raise LoratoolError(
                f"--calibrate: the trial run failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}",
                hint="run `loratool train` on the recipe to see the whole error",
            )
        peak = record.raw["peak_memory_bytes"]
        measured = peak.get("cuda_allocated") or peak["process_rss"]
        train = record.raw["train"]
        speed = train["tokens_trained"] / max(train["train_seconds"], 1e-9)
    return {
        "steps": steps,
        "measured_peak_bytes": measured,
        "peak_error": plan.peak_memory_bytes / measured - 1,
        "measured_tokens_per_second": speed,
        "speed_error": plan.tokens_per_second / speed - 1 if speed else None,
    }


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 1024**2:.0f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)
