"""QLoRA adapters: the base weights as the 4-bit model presented them during training.

A QLoRA adapter learned to correct the 4-bit base, not the original 16/32-bit one. The `dequantized` merge
policy therefore folds it into quantize -> dequantize(W) for every weight that was 4-bit in training
(targeted or not), which reproduces base + adapter as trained. The round trip is bitsandbytes'
`quantize_4bit` / `dequantize_4bit` with the settings `Params4bit` uses (blocksize 64, the recipe's
quant type and double quantization); a test checks it is bit-identical to what a `Linear4bit` holds.

Which weights were 4-bit is decided the way transformers decides it when it loads a model in 4 bits:
every nn.Linear / Conv1D except the output embeddings, tied weights and `_keep_in_fp32_modules`, or except
`llm_int8_skip_modules` when the recipe names them (transformers' own functions, run on a weightless copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.model.checkpoint import FLOAT_DTYPES, SAFETENSORS_DTYPE

if TYPE_CHECKING:
    import torch

# Params4bit's blocksize (bitsandbytes/nn/modules.py: `blocksize = 64` when none is given, and transformers
# passes none). It is recorded in merge.json.
BLOCKSIZE = 64


@dataclass(frozen=True)
class QuantizedBase:
    """How the base was quantized in training."""

    quant_type: str  # nf4 or fp4
    double_quant: bool  # bnb_4bit_use_double_quant (compress_statistics)
    # The dtype the base was loaded in before quantization (model.dtype, resolved on the training machine):
    # transformers casts each weight to it and quantizes that, so the round trip starts from it too.
    load_dtype: str
    skip_modules: tuple[str, ...] | None  # llm_int8_skip_modules
    weights: dict[str, bool]  # name of each 4-bit weight -> stored (in, out) like GPT-2's Conv1D
    # Where to run the round trip: the kind of device training quantized on, when this machine has one.
    # bitsandbytes' CUDA kernel and its CPU implementation use the same codes and block absmax, but they are
    # separate code, so values exactly between two codes might round differently.
    device: str = "cpu"

    def changes(self, name: str, stored_dtype: str) -> bool:
        """Whether `as_trained` changes this tensor (stored_dtype in safetensors spelling: F32, BF16...)."""

        if name in self.weights:
            return True
        return stored_dtype in FLOAT_DTYPES and stored_dtype != SAFETENSORS_DTYPE[self.load_dtype]

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "blocksize": BLOCKSIZE,
            "quantized_from": self.load_dtype,
            "skip_modules": list(self.skip_modules) if self.skip_modules is not None else None,
            "quantized_weights": len(self.weights),
            "quantized_on": self.device,
        }


def quantized_weight_names(
    base_dir: Path, skip_modules: list[str] | None, trust_remote_code: bool = False
) -> dict[str, bool]:
    """The weights transformers stores in 4 bits when it loads `base_dir` with load_in_4bit."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes and module types only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # Same call as transformers' Bnb4BitHfQuantizer._process_model_before_weight_loading.
    not_converted = HfQuantizer.get_modules_to_not_convert(model, skip_modules, model._keep_in_fp32_modules)
    return {
        f"{name}.weight": isinstance(module, Conv1D)
        for name, module in model.named_modules()
        if should_convert_module(name, not_converted)
        and (type(module) is torch.nn.Linear or isinstance(module, Conv1D))
    }


def as_trained(weight: torch.Tensor, name: str, base: QuantizedBase) -> torch.Tensor:
    """The tensor as the quantized base presented it in training: 4-bit weights went through quantize ->
    dequantize; every other floating-point tensor was loaded in the training dtype."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    if not weight.is_floating_point():
        return weight
    loaded = weight.to(getattr(torch, base.load_dtype))
    if name not in base.weights:
        return loaded
    conv1d = base.weights[name]
    # transformers transposes Conv1D weights to (out, in) before quantizing them (Bnb4bitQuantize).
    source = (loaded.T if conv1d else loaded).contiguous().to(base.device)
    packed, state = quantize_4bit(
        source, blocksize=BLOCKSIZE, compress_statistics=base.double_quant, quant_type=base.quant_type
    )
    restored = dequantize_4bit(packed, state).cpu()
    return restored.T if conv1d else restored


def quantization_device(trained_on: str | None) -> str:
    """cuda when training ran on a CUDA GPU and this machine has one; else cpu."""
    import torch

    return "cuda" if trained_on == "cuda" and torch.cuda.is_available() else "cpu"
