"""Score the LM head only at the positions that carry loss, on CPU too.

TRL's trainers replace the LM head with a chunked log-probability kernel that never builds the whole
(tokens x vocabulary) logits. On CUDA and XPU it first keeps only the positions whose next-token label is
not -100; everywhere else it scores every position and zeroes the unwanted ones afterwards, because on
devices that compile a kernel per shape (Neuron) a changing number of positions would recompile on every
batch. A CPU compiles nothing per shape, so there the full scoring is pure waste: with chat data most
tokens are prompt (34.5% of the SmolLM2 demo's tokens carry loss), and a 49,152-token head costs three
matrix products plus a dozen elementwise passes per position, forward and backward.

`score_only_loss_positions` makes TRL take its compact path on CPU as well. The loss, the gradients and
the logged metrics are the same (the kernel computes each position's row alone; the compact path is the
one TRL runs on every GPU); only the unused rows are no longer computed.
"""

from __future__ import annotations

from typing import Any

_MARK = "_loratool_compact_on_cpu"


def score_only_loss_positions() -> bool:
    """Let TRL's fused LM head skip positions without loss on CPU. Idempotent.

    Returns False, and changes nothing, when the installed TRL has no fused LM head with a device switch
    (older TRL builds the full logits anyway; a newer one may decide differently).
    """
    try:
        from trl.trainer import utils
    except ImportError:  # pragma: no cover - trl is a dependency
        return False
    stock = getattr(utils, "_use_triton", None)
    if stock is None or not hasattr(utils, "add_fused_lm_head"):
        return False
    if getattr(stock, _MARK, False):
        return True

    # In trl.trainer.utils this predicate only decides "compact or not" (the kernel module has its own
    # copy for choosing Triton), so answering yes for CPU changes nothing but which rows are scored.
    def compact(device: Any) -> bool:
        return device.type == "cpu" or stock(device)

    setattr(compact, _MARK, True)
    compact.stock = stock  # type: ignore[attr-defined]
    utils._use_triton = compact
    return True


def score_every_position_on_cpu() -> None:
    """Undo `score_only_loss_positions` (TRL's own predicate again), for a run in the same process that
    does not want it. Nothing happens when it was never installed."""
    try:
        from trl.trainer import utils
    except ImportError:  # pragma: no cover - trl is a dependency
        return
    if getattr(getattr(utils, "_use_triton", None), _MARK, False):
        utils._use_triton = utils._use_triton.stock


# TRL's fused head walks the vocabulary in tiles of this many columns; every tile's backward makes about ten
# temporaries of (positions x tile) floats, alive while every activation still is.
CPU_VOCAB_TILE = 4096
_stock_tile: int | None = None  # TRL's own setting, as small_vocab_tiles_on_cpu found it


def small_vocab_tiles_on_cpu() -> bool:
    """Make TRL's fused head work through the vocabulary in tiles of CPU_VOCAB_TILE columns instead of 32,768.
    For a process that trains on CPU only: the setting is TRL's module global, and GPUs want the large tiles.

    On CPU the large tiles cost memory at the worst moment (the head's backward runs first, while every
    activation is still kept: ~240 MiB of SmolLM2-135M's peak on a 752-token micro-batch) and are slower as
    well (their temporaries fall out of the cache); scripts/bench_memory_savers.py measures both. Returns
    False, and changes nothing, when the installed TRL has no such setting."""
    try:
        from trl.trainer import utils
    except ImportError:  # pragma: no cover - trl is a dependency
        return False
    global _stock_tile
    if not isinstance(getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None), int):
        return False
    if utils._CHUNKED_LOGPROB_CHUNK_SIZE != CPU_VOCAB_TILE:
        _stock_tile = utils._CHUNKED_LOGPROB_CHUNK_SIZE
    utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(utils._CHUNKED_LOGPROB_CHUNK_SIZE, CPU_VOCAB_TILE)
    return True


def stock_vocab_tiles() -> None:
    """Undo `small_vocab_tiles_on_cpu` (TRL's own tile width again), for a run in the same process that does
    not want it. Nothing happens when it was never installed."""
    try:
        from trl.trainer import utils
    except ImportError:  # pragma: no cover - trl is a dependency
        return
    if _stock_tile is not None and getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None) == CPU_VOCAB_TILE:
        utils._CHUNKED_LOGPROB_CHUNK_SIZE = _stock_tile
