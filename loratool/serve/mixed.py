"""Rows of one batch through different LoRA adapters, two matmuls per layer whatever the mix.

PEFT's mixed-adapter path (`adapter_names=`) loops, in every LoRA layer and at every step, over the adapters in
the batch: a Python list of row indices, a gather of those rows, two small matmuls, a scatter back. On
SmolLM2-135M (210 LoRA layers) with 3 adapters in a batch of 8 that is some 3,800 small operations a step, and
it made a mixed batch cost nearly twice a batch of one adapter (docs/benchmarks.md, "Serving").

Here the adapters present in the batch are concatenated once per layer (A: their ranks stacked, B: side by
side) and a step runs, per layer, `x @ A.T`, a multiply by a row mask that holds each row's own scaling on its
adapter's columns and zeros elsewhere, and `@ B.T`: four operations, the same for any mix. Rows on the base
get an all-zero mask. The concatenation is rebuilt only when the set of adapters in the batch changes (a
request for another adapter joins), and thrown away when adapters are loaded or unloaded.

Batches of one adapter and batches on the base go this way too, with PEFT's adapter layers switched off once
(`disable_adapter_layers`) rather than per forward: PEFT's `disable_adapter()` context walks every module and
its parameters on entry and exit, which cost more per step (some 30 ms on SmolLM2) than the whole LoRA work.

Only plain LoRA on linear layers goes this way: a batch with an adapter that has a variant (DoRA, aLoRA...),
LoRA on embeddings, a bias on B, or modules_to_save runs PEFT's own path (`peft_path()` switches its layers
back on), which handles them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from loratool.generate.run import BASE


class MixedLora:
    """The concatenated path for one model. `reset()` after the model's adapters change."""

    def __init__(self) -> None:
        self._model: Any = None
        self._layers: list[Any] = []  # every LoRA layer, a forward hook on each
        self._hooks: list[Any] = []
        self._present: tuple[str, ...] | None = None  # the adapters the concatenations hold
        self._joined: dict[int, tuple[Any, Any, tuple]] = {}  # id(layer) -> (A, B, layout)
        self._masks: dict[tuple, Any] = {}  # layout -> this forward's row mask
        self._rows: list[str] | None = None  # each row's adapter, while a forward runs
        self._plain: dict[str, bool] = {}  # adapter -> whether it can go this way
        self._peft_off = False  # PEFT's adapter layers are switched off: the hooks add every row's LoRA

    def reset(self) -> None:
        """Back to PEFT's own state; call it before the model's adapters change (load, unload)."""
        self.peft_path()
        for hook in self._hooks:
            hook.remove()
        self.__init__()

    def peft_path(self) -> None:
        """PEFT's adapter layers on again, for a batch this path does not handle."""
        if self._peft_off:
            self._model.base_model.enable_adapter_layers()
            self._peft_off = False

    def handles(self, model: Any, adapters: list[str]) -> bool:
        """Whether every adapter in `adapters` (each row's) is plain LoRA on linear layers."""
        self._adopt(model)
        return all(self._plain_adapter(name) for name in set(adapters) if name != BASE)

    @contextmanager
    def rows(self, model: Any, adapters: list[str]):
        """While inside, `model`'s forward gives row i adapter `adapters[i]` (BASE: none)."""
        self._adopt(model)
        present = tuple(sorted(set(adapters) - {BASE}))
        if present != self._present:
            self._join(present)
        if not self._hooks:
            self._hooks = [layer.register_forward_hook(self._add_delta) for layer in self._layers]
        if not self._peft_off:
            model.base_model.disable_adapter_layers()  # PEFT runs the base layers only
            self._peft_off = True
        self._rows, self._masks = adapters, {}
        try:
            yield
        finally:
            self._rows, self._masks = None, {}

    def last_logits(self, model: Any, ids: Any, options: dict[str, Any]) -> Any:
        """The last position's logits (float32) of each row, inside `rows()`. On a CPU, for 2 rows or more, the
        output head runs as `W @ h.T`: BLAS's x @ W.T with a few rows and a wide W (SmolLM2's 49,152 x 576 head)
        was measured 2-4x slower (36 ms vs 9 at 3 rows, docs/benchmarks.md "Serving"), a fifth of a step."""
        causal = model.get_base_model()
        head = causal.get_output_embeddings()
        if ids.shape[0] < 2 or ids.device.type != "cpu" or not _plain_head(causal, head):
            return model(input_ids=ids, **options).logits[:, -1, :].float()
        inner = {key: value for key, value in options.items() if key != "logits_to_keep"}
        hidden = causal.get_decoder()(input_ids=ids, **inner).last_hidden_state[:, -1, :]
        return (head.weight @ hidden.T).T.float()

    def _adopt(self, model: Any) -> None:
        if model is not self._model:
            self.reset()  # (the first call, or a plain model that got its first adapter)
            self._model = model
            self._layers = [m for m in model.modules() if _is_lora_layer(m)]

    def _plain_adapter(self, name: str) -> bool:
        if name not in self._plain:
            self._plain[name] = _plain(self._model, self._layers, name)
        return self._plain[name]

    def _join(self, present: tuple[str, ...]) -> None:
        import torch

        self._joined = {}
        for layer in self._layers:
            held = [name for name in present if name in layer.lora_A]
            if not held:
                continue
            a = torch.cat([layer.lora_A[name].weight for name in held], dim=0)  # (sum of ranks, in)
            b = torch.cat([layer.lora_B[name].weight for name in held], dim=1)  # (out, sum of ranks)
            layout = tuple(
                (name, layer.lora_A[name].weight.shape[0], float(layer.scaling[name])) for name in held
            )
            self._joined[id(layer)] = (a, b, layout)
        self._present = present

    def _add_delta(self, layer: Any, args: tuple, output: Any) -> Any:
        if self._rows is None:
            return None  # a forward outside `rows()`: PEFT's own path, untouched
        joined = self._joined.get(id(layer))
        if joined is None:
            return None  # no adapter in this batch targets this layer
        import torch.nn.functional as F

        a, b, layout = joined
        x = args[0]
        mask = self._masks.get(layout)
        if mask is None:
            mask = self._masks[layout] = _row_mask(layout, self._rows, a)
        if x.dim() == 2:  # (rows, features): some callers flatten the sequence
            mask = mask[:, 0, :]
        delta = F.linear(F.linear(x.to(a.dtype), a) * mask, b)
        return output + delta.to(output.dtype)


