"""What this machine can do, and the recipe rules that depend on it (checked before any weights load)."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError
from loratool.recipe.rules import converts

if TYPE_CHECKING:
    import torch

    from loratool.recipe import Recipe


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str  # GPU model, or the CPU architecture
    device_count: int
    bf16: bool  # bfloat16 matmuls run natively (Ampere+ GPUs; CPUs with AVX512-BF16/AMX)
    cpu_count: int
    cpu_threads: int = 0  # the threads torch computes with (model/threads.py chooses them under contention)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect() -> Hardware:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available():
        return Hardware(
            device="cuda",
            name=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            bf16=torch.cuda.is_bf16_supported(),
            cpu_count=cpus,
            cpu_threads=torch.get_num_threads(),
        )
    return Hardware(
        device="cpu",
        name=platform.machine(),
        device_count=1,
        bf16=_cpu_has_bf16(),
        cpu_count=cpus,
        cpu_threads=torch.get_num_threads(),
    )


def _cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def model_dtype(requested: str, hw: Hardware) -> torch.dtype:
    """The dtype base weights load in. `auto`: bf16 where native, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if hw.device == "cuda":
        return torch.bfloat16 if hw.bf16 else torch.float16
    return torch.float32


def compute_dtype(recipe: Recipe, hw: Hardware) -> torch.dtype:
    """The dtype matmuls run in: the 4-bit compute dtype for QLoRA, else the model dtype."""
    import torch

    q = recipe.quantization
    if q is not None and q.load_in_4bit and q.bnb_4bit_compute_dtype != "auto":
        return getattr(torch, q.bnb_4bit_compute_dtype)
    return model_dtype(recipe.model.dtype, hw)


def mixed_precision(recipe: Recipe, hw: Hardware) -> tuple[bool, bool]:
    """(bf16, fp16) for the trainer: explicit recipe values win, else follow the compute dtype on a GPU.

    On CPU, autocast is off by default: weights are fp32 and CPU autocast mostly adds casts.
    """
    import torch

    dtype = compute_dtype(recipe, hw)
    t = recipe.training
    on_gpu = hw.device == "cuda"
    bf16 = t.bf16 if t.bf16 is not None else (on_gpu and dtype == torch.bfloat16)
    fp16 = t.fp16 if t.fp16 is not None else (on_gpu and dtype == torch.float16)
    return bool(bf16), bool(fp16)


@dataclass(frozen=True)
class Launch:
    """How this process was launched: the sharding accelerate was asked for (from the variables
    `accelerate launch` sets) and the number of processes."""

    sharding: str | None  # "fsdp", "deepspeed" or None (one process, or plain data parallel)
    zero_stage: int | None  # DeepSpeed ZeRO stage, when known
    processes: int

    @property
    def shards_weights(self) -> bool:
        """Whether the base weights are split across processes (FSDP, ZeRO-3)."""
        return self.sharding == "fsdp" or (self.sharding == "deepspeed" and self.zero_stage == 3)


def launch(env: dict[str, str] | None = None) -> Launch:
    env = dict(os.environ) if env is None else env

    def flag(name: str) -> bool:
        return env.get(name, "").lower() in ("1", "true", "yes")

    sharding = (
        "deepspeed" if flag("ACCELERATE_USE_DEEPSPEED") else "fsdp" if flag("ACCELERATE_USE_FSDP") else None
    )
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    return Launch(sharding, int(stage) if stage.isdigit() else None, int(env.get("WORLD_SIZE") or 1))


