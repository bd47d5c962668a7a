"""Attention per example inside flattened batches, for the attention implementations without varlen kernels.

Padding-free and packed batches put several examples into one row; position ids restart at every example
(TRL's collator also passes the example boundaries as `cu_seq_lens_q`). flash_attention_2/3 read those
boundaries and attend within each example. `sdpa` and `eager` cannot: transformers gives them a dense
block-diagonal mask over the whole row, so attention costs (sum of lengths)^2 — on a row of 8 examples of
500 tokens, 8x the work of the examples alone, most of it thrown away by the mask.

`sdpa_per_example` and `eager_per_example` (registered with transformers' AttentionInterface) run
attention on each example's slice of the row, causally, with the stock sdpa / the model's own eager
function: the cost is sum(length^2), and no token can see another example. Their mask functions skip
building the dense mask for such rows. A sliding window shorter than the row (Gemma 3's local layers,
Mistral, Qwen) is applied inside each example that is longer than the window, for the model families whose
attention passes its window to the attention function (WINDOW_PASSED). Anything else (padded batches, a
KV cache, left padding in generation, other models' windows) gets the stock mask and the stock function,
so evaluation and generation are unchanged.
"""

from __future__ import annotations

import sys
from itertools import pairwise
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# What each stock implementation becomes when batches are flattened.
PER_EXAMPLE = {"sdpa": "sdpa_per_example", "eager": "eager_per_example"}

# Model types whose attention layers call the attention function with `sliding_window=` (None on a layer
# without one): for these the window can be applied per example instead of through a dense mask of the row.
# Checked in each family's modeling file (transformers 5): Gemma 3 skips the dense mask on 5 of every 6
# layers with it, which made padding-free batches of long rows cost the square of the whole row there.
WINDOW_PASSED = ("gemma3_text", "gemma3", "mistral", "qwen2", "qwen3", "phi3")

_registered = False
# The example boundaries of the row being computed: every layer gets the same `cu_seq_lens_q` tensor, so it
# is read (a device-to-host copy on GPU) once per forward pass, not once per layer.
_bounds_cache: tuple[Any, list[int]] | None = None


def register() -> None:
    """Make `sdpa_per_example` and `eager_per_example` known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register("sdpa_per_example", _sdpa_per_example)
    AttentionInterface.register("eager_per_example", _eager_per_example)
    AttentionMaskInterface.register("sdpa_per_example", _mask_or_none(sdpa_mask))
    AttentionMaskInterface.register("eager_per_example", _mask_or_none(eager_mask))
    _registered = True


def use_per_example_attention(model: Any) -> str | None:
    """Switch a loaded model from `sdpa` / `eager` to its per-example variant; return the new name, or None
    when the model keeps its implementation (flash attention, flex, a model that cannot switch)."""
    current = model.config._attn_implementation
    target = PER_EXAMPLE.get(current)
    if target is None:
        return None
    if current == "eager" and _model_eager_function(type(model)) is None:
        return None  # a model without the usual eager_attention_forward: keep its own code
    register()
    model.set_attn_implementation(target)
    return target if model.config._attn_implementation == target else None


def _mask_or_none(stock: Any) -> Any:
    """The stock mask function, except for one unpadded row without a cache: no mask (the attention then
    works per example). Not for rows that need more than causality, such as a sliding window shorter than
    the row or the custom patterns some vision models add (use_vmap)."""

    def mask(
        batch_size: int,
        q_length: int,
        kv_length: int,
        q_offset: Any = 0,
        kv_offset: Any = 0,
        attention_mask: torch.Tensor | None = None,
        local_size: int | None = None,
        use_vmap: bool = False,
        **kwargs: Any,
    ) -> Any:
        whole_row = (
            batch_size == 1
            and q_length == kv_length
            and isinstance(q_offset, int)
            and isinstance(kv_offset, int)
            and q_offset == 0
            and kv_offset == 0
            and not use_vmap
            and (local_size is None or local_size >= q_length or _window_passed(kwargs.get("config")))
            and (attention_mask is None or bool(attention_mask.all()))
        )
        if whole_row:
            return None
        return stock(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            local_size=local_size,
            use_vmap=use_vmap,
            **kwargs,
        )

    return mask


def _window_passed(config: Any) -> bool:
    """Whether the attention function of this model is told each layer's sliding window (WINDOW_PASSED)."""
    text = getattr(config, "text_config", None) or config
    return getattr(text, "model_type", None) in WINDOW_PASSED


def _within(n: int, window: int | None) -> bool:
    """A causal example of n tokens that the sliding window does not cut: plain causal attention."""
    return window is None or n <= window


