"""Patches that keep training light without changing what it learns, behind one `apply(model, hw)`.

Each is measured in docs/benchmarks.md and tested to give the same loss and gradients:
- lora_dropout.py: LoRA dropout keeps a one-byte mask instead of a dropped copy of each layer's input;
- loss_positions.py: the output head scores only positions that carry loss (and in small tiles on CPU);
- cheap_recompute.py: norm and gated-MLP outputs are rebuilt in the backward pass instead of kept.

Not every saver pays on every model: `choose` decides, from the model's config and the hardware, which
ones a run installs (a switch that measurably hurts an architecture is off for it, with the reason), and
`apply` installs exactly those and returns the choice for the run's record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratool.train.memory.cheap_recompute import recompute_cheap_activations
from loratool.train.memory.lora_dropout import keep_masks_not_copies
from loratool.train.memory.loss_positions import (
    score_every_position_on_cpu,
    score_only_loss_positions,
    small_vocab_tiles_on_cpu,
    stock_vocab_tiles,
)

if TYPE_CHECKING:
    from loratool.model.hardware import Hardware


@dataclass(frozen=True)
class MemorySavers:
    """Which memory savers a run installs; `off` says, for each switch that is off, why."""

    mask_dropout: bool = True  # LoRA dropout keeps a one-byte mask, not a dropped copy (lora_dropout.py)
    loss_positions: bool = True  # the LM head scores only positions with loss, on CPU too (loss_positions.py)
    cpu_vocab_tiles: bool = True  # ...in vocabulary tiles of 4,096 columns on CPU (loss_positions.py)
    cheap_recompute: bool = True  # norm and gated-MLP outputs rebuilt, not kept (cheap_recompute.py)
    off: tuple[tuple[str, str], ...] = ()  # (switch, why it is off)

    def without(self, switch: str, why: str) -> MemorySavers:
        """The same choice with `switch` off, for the reason `why`."""
        if switch not in SWITCHES:
            raise ValueError(f"no memory saver named {switch!r} (there are: {', '.join(SWITCHES)})")
        if not getattr(self, switch):
            return self
        return dataclasses.replace(self, **{switch: False}, off=(*self.off, (switch, why)))

    def describe(self) -> str:
        """One line for the log: what is on, and each switch that is off with why."""
        on = [name for name in SWITCHES if getattr(self, name)]
        off = [f"{name} off ({why})" for name, why in self.off]
        return ", ".join([*on, *off]) if on or off else "none"

    def record(self) -> dict[str, Any]:
        """For run.json: every switch, and why those that are off are off."""
        return {**{name: getattr(self, name) for name in SWITCHES}, "off": dict(self.off)}


# Below this hidden size the mask-keeping dropout measured slower than PEFT's (see `choose`).
NARROW = 256

SWITCHES = tuple(f.name for f in dataclasses.fields(MemorySavers) if f.type in (bool, "bool"))


def choose(model_config: Any, hw: Hardware) -> MemorySavers:
    """The memory savers for a model with this config (a transformers PretrainedConfig) on this hardware.

    Every switch is on unless a measurement says it hurts; each exception below names the evidence: the
    mask-keeping dropout is off on models narrower than NARROW, the vocabulary tiles off on a GPU.

    At real widths, checked without finding one (2026-12-06, a shared 2-core CPU, so medians of few runs): Gemma 3, the
    shipped architecture least like the Llama shapes the savers were measured on (gemma3_text: a tied
    262,144-token head, gelu_pytorch_tanh MLP, four norms per layer, sliding window), as a random model at
    Gemma-3-270m's widths (scripts/bench_arch.py --only gemma3_text --real-shape --layers 2 --threads 1,
    2 rounds of 3 steps). With every switch on a step took 22.0 CPU s and peaked at 1,695 MiB; each switch
    off alone: mask_dropout 21.7 s / 1,850 MiB, loss_positions 33.3 s / 2,058 MiB, cpu_vocab_tiles
    26.6-27.8 s / 2,888-2,942 MiB, cheap_recompute 19.8-20.8 s / 1,823-1,827 MiB (within the noise: four
    forward+backward passes interleaved in one process gave it 0.95x the CPU time of the same model without
    it). On the head alone (scripts/bench_lm_head.py, one thread, 256 positions), 4,096-column tiles took
    3.5-3.8 s and added 75-89 MiB, TRL's 32,768 columns 5.1-6.0 s and 302-303 MiB. (With two threads on
    cores other jobs share, small tiles look slower: every tile is a parallel region whose barrier waits for
    a descheduled thread. Measure on a quiet machine.)"""
    savers = MemorySavers()
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    width = getattr(text, "hidden_size", None)
    if width is not None and width < NARROW:
        # scripts/bench_arch.py (2026-12-07, docs/benchmarks.md "Per-architecture training throughput"): on
        # the 2-layer, 64-wide models with the real structure of Gemma 3, Qwen3, Qwen2, Mistral, Phi-3 and
        # Llama, a run trained 1.50x, 1.21x, 1.04x, 1.07x, 1.07x and 1.08x the tokens/s (medians of 3 rounds)
        # with PEFT's own dropout, for 0.97-1.08x the memory; at widths of 256 and more (shapes a and b,
        # SmolLM2, Gemma-3-270m's) it saves memory at no measurable cost in time.
        savers = savers.without(
            "mask_dropout", f"hidden size {width} < {NARROW}: PEFT's dropout measured faster"
        )
    if hw.device != "cpu":
        # The tiles exist for CPU caches; on a GPU, TRL's own 32,768 columns are what its kernel is tuned for.
        savers = savers.without("cpu_vocab_tiles", "not on a CPU")
    return savers


def apply(model: Any, hw: Hardware, savers: MemorySavers | None = None) -> MemorySavers:
    """Install the memory savers `choose` picks for `model` (with its adapter attached, before the trainer
    is built), or exactly `savers` when given. Returns what was installed: the choice, less any switch the
    installed TRL cannot take (for run.json, `.record()`)."""
    if savers is None:
        savers = choose(model.config, hw)
    if savers.mask_dropout:
        keep_masks_not_copies(model)  # the same dropout, a fraction of its memory and time
    # The two LM-head switches set TRL module globals, so an earlier run in this process may have set them:
    # each is put back to TRL's own when it is off.
    if not savers.loss_positions:
        score_every_position_on_cpu()
    elif not score_only_loss_positions():  # the LM head skips rows without loss on CPU too
        savers = savers.without("loss_positions", "the installed TRL has no fused LM head to switch")
    if not savers.cpu_vocab_tiles:
        stock_vocab_tiles()
    elif not small_vocab_tiles_on_cpu():  # the LM head's backward in smaller, faster tiles
        savers = savers.without("cpu_vocab_tiles", "the installed TRL has no tile width to set")
    if savers.cheap_recompute:
        recompute_cheap_activations(model)  # norm and MLP outputs rebuilt, not kept
    return savers
