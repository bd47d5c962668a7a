"""Keep fewer activations for the backward pass: recompute the cheap ones instead.

In a decoder layer, several tensors that autograd keeps for the backward pass are one elementwise step
away from tensors it keeps anyway:
- a norm's output (read by the q, k, v or gate and up projections' LoRA `A`) is `norm(x)`, and the norm
  keeps `x` itself;
- in a gated MLP, `act(gate)` (kept by the product) and `act(gate) * up` (kept by down_proj's LoRA `A`)
  come from `gate` and `up`, which the activation and the product keep.
On a Llama layer with LoRA on every linear layer those are about 40% of the bytes kept
(scripts/bench_memory_savers.py measures it), and recomputing them costs a few elementwise passes per
layer in the backward pass, against a whole forward pass of the layer for activation checkpointing.

`recompute_cheap_activations(model)` wraps each decoder layer's forward in a saved-tensor hook: when an
operation saves one of the tensors above, autograd stores a note instead, and the backward pass rebuilds
the tensor from what is kept anyway (the same operations on the same inputs, so the same values). A
tensor is only replaced after checking how it was made (the product's autograd node must read exactly the
activation's and up's outputs). Layers that run under activation checkpointing (or any other saved-tensor
hook, such as offloading) are left alone: checkpointing already keeps nothing of them. Evaluation and
generation save nothing, so they are unchanged.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any

import torch

_active: _Notes | None = None  # the decoder layer whose forward pass is running, if it takes notes
_recomputing = False
_hooked = False  # a module under the notes' hook is running


class _Recomputable:
    """How to rebuild one tensor; the value is built once, at the first unpack, and shared."""

    __slots__ = ("autocast", "build", "device_type", "dtype", "nbytes", "shape", "value")

    def __init__(self, tensor: torch.Tensor, build: Callable[[], torch.Tensor]) -> None:
        self.build = build
        self.shape, self.dtype, self.nbytes = tensor.shape, tensor.dtype, tensor.untyped_storage().nbytes()
        self.device_type = tensor.device.type
        # Under mixed precision the recompute must see the same autocast state as the forward pass.
        self.autocast = (
            (torch.get_autocast_dtype(self.device_type), True)
            if torch.is_autocast_enabled(self.device_type)
            else None
        )
        self.value: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        global _recomputing
        if self.value is None:
            autocast = (
                torch.autocast(self.device_type, dtype=self.autocast[0])
                if self.autocast
                else contextlib.nullcontext()
            )
            _recomputing = True
            try:
                with torch.no_grad(), autocast:
                    value = self.build()
            finally:
                _recomputing = False
            if value.shape != self.shape or value.dtype != self.dtype or not value.is_contiguous():
                raise RuntimeError(
                    f"loratool recompute: rebuilt {tuple(value.shape)} {value.dtype}, expected "
                    f"{tuple(self.shape)} {self.dtype}"
                )
            self.value = value
        return self.value


class _Note:
    """What autograd keeps instead of a recomputable tensor: the recipe, and the saved view's geometry."""

    __slots__ = ("geometry", "source")

    def __init__(self, source: _Recomputable, tensor: torch.Tensor) -> None:
        self.source = source
        self.geometry = (tensor.shape, tensor.stride(), tensor.storage_offset())


class _Notes:
    """The recomputable tensors of one decoder layer's forward pass, by storage."""

    def __init__(self) -> None:
        # The tensor itself stays referenced until the layer's forward pass ends, so that its memory cannot be
        # handed to another tensor that would then be mistaken for it.
        self.by_storage: dict[int, tuple[torch.Tensor, _Recomputable]] = {}

    def source(self, tensor: torch.Tensor) -> _Recomputable | None:
        entry = self.by_storage.get(tensor.untyped_storage().data_ptr())
        return None if entry is None else entry[1]

    def pack(self, tensor: torch.Tensor) -> Any:
        source = self.source(tensor)
        if (
            source is None
            or source.nbytes != tensor.untyped_storage().nbytes()
            or source.dtype != tensor.dtype
        ):
            return tensor
        return _Note(source, tensor)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Note):
            return packed
        size, stride, offset = packed.geometry
        return packed.source.get().as_strided(size, stride, offset)


def remember(tensor: torch.Tensor, build: Callable[[], torch.Tensor]) -> None:
    """Let the running decoder layer keep `build` instead of `tensor`, which must own its whole (contiguous)
    storage and be exactly what `build()` returns. `build` may only hold tensors that autograd keeps anyway.
    Outside a layer that takes notes, nothing happens."""
    if _active is None or _recomputing or tensor.grad_fn is None:
        return
    if (
        not tensor.is_contiguous()
        or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
    ):
        return
    _active.by_storage[tensor.untyped_storage().data_ptr()] = (tensor, _Recomputable(tensor, build))


