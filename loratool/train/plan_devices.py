"""`loratool plan --nodes N --gpus-per-node G`: the one-device plan spread over N x G devices — memory per
device under DDP, DeepSpeed ZeRO-2 and ZeRO-3 / FSDP (full shard), the step time with the communication each
needs over the links named, and the fewest devices on which each strategy fits.

Memory per device (the one-device components, `world` devices):

    DDP             everything, plus the gradient buckets DDP all-reduces from (one more copy of the gradients)
    ZeRO-2          gradients and optimizer states divided by `world`; the weights whole; a reduce bucket
    ZeRO-3 / FSDP   weights, adapter, gradients and optimizer states divided by `world`, plus the largest
                    unit gathered whole while it computes and the next one prefetched

Activations, logits and the runtime are per device in every strategy: each device trains its own
micro-batch (`per_device_train_batch_size`).

Communication per optimizer step (ring collectives move about 2 (w-1)/w of the data for an all-reduce, (w-1)/w
for an all-gather or a reduce-scatter, through the slowest link of the ring):

    DDP, ZeRO-2     the adapter's gradients once (all-reduce; ZeRO-2's reduce-scatter + all-gather is the same)
    ZeRO-3 / FSDP   the base weights gathered for every micro-batch's forward and backward (and again for
                    the recomputed forward of checkpointed layers), plus the gradients reduce-scattered

LoRA trains few parameters, so DDP's traffic is small; sharding the frozen base saves memory but moves the
whole base two or three times per micro-batch. The step time is given as compute + communication, the
upper bound (DDP and FSDP overlap some of the communication with compute).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.recipe import Recipe

STRATEGIES = ("DDP", "ZeRO-2", "ZeRO-3 / FSDP")
# Bytes per second one GPU can push through a collective over each link: the bus bandwidth NCCL's tests
# report, rounded down (NVLink 4 on H100 450 GB/s per direction, A100's NVLink 3 300; PCIe 4 x16 ~25 GB/s;
# 400 Gb/s InfiniBand NDR with one NIC per GPU as in DGX systems; 100 Gb/s Ethernet shared by a node).
NVLINK = {"H100": 350e9, "H200": 350e9, "A100-80GB": 230e9, "A100-40GB": 230e9}
PCIE = 20e9
BETWEEN_NODES = {"infiniband": 45e9, "ethernet": 11e9}
LINK_NAMES = {
    "infiniband": "InfiniBand",
    "ethernet": "Ethernet",
}  # per NIC; infiniband: one per GPU, ethernet: per node


@dataclass(frozen=True)
class OneDevice:
    """What spreading needs of the one-device plan (train/plan.py's Plan and ModelShape)."""

    device: str  # a GPU name in plan.GPUS, or "cpu" / "budget"
    budget_bytes: int | None
    components: dict[str, int]  # plan.Plan.components
    tokens_per_step: int  # per device and optimizer step
    tokens_per_second: float  # one device's
    steps: int | None
    parameters: int
    layers: int
    hidden: int
    vocab: int


@dataclass(frozen=True)
class Spread:
    """One strategy on the devices asked for."""

    strategy: str
    peak_memory_bytes: int
    fits: bool | None
    compute_seconds: float  # per optimizer step, per device
    communication_seconds: float  # per optimizer step, not overlapped
    tokens_per_second: float  # all devices together, compute + communication
    fewest_devices: int | None  # the smallest device count on which it fits (None: not even on 4096)


@dataclass(frozen=True)
class DevicesPlan:
    """`plan --nodes/--gpus-per-node`: every strategy, the links assumed, and what fits on fewer."""

    nodes: int
    gpus_per_node: int
    device: str
    within_node: str
    between_nodes: str | None
    bandwidth_bytes_per_second: float  # the slowest link of the ring, per GPU
    steps: int | None
    spreads: list[Spread]
    per_device_bytes: int  # what every strategy keeps whole on each device: activations, logits, runtime

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        world = self.nodes * self.gpus_per_node
        links = f"{self.within_node} within a node" + (
            f", {LINK_NAMES[self.between_nodes]} between nodes" if self.between_nodes else ""
        )
        lines = [
            f"  on {self.nodes} node(s) x {self.gpus_per_node} {self.device} = {world} devices ({links}; "
            f"~{self.bandwidth_bytes_per_second / 1e9:.0f} GB/s per GPU through the slowest link):",
            f"    {'strategy':<14} {'peak per device':>16} {'fits':>5}  {'step (compute + communication)':<34} tokens/s",
        ]
        for s in self.spreads:
            fits = "-" if s.fits is None else "yes" if s.fits else "NO"
            step = s.compute_seconds + s.communication_seconds
            timing = f"{step:.2f} s ({s.compute_seconds:.2f} + {s.communication_seconds:.2f})"
            lines.append(
                f"    {s.strategy:<14} {_gib(s.peak_memory_bytes):>16} {fits:>5}  {timing:<34} "
                f"{s.tokens_per_second:,.0f}"
            )
        fewer = [f"{s.strategy} on {s.fewest_devices}" for s in self.spreads
                 if s.fewest_devices is not None and s.fewest_devices < world]  # fmt: skip
        if fewer:
            lines.append(f"  fits on fewer devices: {', '.join(fewer)} {self.device}; more devices only shorten "
                         "the run (DDP: each holds the whole model)")  # fmt: skip
        if not any(s.fits for s in self.spreads) and self.spreads[0].fits is not None:
            counts = [f"{s.strategy} from {s.fewest_devices}" for s in self.spreads if s.fewest_devices]
            lines.append(
                f"  does not fit {world} {self.device} with any strategy: "
                + (f"it would with {', '.join(counts)}" if counts else
                   f"each device still holds its own micro-batch ({_gib(self.per_device_bytes)} of activations, "
                   "logits and runtime, which no sharding divides): see the suggestions above")
            )  # fmt: skip
        if self.steps:
            best = min(self.spreads, key=lambda s: s.compute_seconds + s.communication_seconds)
            seconds = self.steps * (best.compute_seconds + best.communication_seconds)
            lines.append(
                f"  run: {self.steps:,} optimizer steps, ~{seconds / 3600:.1f} h with {best.strategy}"
            )
        return "\n".join(lines)


def spread(
    recipe: Recipe,
    plan: OneDevice,
    *,
    nodes: int,
    gpus_per_node: int,
    between_nodes: str = "infiniband",
    rows: int | None = None,
) -> DevicesPlan:
    """Spread the one-device `plan` (on a GPU) over `nodes` x `gpus_per_node` devices."""
    if plan.device == "cpu":
        raise LoratoolError(
            "--nodes / --gpus-per-node plan GPUs, and this plan is for the CPU",
            hint="name the GPU: --gpu H100 (or A100-80GB, L4, ...)",
        )
    if between_nodes not in BETWEEN_NODES:
        raise LoratoolError(
            f"--interconnect {between_nodes!r}: one of {', '.join(BETWEEN_NODES)}",
            hint="infiniband (one 400 Gb/s NIC per GPU) or ethernet (100 Gb/s per node)",
        )
    world = nodes * gpus_per_node
    within = "NVLink" if plan.device in NVLINK else "PCIe"
    bandwidth = NVLINK.get(plan.device, PCIE)
    if nodes > 1:
        per_gpu = BETWEEN_NODES[between_nodes] / (1 if between_nodes == "infiniband" else gpus_per_node)
        bandwidth = min(bandwidth, per_gpu)
    t = recipe.training
    steps = plan.steps
    if t.max_steps <= 0 and rows:  # epochs: the global batch grows with the devices, the steps shrink
        steps = math.ceil(rows / (t.per_device_train_batch_size * t.gradient_accumulation_steps * world)
                          * t.num_train_epochs)  # fmt: skip
    compute = plan.tokens_per_step / plan.tokens_per_second if plan.tokens_per_second else 0.0
    spreads = []
    for strategy in STRATEGIES:
        peak = per_device_memory(strategy, plan, world)
        traffic = communication_bytes(strategy, plan, world, recipe)
        talk = traffic / bandwidth if world > 1 else 0.0
        fewest = next(
            (n for n in _device_counts() if _fits(per_device_memory(strategy, plan, n), plan)), None
        )
        spreads.append(
            Spread(
                strategy=strategy,
                peak_memory_bytes=int(peak),
                fits=None if plan.budget_bytes is None else peak <= plan.budget_bytes,
                compute_seconds=compute,
                communication_seconds=talk,
                tokens_per_second=world * plan.tokens_per_step / (compute + talk) if compute + talk else 0.0,
                fewest_devices=fewest,
            )
        )
    return DevicesPlan(nodes, gpus_per_node, plan.device, within, between_nodes if nodes > 1 else None,
                       bandwidth, steps, spreads, int(_own(plan)))  # fmt: skip


def per_device_memory(strategy: str, plan: OneDevice, world: int) -> float:
    """One device's peak under `strategy` on `world` devices (module docstring)."""
    c = plan.components
    weights, adapter = c["base weights"], c["adapter weights"]
    gradients, optimizer = c["gradients"], c["optimizer states"]
    own = _own(plan)
    if strategy == "DDP":
        return weights + adapter + 2 * gradients + optimizer + own
    if strategy == "ZeRO-2":
        return weights + adapter + (gradients + optimizer) / world + min(gradients, _REDUCE_BUCKET) + own
    gathered = _largest_unit(weights, plan) + _layer(weights, plan)  # computing + the prefetched next
    return (weights + adapter + gradients + optimizer) / world + gathered + own


def communication_bytes(strategy: str, plan: OneDevice, world: int, recipe: Recipe) -> float:
    """Bytes one device sends per optimizer step under `strategy` (module docstring)."""
    share = (world - 1) / world
    gradients = plan.components["gradients"]
    if strategy in ("DDP", "ZeRO-2"):
        return 2 * share * gradients
    t = recipe.training
    recomputed = 1 if t.gradient_checkpointing is not False else 0
    per_micro_batch = (2 + recomputed) * share * plan.components["base weights"] + share * gradients
    return per_micro_batch * t.gradient_accumulation_steps


def _own(plan: OneDevice) -> float:
    """What each device keeps whole in every strategy: its micro-batch's activations, logits, the runtime."""
    shared = ("base weights", "adapter weights", "gradients", "optimizer states")
    return sum(v for k, v in plan.components.items() if k not in shared)


# DeepSpeed's default reduce_bucket_size: 5e8 elements, of 2-byte gradients.
_REDUCE_BUCKET = 5e8 * 2


def _layer(weights: float, plan: OneDevice) -> float:
    """One decoder layer's share of the weights (the embeddings and the head counted apart)."""
    return max(0.0, weights - 2 * _embedding(weights, plan)) / max(plan.layers, 1)


def _embedding(weights: float, plan: OneDevice) -> float:
    """The embedding table in the weights' own bytes per parameter (it is never quantized)."""
    per_parameter = weights / max(plan.parameters, 1)
    return min(weights / 2, plan.vocab * plan.hidden * max(per_parameter, 2.0))


def _largest_unit(weights: float, plan: OneDevice) -> float:
    """FSDP wraps each decoder layer; the embeddings sit in the root unit, gathered whole as well."""
    return max(_layer(weights, plan), _embedding(weights, plan))


def _device_counts() -> list[int]:
    return [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def _fits(peak: float, plan: OneDevice) -> bool:
    return plan.budget_bytes is not None and peak <= plan.budget_bytes


def _gib(value: float) -> str:
    return f"{value / 1024**3:.1f} GiB"