def _row_mask(layout: tuple, rows: list[str], like: Any) -> Any:
    """(rows, 1, sum of ranks): each row's scaling on its adapter's columns, zeros elsewhere."""
    import torch

    mask = torch.zeros(len(rows), 1, like.shape[0], dtype=like.dtype)
    start = 0
    for name, rank, scaling in layout:
        for i, row in enumerate(rows):
            if row == name:
                mask[i, 0, start : start + rank] = scaling
        start += rank
    return mask.to(like.device)


def _plain_head(causal: Any, head: Any) -> bool:
    """An output head that is only `hidden @ W.T`: a bare linear layer without bias, on a model type whose
    CausalLM forward was read to do nothing else (Gemma's only when its logits are not soft-capped)."""
    import torch

    config = causal.config
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    if config.model_type in ("gemma2", "gemma3_text"):
        return getattr(config, "final_logit_softcapping", None) is None
    return config.model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _is_lora_layer(module: Any) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _plain(model: Any, layers: list[Any], name: str) -> bool:
    """Plain LoRA on linear layers only: no variant, no embedding LoRA, no bias on B, no modules_to_save, not
    folded into the base."""
    import torch
    from peft.utils import ModulesToSaveWrapper, PeftType

    if getattr(model.peft_config.get(name), "peft_type", None) != PeftType.LORA:
        return False
    for layer in layers:
        if getattr(layer, "merged", False):  # folded into the base: PEFT unfolds it as it needs
            return False
        if name in getattr(layer, "lora_variant", {}) or name in getattr(layer, "lora_embedding_A", {}):
            return False
        if name in layer.lora_A:
            if not isinstance(layer.lora_A[name], torch.nn.Linear) or layer.lora_B[name].bias is not None:
                return False
    return not any(isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save for m in model.modules())
