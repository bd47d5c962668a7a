"""Folding the active adapter into the base weights while generating, and taking it out again.

PEFT's LoRA layers add their low-rank product at every adapted layer on every decoding step: Python calls
and small matmuls that cost 9-20% of each token's time on SmolLM2-135M and 28% on a tiny Llama, at batch 1
on one CPU core (scripts/bench_generate.py). Folded with PEFT's `merge_adapter`, each adapted layer computes with W + scale * B @ A and
skips the adapter; `unmerge_adapter` takes it out again, so the base (`@base:`, `eval --compare-base`,
chat's `/adapter base`) and the other adapters still answer. One adapter is folded at a time: switching
unfolds it first.

What folds, from PEFT's own merge code (peft/tuners/{lora,adalora,vera}/layer.py, lora/variants.py):
  LoRA, DoRA, AdaLoRA, VeRA   their merge adds exactly the update their forward adds (DoRA: scales the
                              row by magnitude / norm, as its forward does), so answers change only by float
                              rounding
  other LoRA variants         aLoRA (depends on where its invocation tokens are), Arrow and QA-LoRA refuse
                              to merge; the rest are left unfolded as untested here
  4-bit bases                 see `refusal`
  tied weights                an adapted layer whose weight is also another layer's (a tied LM head and
                              embedding): folding would change both, the forward changes one

Taking it out again: float32 weights get W back to float rounding (W + D - D; it does not grow with
switches). In bfloat16/float16 it would not: the rounded W + D minus D drifts further from W at every
switch (measured, bfloat16, a tiny model and a large random adapter: max error 0.025 after one fold,
1.7 after a hundred, with |W| <= 0.4), so the weights an adapter changes are copied to the CPU before the
first fold and copied back bit for bit (memory: one copy of those weights, kept for the session).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

FOLDING_TYPES = ("LORA", "ADALORA", "VERA")  # peft_type values whose merge is their forward's update


@dataclass
class Folding:
    """Folds one adapter at a time into the base weights of a PeftModel (loratool.generate.Adapters)."""

    model: Any  # the PeftModel
    quantized: bool  # the base was loaded in 4 bits
    log: Callable[[str], None] = print
    folded: str | None = None  # the adapter in the base weights now
    refusals: dict[str, str | None] = field(default_factory=dict)  # why an adapter does not fold
    saved: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # half precision: id -> (param, CPU copy)
    told: set[str] = field(default_factory=set)  # adapters whose fold (or its refusal) was said

    def fold(self, name: str, label: str) -> None:
        """Fold adapter `name` in (unfolding another first), or say once why it stays unfolded."""
        if self.folded == name:
            return
        self.unfold()
        if name not in self.refusals:
            self.refusals[name] = refusal(self.model, name, quantized=self.quantized)
        reason = self.refusals[name]
        started = time.perf_counter()
        if reason is None:
            reason = self._merge(name)
        if name not in self.told:
            self.told.add(name)
            if reason is None:
                ms = 1000 * (time.perf_counter() - started)
                self.log(f"adapter {label} folded into the base weights for generation ({ms:.0f} ms)")
            else:
                self.log(f"note: adapter {label} is not folded for generation ({reason}): it answers through "
                         "PEFT's LoRA layers, slower than the base")  # fmt: skip

    def unfold(self) -> None:
        """Take the folded adapter out of the base weights (nothing folded: nothing done)."""
        if self.folded is None:
            return
        _unmerge(self.model)
        self._restore(self.folded)
        self.folded = None

    def _merge(self, name: str) -> str | None:
        """Fold `name` in; PEFT's reason when it refuses after all (its partial merge undone)."""
        params = _base_params(self.model, name)
        for param in params:
            if param.element_size() < 4 and id(param) not in self.saved:  # bfloat16 / float16
                self.saved[id(param)] = (param, param.detach().to("cpu", copy=True))
        try:
            self.model.merge_adapter(adapter_names=[name])
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            _unmerge(self.model)
            self._restore(name)
            self.refusals[name] = f"PEFT refuses to merge it: {str(exc).strip().splitlines()[0][:200]}"
            return self.refusals[name]
        self.folded = name
        return None

    def _restore(self, name: str) -> None:
        """Half-precision weights of `name`'s layers back bit for bit (float32 ones need no copy)."""
        import torch

        with torch.no_grad():
            for param in _base_params(self.model, name):
                if id(param) in self.saved:
                    param.data.copy_(self.saved[id(param)][1])