def _band(n: int, window: int, device: Any) -> torch.Tensor:
    """Causal attention over the last `window` tokens (the query's own included), as transformers'
    sliding_window_causal_mask_function: True where a query may attend."""
    import torch

    q = torch.arange(n, device=device)[:, None]
    kv = torch.arange(n, device=device)[None, :]
    return (kv <= q) & (kv > q - window)


def _window_if_skipped(
    query: torch.Tensor, key: torch.Tensor, attention_mask: Any, kwargs: dict[str, Any]
) -> Any:
    """The mask for the stock path: as given, except where `_mask_or_none` skipped a sliding window that
    cuts the row (a whole row the per-example path does not take, e.g. with output_attentions)."""
    window = kwargs.get("sliding_window")
    length = query.shape[2]
    if attention_mask is not None or length != key.shape[2] or _within(length, window):
        return attention_mask
    return _band(length, window, query.device)[None, None]


def _example_bounds(length: int, kwargs: dict[str, Any]) -> list[int]:
    """[0, end of example 1, end of example 2, ..., length]: from TRL's cu_seq_lens_q when given, else
    from where the position ids do not go up by one; [0, length] for a single sequence."""
    global _bounds_cache
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if _bounds_cache is not None and _bounds_cache[0] is cu:
            return _bounds_cache[1]
        bounds = [int(b) for b in cu.tolist()]
        if bounds[0] == 0 and bounds[-1] == length and all(a < b for a, b in pairwise(bounds)):
            _bounds_cache = (cu, bounds)
            return bounds
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] != length:
        return [0, length]
    import torch

    row = position_ids.reshape(-1, length)[0]
    starts = (torch.diff(row) != 1).nonzero().flatten() + 1
    return [0, *starts.tolist(), length]


def _flattened_row(
    query: torch.Tensor, key: torch.Tensor, attention_mask: Any, kwargs: dict[str, Any]
) -> bool:
    """One row without a mask, queries = keys (no cache), causal: what `_mask_or_none` leaves to us."""
    return (
        attention_mask is None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] > 1
        and kwargs.get("is_causal", True) is not False
        and not kwargs.get("output_attentions", False)
    )


def _sdpa_per_example(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _flattened_row(query, key, attention_mask, kwargs) or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(
            module, query, key, value, _window_if_skipped(query, key, attention_mask, kwargs), **kwargs
        )
    bounds = _example_bounds(query.shape[2], kwargs)
    if len(bounds) == 2 and _within(bounds[1], kwargs.get("sliding_window")):  # sdpa's own causal kernel
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    import torch

    kwargs.pop("is_causal", None)
    bias = kwargs.pop("position_bias", None)
    window = kwargs.get("sliding_window")
    outputs = []
    for start, end in pairwise(bounds):
        n = end - start
        within = _within(n, window)
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None if within else _band(n, window, query.device)[None, None],
            is_causal=within,
            position_bias=None if bias is None else bias[..., start:end, start:end],
            **kwargs,
        )
        outputs.append(out)  # (1, length, heads, head_dim)
    return torch.cat(outputs, dim=1), None


def _eager_per_example(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    import torch

    eager = _model_eager_function(type(module))
    if eager is None:
        raise RuntimeError(f"eager_per_example: {type(module).__module__} has no eager_attention_forward")
    if not _flattened_row(query, key, attention_mask, kwargs) or not getattr(module, "is_causal", True):
        mask = _window_if_skipped(query, key, attention_mask, kwargs)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
        return eager(module, query, key, value, mask, **kwargs)

    # The model's eager function applies causality through the mask only: give each example its own.
    bounds = _example_bounds(query.shape[2], kwargs)
    window = kwargs.get("sliding_window")
    outputs = []
    masks: dict[int, torch.Tensor] = {}
    for start, end in pairwise(bounds):
        n = end - start
        if n not in masks:
            if _within(n, window):
                blocked = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1)
            else:
                blocked = ~_band(n, window, query.device)
            masks[n] = torch.zeros(n, n, dtype=query.dtype, device=query.device).masked_fill(
                blocked, torch.finfo(query.dtype).min
            )[None, None]
        out, _ = eager(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], masks[n], **kwargs
        )
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _model_eager_function(cls: type) -> Any:
    """The `eager_attention_forward` of the modeling file that defines `cls` (each model family has its own:
    softcapping, attention sinks, ...)."""
    module = sys.modules.get(cls.__module__)
    return getattr(module, "eager_attention_forward", None)
