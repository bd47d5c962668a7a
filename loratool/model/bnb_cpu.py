"""bitsandbytes' 4-bit layers on the CPU: the same arithmetic on every CPU, no noise about an unused kernel.

bitsandbytes 0.50 has two CPU paths for a `Linear4bit`:

- dequantize-then-matmul (`matmul_4bit` -> `torch.ops.bitsandbytes.gemm_4bit`, the default backend): the 4-bit
  codes are dequantized to the layer's compute dtype (`bnb_4bit_compute_dtype`, float32 on a CPU unless the
  recipe says otherwise) and multiplied with `F.linear`. Training always takes it (train mode, or any input
  that needs a gradient), and so does every CPU without AVX512-BF16.
- a fused kernel for CPUs with AVX512-BF16 (recent AMD EPYC, Intel Sapphire Rapids and later). The first time
  `Linear4bit.forward` runs in eval mode on an input without grad, it checks the per-module flag
  `support_avx512bf16_for_cpu` (set in `__init__` from `bitsandbytes.functional.has_avx512bf16()`) and, if
  set, repacks the weight in place (`_convert_weight_packed_for_cpu`: new layout, block absmax cast to
  bfloat16, `quant_state.packing_format_for_cpu = True`). From then on `matmul_4bit` sends every call of that
  layer to `gemv_4bit`, which casts the input and absmax to bfloat16 whatever the compute dtype says — and,
  having no autograd formula, passes no gradient back through the frozen layer, in train mode too.

Measured: on a real AVX512-BF16 machine one Linear4bit (float32 compute) is off by ~7e-3 from the float32
path and the QLoRA merge test's logits by 3.7e-2, 37 times merge verification's 1e-3 bound. With a stand-in
that rounds like the fused kernel (tests/conftest.py), one 128->64 layer is off by 5e-3, the 2-layer
test model's logits by 5e-2 and the same merge test by 4.0e-2. A trainer evaluation during QLoRA training
repacks every layer, so the training steps after it would run through the kernel too, and without a
gradient through the base layers.

`use_exact_4bit_matmul(model)` clears that flag on every 4-bit layer right after loading, before the first
forward. The flag is read only in `Linear4bit.forward`, only for this choice, so each layer then computes
exactly as on a CPU without AVX512-BF16: merge verification, eval, generation and validation during training
give the same numbers on every CPU, at the precision the recipe asked for. The price is speed on those CPUs
in eval mode (the fused kernel is faster), which a trustworthy number is worth.

The fused kernel is fetched from the hub (`kernels-community/quantization-bitsandbytes`, needs the `kernels`
package) when bitsandbytes is imported, on AVX512-BF16 CPUs only; when that fails bitsandbytes logs
"Failed to load CPU gemm_4bit_forward from kernels-community ..." — on every command, since PEFT imports
bitsandbytes. Offline (HF_HUB_OFFLINE=1), the `kernels` package first logs "Skipping publisher trust check
for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode" — once per
process, so once per rank under torchrun. loratool never uses that kernel, so
`silence_kernel_hub_warning()` drops exactly those two records.
"""

from __future__ import annotations

import logging
from typing import Any

# The logger bitsandbytes/backends/cpu/ops.py writes with (logging.getLogger(__name__)) and the start of the
# message it logs at import time when the hub kernel cannot be loaded.
KERNEL_HUB_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNEL_HUB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# The logger of kernels/_internals/hf_hub.py and the start of what it logs, offline, for that same kernel (the
# repository named in full: the check of any other kernel repository stays visible).
KERNEL_TRUST_LOGGER = "kernels._internals.hf_hub"
KERNEL_TRUST_MESSAGE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"


class _DropKernelHubWarning(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.message)


def silence_kernel_hub_warning() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward" record and the `kernels` package's offline
    trust-check record for the same kernel (and nothing else either logs). Both are logged while
    bitsandbytes is imported, so call this before anything imports it (peft does)."""
    for name, message in (
        (KERNEL_HUB_LOGGER, KERNEL_HUB_MESSAGE),
        (KERNEL_TRUST_LOGGER, KERNEL_TRUST_MESSAGE),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKernelHubWarning) for f in logger.filters):
            logger.addFilter(_DropKernelHubWarning(message))


def _four_bit_layers(model: Any) -> list[Any]:
    import sys

    if "bitsandbytes" not in sys.modules:  # nothing was quantized, and --help stays light
        return []
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def use_exact_4bit_matmul(model: Any) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` on dequantize-then-matmul at its compute dtype, on any
    CPU (see the module docstring). Call right after loading, before the first forward. Returns the number
    of 4-bit layers."""
    layers = _four_bit_layers(model)
    for layer in layers:
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False):
            # Repacking cast the block absmax to bfloat16: the exact weights cannot be recovered.
            raise RuntimeError("use_exact_4bit_matmul: a 4-bit layer already ran the fused CPU kernel")
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def four_bit_matmul(model: Any) -> str | None:
    """How the 4-bit layers of `model` compute, for the records (None: it has none)."""
    layers = _four_bit_layers(model)
    if not layers:
        return None
    if any(getattr(layer, "support_avx512bf16_for_cpu", False) for layer in layers):
        return "fused AVX512-BF16 kernel in eval mode (bfloat16)"
    dtypes = sorted({str(layer.compute_dtype).removeprefix("torch.") for layer in layers})
    devices = sorted({layer.weight.device.type for layer in layers})
    return f"dequantize-then-matmul in {'/'.join(dtypes)} ({'/'.join(devices)})"