def check(recipe: Recipe, hw: Hardware, how: Launch | None = None) -> None:
    """Refuse what this machine and this launch cannot run, every problem at once, before anything heavy
    loads: precision and attention the hardware lacks, and quantization with sharding that cannot work."""
    problems = launch_conflicts(recipe, hw, how or launch())
    wants_bf16 = (
        recipe.model.dtype == "bfloat16"
        or recipe.training.bf16
        or (recipe.quantization is not None and recipe.quantization.bnb_4bit_compute_dtype == "bfloat16")
    )
    if wants_bf16 and not hw.bf16:
        problems.append(
            f"bfloat16 is asked for (model.dtype, quantization.bnb_4bit_compute_dtype or training.bf16) but "
            f"this {hw.device} ({hw.name}) has no bfloat16 support"
        )
    if recipe.training.fp16 and hw.device != "cuda":
        problems.append("training.fp16: float16 mixed precision needs a CUDA GPU; this machine has none")
    attn = recipe.model.attn_implementation or ""
    if attn.startswith("flash_attention") and hw.device != "cuda":
        problems.append(f"model.attn_implementation: {attn} needs a CUDA GPU; this machine has none")
    if problems:
        raise LoratoolError(
            "this machine cannot run the recipe as written:\n" + "\n".join(f"  - {p}" for p in problems),
            hint="use model.dtype: auto and leave training.bf16/fp16 unset to pick what the hardware supports; "
            "drop model.attn_implementation to let transformers choose; for sharding (FSDP, DeepSpeed) see "
            "configs/accelerate/ and the README's 'Several processes and machines'",
        )


def launch_conflicts(recipe: Recipe, hw: Hardware, how: Launch) -> list[str]:
    """Combinations of the recipe and the launch (FSDP, DeepSpeed) that cannot work, one line each."""
    import importlib.util

    import torch

    q = recipe.quantization
    problems = []
    what = "FSDP" if how.sharding == "fsdp" else f"DeepSpeed ZeRO-{how.zero_stage or '?'}"
    if how.sharding == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            problems.append(
                "the launch asks for DeepSpeed, which is not installed (pip install 'loratool[deepspeed]')"
            )
        if hw.device != "cuda":
            problems.append(
                "the launch asks for DeepSpeed, which loratool runs on CUDA GPUs only; this machine has none"
            )
    if how.sharding == "fsdp" and hw.device != "cuda":
        # Measured with accelerate 1.15: on CPU processes the FSDP plugin is ignored without a word and
        # every process holds the whole model (plain data parallel).
        problems.append(
            "the launch asks for FSDP, which accelerate applies on CUDA GPUs only (on CPU it would silently "
            "train as plain data parallel); use configs/accelerate/ddp.yaml here"
        )
    if how.shards_weights and converts(recipe.lora):
        problems.append(
            f"lora.init_lora_weights: {recipe.lora.init_lora_weights} changes the base, and converting the "
            f"final adapter to plain LoRA needs whole adapter weights, which {what} shards; use plain data "
            "parallel (configs/accelerate/ddp.yaml) or init_lora_weights: true"
        )
    if q is not None and q.load_in_8bit and how.shards_weights:
        problems.append(
            f"quantization.load_in_8bit: 8-bit weights cannot be sharded by {what}; use load_in_4bit "
            "(QLoRA shards), or data parallel (configs/accelerate/ddp.yaml)"
        )
    if q is not None and q.load_in_4bit and how.shards_weights:
        compute = compute_dtype(recipe, hw)
        storage = q.bnb_4bit_quant_storage
        if storage is not None and getattr(torch, storage) != compute:
            problems.append(
                f"quantization.bnb_4bit_quant_storage: {storage} under {what} must equal the compute dtype "
                f"({str(compute).removeprefix('torch.')}) so that the 4-bit weights shard with the others; "
                "leave it unset and loratool sets it"
            )
        if model_dtype(recipe.model.dtype, hw) != compute:
            problems.append(
                f"model.dtype: {recipe.model.dtype} differs from the 4-bit compute dtype "
                f"({str(compute).removeprefix('torch.')}); under {what} the weights of a shard need one dtype"
            )
    return problems


def quant_storage(recipe: Recipe, hw: Hardware, how: Launch | None = None) -> torch.dtype | None:
    """The storage dtype of packed 4-bit weights: the recipe's; else the compute dtype when FSDP or
    ZeRO-3 shard the weights (they shard tensors of one dtype, and bitsandbytes packs the 4-bit codes
    into tensors of the storage dtype); else None (bitsandbytes' uint8)."""
    import torch

    q = recipe.quantization
    if q is None or not q.load_in_4bit:
        return None
    if q.bnb_4bit_quant_storage is not None:
        return getattr(torch, q.bnb_4bit_quant_storage)
    return compute_dtype(recipe, hw) if (how or launch()).shards_weights else None