def refusal(model: Any, name: str, *, quantized: bool) -> str | None:
    """Why adapter `name` cannot be folded into the base weights exactly; None when it can."""
    if quantized:
        # A 4-bit weight cannot hold W + B @ A: PEFT's merge dequantizes, adds and quantizes again, which
        # rounds the adapter's update onto the 4-bit grid (answers change), and unmerging cannot give back
        # the original 4-bit codes. The LoRA layers stay, computing the update in full precision.
        return "the base is 4-bit: folding would round the adapter to 4 bits"
    config = model.peft_config[name]
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind not in FOLDING_TYPES:
        return f"PEFT does not merge {kind} adapters exactly"
    if getattr(config, "layer_replication", None):
        return "its layers are replicated (lora.layer_replication) and PEFT cannot merge those"
    layers = _adapted_layers(model, name)
    for path, layer in layers:
        variant = getattr(layer, "lora_variant", {}).get(name)
        if variant is not None and not _is_dora(variant):
            return f"its {type(variant).__name__.removesuffix('Variant')} layers have no exact merge"
        for param in layer.get_base_layer().parameters(recurse=False):
            if not param.is_floating_point():
                return f"{path} has quantized weights"
    tied = _tied_layer(model, layers)
    if tied:
        return f"{tied[0]} shares its weight with {tied[1]}: folding would change both"
    return None


@contextmanager
def folded(model: Any, *, quantized: bool, log: Callable[[str], None]) -> Iterator[None]:
    """The active adapter of `model` folded in while the block runs (`loratool eval` around its
    generation); a model without adapters is left as it is."""
    if not hasattr(model, "peft_config"):
        yield
        return
    name = model.active_adapter
    folding = Folding(model, quantized, log)
    folding.fold(name, name)
    try:
        yield
    finally:
        folding.unfold()


def _adapted_layers(model: Any, name: str) -> list[tuple[str, Any]]:
    """(module path, PEFT tuner layer) of every layer that adapter `name` adapts."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # deferred: peft is heavy

    return [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and name in _adapter_keys(module)
    ]


def _adapter_keys(layer: Any) -> set[str]:
    keys: set[str] = set()
    for attribute in (*layer.adapter_layer_names, *getattr(layer, "other_param_names", ())):
        value = getattr(layer, attribute, None)
        if isinstance(value, dict) or hasattr(value, "keys"):
            keys.update(value.keys())
    return keys


def _base_params(model: Any, name: str) -> list[Any]:
    """The base weights (and biases) that folding adapter `name` changes."""
    return [
        p
        for _, layer in _adapted_layers(model, name)
        for p in layer.get_base_layer().parameters(recurse=False)
    ]


def _tied_layer(model: Any, layers: list[tuple[str, Any]]) -> tuple[str, str] | None:
    """(adapted layer, the other owner) of the first adapted weight that another module shares."""
    owners: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(path)
    for path, layer in layers:
        weight = getattr(layer.get_base_layer(), "weight", None)
        others = [p for p in owners.get(id(weight), []) if not p.startswith(f"{path}.")]
        if others:
            return path, others[0].removesuffix(".weight")
    return None


def _is_dora(variant: Any) -> bool:
    from peft.tuners.lora.variants import DoraLinearVariant  # deferred: peft is heavy

    # DoraEmbeddingVariant subclasses DoraLinearVariant; the convolution variants share a private base
    return isinstance(variant, DoraLinearVariant) or type(variant).__name__.startswith("DoraConv")


def _unmerge(model: Any) -> None:
    """PEFT's unmerge_adapter, on the merged layers only (it warns for every layer that is not)."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # deferred: peft is heavy

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and module.merged:
            module.unmerge()
