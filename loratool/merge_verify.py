"""Check a merged model against base + adapter on a few real inputs, in float32.

Probes: up to 8 held-out rows of the run's own data (rebuilt from recipe.yaml), or training rows when the
run had no validation split, or — for an adapter without a recipe, or data that is gone — a few built-in
conversations rendered with the adapter's chat template. Each probe is cut to 128 tokens.

For each probe both models give logits at every position; reported are the largest |logit difference|,
the mean KL(base+adapter || merged) per position and the share of positions where both pick the same
next token (greedy agreement). Which reference, and how close it must be:

- EXACT: the merge is the same float32 arithmetic as base + adapter (plain LoRA; QLoRA with the
  `dequantized` policy against the 4-bit base; `original` against the full-precision base), stored in
  float32 (the 4-bit base too, on every CPU: loratool/bnb_cpu.py). Only summation order differs, so
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    import torch

    from loratool.merge_qlora import QuantizedBase
    from loratool.recipe import Recipe

MAX_PROBES = 8
MAX_PROBE_TOKENS = 128


@dataclass(frozen=True)
class Thresholds:
    max_abs_logit_diff: float | None  # None: reported only
    max_mean_kl: float
    min_greedy_agreement: float | None  # None: reported only


EXACT = Thresholds(max_abs_logit_diff=1e-3, max_mean_kl=1e-6, min_greedy_agreement=1.0)
ROUNDED = Thresholds(max_abs_logit_diff=None, max_mean_kl=1e-3, min_greedy_agreement=0.95)
QUANTIZATION_DRIFT = Thresholds(max_abs_logit_diff=None, max_mean_kl=0.1, min_greedy_agreement=None)

_BUILTIN_CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")],
    [("user", "Write one sentence about the sea."), ("assistant", "The sea is wide, cold and restless.")],
    [("user", "List three prime numbers."), ("assistant", "2, 3 and 5 are prime numbers.")],
    [("user", "Translate 'good morning' into French."), ("assistant", "Bonjour.")],
    [("user", "Explain LoRA in one sentence."), ("assistant", "LoRA trains two small matrices per layer.")],
]


@dataclass(frozen=True)
class Reference:
    """One model to compare the merged model with."""

    key: str  # name in merge.json: full_precision_base or quantized_base
    description: str
    thresholds: Thresholds
    quantized: QuantizedBase | None  # load the base in 4 bits like this; None = full precision


def build_probes(
    tokenizer: Any, recipe: Recipe | None, log: Callable[[str], None]
) -> tuple[list[list[int]], str]:
    """Token ids of the probe rows, and where they came from (in words, for merge.json)."""
    if recipe is not None:
        from loratool.data import build_datasets
        from loratool.data.preference import build_preference_datasets, chosen_sequences

        build = build_preference_datasets if recipe.dpo is not None else build_datasets
        try:
            data = build(recipe.data, tokenizer, seed=recipe.training.seed)
        except LoratoolError as exc:
            log(f"note: cannot rebuild the run's data ({exc.message}); verifying on built-in prompts")
        else:
            held_out = data.validation is not None and len(data.validation) > 0
            split = data.validation if held_out else data.train
            rows = (chosen_sequences(split) if recipe.dpo is not None else split["input_ids"])[:MAX_PROBES]
            source = "held-out validation rows" if held_out else "training rows (the run had no validation)"
            return [row[:MAX_PROBE_TOKENS] for row in rows], f"{len(rows)} {source} of the run's data"
    probes = []
    for turns in _BUILTIN_CONVERSATIONS:
        messages = [{"role": role, "content": text} for role, text in turns]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
        probes.append(ids[:MAX_PROBE_TOKENS])
    how = "chat template" if tokenizer.chat_template else "no chat template"
    return probes, f"{len(probes)} built-in conversations ({how})"


def verify(
    merged_dir: Path,
    base_dir: Path,
    adapter_dir: Path,
    references: list[Reference],
    probes: list[list[int]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Compare the merged model with each reference; one result per reference, keyed like merge.json."""
    from loratool.bnb_cpu import four_bit_matmul

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


def compare(
    reference: list[torch.Tensor], merged: list[torch.Tensor], thresholds: Thresholds
) -> dict[str, Any]:
    """max |Δlogit|, mean KL(reference || merged) per position, greedy agreement; and whether they pass."""
    import torch
    import torch.nn.functional as F

    max_diff, kl_sum, agree, positions, finite = 0.0, 0.0, 0, 0, True
    for ref, got in zip(reference, merged, strict=True):
        finite = finite and bool(torch.isfinite(got).all())
        max_diff = max(max_diff, (ref - got).abs().max().item())
        ref_log, got_log = F.log_softmax(ref, dim=-1), F.log_softmax(got, dim=-1)
        kl_sum += F.kl_div(got_log, ref_log, log_target=True, reduction="sum").item()
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += ref.shape[0]
    if not finite:  # NaN compares false with everything: make a broken merge fail every threshold
        max_diff, kl_sum = float("inf"), float("inf")
    mean_kl = max(kl_sum / positions, 0.0)  # float noise can make a zero KL slightly negative
    agreement = agree / positions
    passed = (
        (thresholds.max_abs_logit_diff is None or max_diff <= thresholds.max_abs_logit_diff)
        and mean_kl <= thresholds.max_mean_kl
        and (thresholds.min_greedy_agreement is None or agreement >= thresholds.min_greedy_agreement)
    )
    return {
        "max_abs_logit_diff": max_diff,
        "mean_kl": mean_kl,
        "greedy_agreement": agreement,
        "positions": positions,
        "thresholds": asdict(thresholds),
        "passed": passed,
    }


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

    from loratool.bnb_cpu import use_exact_4bit_matmul

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
        # The comparison is a float32 one on every CPU, not bfloat16 on AVX512-BF16 ones (loratool/bnb_cpu.py).
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


def probe_logits(
    model: Any, probes: list[list[int]], what: str = "", log: Callable[[str], None] | None = None
) -> list[torch.Tensor]:
    """The logits of each probe row. With `what`, a progress line (rate, ETA) at least every 15 s: a big
    model on a busy CPU can take minutes here."""
    import torch

    from loratool.metrics import Heartbeat

    heartbeat = Heartbeat(what, len(probes), write=log) if what else None
    device = next(model.parameters()).device
    logits = []
    with torch.inference_mode():
        for done, ids in enumerate(probes, start=1):
            logits.append(model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu())
            if heartbeat is not None:
                heartbeat.tick(done, "rows")
    return logits
