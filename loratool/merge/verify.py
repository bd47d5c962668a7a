"""Check a merged model against base + adapter on a few real inputs, in float32.

The probe rows and the comparison (largest |logit difference|, mean KL(base+adapter || merged) per
position, greedy agreement) are loratool/merge/compare.py's. Which reference, and how close it must be:

- EXACT: the merge is the same float32 arithmetic as base + adapter (plain LoRA; QLoRA with the
  `dequantized` policy against the 4-bit base; `original` against the full-precision base), stored in
  float32 (the 4-bit base too, on every CPU: loratool/model/bnb_cpu.py). Only summation order differs, so
  logits agree to ~1e-5: required max |Δlogit| <= 1e-3, mean KL <= 1e-6 and 100% greedy agreement.
  Anything looser would hide a real bug (a wrong scaling, a transposed delta, a missed layer all show up
  at 1e-2 or more).
- ROUNDED: the same, but the merged weights are stored in bfloat16 / float16. Rounding W + dW to 8 (bf16)
  or 11 (fp16) mantissa bits moves logits by ~1e-2 on real models: required mean KL <= 1e-3 and greedy
  agreement >= 95%; max |Δlogit| is reported only.
- QUANTIZATION_DRIFT: QLoRA with the `original` policy, compared with the 4-bit base + adapter the adapter
  was trained with. The merged model does not contain the quantization error the adapter learned around,
  so differences are expected and reported; the check only catches a merge that is far off: mean KL
  <= 0.1 nats per token (NF4 drift on real models is ~0.01-0.05). Greedy agreement is reported only: where
  the next-token distribution is flat (uncertain positions, or a random test model) a drift too small to
  matter still flips the argmax, while KL stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.merge.compare import Thresholds, compare, probe_logits
from loratool.model.bnb_cpu import four_bit_matmul, use_exact_4bit_matmul

if TYPE_CHECKING:
    from loratool.merge.qlora import QuantizedBase

EXACT = Thresholds(max_abs_logit_diff=1e-3, max_mean_kl=1e-6, min_greedy_agreement=1.0)
ROUNDED = Thresholds(max_abs_logit_diff=None, max_mean_kl=1e-3, min_greedy_agreement=0.95)
QUANTIZATION_DRIFT = Thresholds(max_abs_logit_diff=None, max_mean_kl=0.1, min_greedy_agreement=None)


@dataclass(frozen=True)
class Reference:
    """One model to compare the merged model with."""

    key: str  # name in merge.json: full_precision_base or quantized_base
    description: str
    thresholds: Thresholds
    quantized: QuantizedBase | None  # load the base in 4 bits like this; None = full precision


def verify(
    merged_dir: Path,
    base_dir: Path,
    adapter_dir: Path,
    references: list[Reference],
    probes: list[list[int]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Compare the merged model with each reference; one result per reference, keyed like merge.json."""

    merged = probe_logits(_load_merged(merged_dir), probes, "  verifying the merged model", log)
    results: dict[str, Any] = {}
    for ref in references:
        model = _load_reference(base_dir, adapter_dir, ref.quantized)
        result = compare(
            probe_logits(model, probes, f"  verifying: {ref.description}", log), merged, ref.thresholds
        )
        matmul = four_bit_matmul(model)
        del model
        results[ref.key] = {"reference": ref.description, **result}
        if matmul is not None:
            results[ref.key]["four_bit_matmul"] = matmul
        log(
            f"  vs {ref.description}: max |Δlogit| {result['max_abs_logit_diff']:.2e}, "
            f"mean KL {result['mean_kl']:.2e}, greedy agreement {100 * result['greedy_agreement']:.1f}% "
            f"-> {'ok' if result['passed'] else 'FAILED'}"
        )
    return results


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_merged(merged_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(_device()).eval()


def _load_reference(base_dir: Path, adapter_dir: Path, quantized: QuantizedBase | None) -> Any:
    """base + adapter through PEFT, the base in float32 or quantized the way training quantized it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantized is None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(_device())
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantized.quant_type,
            bnb_4bit_use_double_quant=quantized.double_quant,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=list(quantized.skip_modules)
            if quantized.skip_modules is not None
            else None,
        )
        # Loaded in the training dtype, on the device the merge quantized on, so that the 4-bit codes are
        # the ones the merge folded into.
        base = AutoModelForCausalLM.from_pretrained(
            base_dir,
            quantization_config=config,
            dtype=getattr(torch, quantized.load_dtype),
            device_map={"": quantized.device},
        )
        # The comparison is a float32 one on every CPU, not bfloat16 on AVX512-BF16 ones (loratool/model/bnb_cpu.py).
        use_exact_4bit_matmul(base)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    _upcast(model)
    return model


def _upcast(model: Any) -> None:
    """Every non-4-bit floating-point parameter to float32 (prepare_model_for_kbit_training does the same
    for training; here it makes the comparison a float32 one)."""
    import torch

    for param in model.parameters():
        if (
            param.is_floating_point()
            and param.dtype != torch.float32
            and type(param).__name__ != "Params4bit"
        ):
            param.data = param.data.float()