def _other_hooks_active() -> bool:
    """Saved-tensor hooks of someone else (activation checkpointing, offloading) are in force."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


# The wrappers below are methods of the module (its previous forward kept as an attribute), not closures, so that a
# deep copy of the model dispatches to the copy.


def _forward_taking_notes(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's forward pass, collecting notes when it builds a graph outside anyone else's hooks."""
    global _active
    forward = self._loratool_inner_forward
    if not torch.is_grad_enabled() or _active is not None or _other_hooks_active():
        return forward(*args, **kwargs)
    _active = _Notes()
    try:
        return forward(*args, **kwargs)
    finally:
        _active.by_storage.clear()  # the graph holds the notes it took; the rest go now
        _active = None


def _forward_saving_notes(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A module that saves recomputable tensors (the projections, the gated MLP): its saves go through the notes.
    Only these modules run under the hook: an operation that saves its own output (sdpa, for one) would, through
    a hook that hands the tensor back, hold itself in a reference cycle until the backward pass."""
    global _hooked
    forward = self._loratool_inner_forward
    # Inside activation checkpointing (transformers checkpoints a layer from within its forward, so the layer's
    # notes may be open), the checkpoint's own hook must see every save: leave them to it.
    if _active is None or _hooked or _other_hooks_active():
        return forward(*args, **kwargs)
    _hooked = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_active.pack, _active.unpack):
            return forward(*args, **kwargs)
    finally:
        _hooked = False


def _is_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm)


def _note_norm_output(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        x = args[0]
        remember(output, lambda: module(x))


class _GatedMLP:
    """Notes for `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: act's and up's outputs as they are made,
    then the product, once its autograd node shows it is exactly act * up."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        self.act: tuple[torch.Tensor, torch.Tensor] | None = None  # (gate, act_fn(gate))
        self.up: torch.Tensor | None = None
        mlp.act_fn.register_forward_hook(self.after_act)
        mlp.up_proj.register_forward_hook(self.after_up)
        mlp.down_proj.register_forward_pre_hook(self.before_down)
        self.act_fn = mlp.act_fn

    def after_act(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        if _active is None or _recomputing or not args or not isinstance(output, torch.Tensor):
            return
        gate = args[0]
        self.act = (gate, output)
        remember(output, lambda: self.act_fn(gate))

    def after_up(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        if _active is not None and not _recomputing and isinstance(output, torch.Tensor):
            self.up = output

    def before_down(self, module: Any, args: tuple[Any, ...]) -> None:
        act, up = self.act, self.up
        self.act = self.up = None
        if _active is None or _recomputing or act is None or up is None or not args:
            return
        product = args[0]
        node = getattr(product, "grad_fn", None)
        gate, activated = act
        if node is None or type(node).__name__ != "MulBackward0" or product.shape != up.shape:
            return
        if {id(n) for n, _ in node.next_functions} != {id(activated.grad_fn), id(up.grad_fn)}:
            return
        source = _active.source(activated)
        # The activation's value, when rebuilt first for the product, is then shared with the product's backward.
        remember(product, lambda: (source.get() if source is not None else self.act_fn(gate)) * up)


def _reads_recomputable(module: torch.nn.Module) -> bool:
    """Where the tensors above get saved: linear layers (LoRA-wrapped or not) and gated MLPs."""
    if isinstance(module, torch.nn.Linear) or _is_gated_mlp(module):
        return True
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def _is_gated_mlp(module: torch.nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) and isinstance(
        getattr(module, "act_fn", None), torch.nn.Module
    )


def _wrap(module: torch.nn.Module, wrapper: Callable[..., Any]) -> None:
    if "_loratool_inner_forward" not in module.__dict__:
        module._loratool_inner_forward = (
            module.forward
        )  # the class's, or one set on the instance (lora_dropout.py)
        module.forward = types.MethodType(wrapper, module)


def recompute_cheap_activations(model: torch.nn.Module) -> int:
    """Make every decoder layer of `model` keep notes instead of its cheap activations (idempotent); the
    number of layers that do."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        if "_loratool_inner_forward" in layer.__dict__:
            continue
        _wrap(layer, _forward_taking_notes)
        for module in list(layer.modules())[1:]:
            if _is_norm(module):
                module.register_forward_hook(_note_norm_output)
            if _is_gated_mlp(module):
                _GatedMLP(module)
            if _reads_recomputable(module):
                _wrap(module, _forward_saving_notes)
    return len(layers)
