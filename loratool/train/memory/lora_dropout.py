"""LoRA dropout that keeps a one-byte mask for the backward pass instead of a dropped copy of the input.

PEFT computes `lora_B(lora_A(dropout(x)))`. Autograd then keeps, for every adapted layer, the dropped input
`dropout(x)` (lora_A's weight gradient needs it) and, on CPU, the scaled float noise as well: eight bytes per
input element, per layer, although `x` itself is usually kept anyway (q, k and v read the same `x`). With
the default `lora_dropout: 0.05`, on SmolLM2-135M's layer shapes, one 752-token micro-batch keeps 1,493 MiB
for the backward pass instead of 920 MiB without dropout; with this module, 1,027 MiB
(scripts/bench_memory_savers.py).

`keep_masks_not_copies` makes each plain LoRA layer's `lora_A` apply the dropout itself, in one autograd
function that keeps `x` (shared) and a boolean mask (one byte per element) and recomputes the dropped input
in the backward pass. The dropout is the same: every element kept with probability 1 - p and scaled by
1 / (1 - p), independently per layer; only the random stream the masks come from differs from PEFT's on CPU
(see `keep_mask`).

Only training changes: in evaluation (`model.eval()`) lora_A is a plain linear layer, the dropout modules
are identities either way, and nothing in the saved adapter differs. DoRA and the other PEFT variants keep
PEFT's own dropout (their forward uses the dropped input elsewhere too).
"""

from __future__ import annotations

import types
from typing import Any

import torch


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Which elements of `x` dropout keeps: each with probability 1 - p, as a boolean tensor like `x`.

    On CPU, torch's Bernoulli sampler is slow (bench shape b draws ~105 M mask values per optimizer
    step); the raw output of numpy's PCG64, compared with p * 2^32, is 3.3-3.8x faster on 2 cores
    (scripts/bench_memory_savers.py). Its seed comes from torch's generator, so `training.seed`, and a resumed run's restored RNG
    state, give the same masks again. Elsewhere torch's own generator is fast and is used as is."""
    if x.device.type != "cpu":
        return torch.empty_like(x).bernoulli_(1 - p).bool()
    import numpy as np

    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    n = x.numel()
    bits = np.random.PCG64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(bits >= round(p * 2**32)).view(x.shape)


class _DropoutThenLinear(torch.autograd.Function):
    """`F.linear(dropout(x), weight)`, keeping `x` and a boolean mask for the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x, p)
        out = torch.nn.functional.linear(x.mul(keep).mul_(1 / (1 - p)), weight)
        ctx.save_for_backward(x, weight, keep)
        ctx.p = p
        ctx.out_dtype = out.dtype  # under autocast the product ran in a lower precision: so does the backward
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, keep = ctx.saved_tensors
        dtype, scale = ctx.out_dtype, 1 / (1 - ctx.p)
        grad_out = grad_out.to(dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(dtype)).mul_(keep).mul_(scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = x.to(dtype).mul(keep).mul_(scale)
            grad_weight = (
                grad_out.reshape(-1, grad_out.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])
            ).to(weight.dtype)
        return grad_x, grad_weight, None


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # A method of the layer (not a closure over it), so that a deep copy of the model dispatches to the copy.
    if not self.training:
        return torch.nn.functional.linear(x, self.weight)
    return _DropoutThenLinear.apply(x, self.weight, self.loratool_dropout)


def keep_masks_not_copies(model: Any) -> int:
    """Move the dropout of every plain LoRA layer of `model` into its lora_A (see the module docstring).
    Returns how many adapter layers changed."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, dropout in list(dropouts.items()):
            layer = lora_a[name] if name in lora_a else None
            if (
                type(dropout) is not torch.nn.Dropout
                or dropout.p <= 0
                or name in variants
                or type(layer) is not torch.nn.Linear
                or layer.bias is not None
            ):
                continue
            layer.loratool_dropout = dropout.p
            layer.forward = types.MethodType(_forward, layer)
            dropouts[name] = torch.nn.Identity()
            changed += 1
    return changed
