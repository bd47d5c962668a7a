"""Probe rows and logit comparison: how loratool checks that one model computes what another does.

`loratool merge` compares the merged model with base + adapter (merge/verify.py); `loratool export`
compares a GGUF file, loaded back, with the checkpoint it was written from (export/verify.py). Both run the
same probe rows through both models and compare the logits at every position: the largest |logit
difference|, the mean KL(reference || other) per position and the share of positions where both pick the
same next token (greedy agreement), each against a threshold the caller chooses.

It lives in merge, the first command that needs it: export's verify.py imports it from here (export comes
after merge in the flow), so neither command carries a copy.

Probes: up to 8 held-out rows of the run's own data (rebuilt from recipe.yaml), or training rows when the
run had no validation split, or — for an adapter without a recipe, or data that is gone — a few built-in
conversations rendered with the chat template. Each probe is cut to 128 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from loratool.data import build_datasets
from loratool.data.preference import build_preference_datasets, chosen_sequences
from loratool.data.unpaired import build_unpaired_datasets
from loratool.errors import LoratoolError
from loratool.progress import Heartbeat

if TYPE_CHECKING:
    import torch

    from loratool.recipe import Recipe

MAX_PROBES = 8
MAX_PROBE_TOKENS = 128


@dataclass(frozen=True)
class Thresholds:
    max_abs_logit_diff: float | None  # None: reported only
    max_mean_kl: float
    min_greedy_agreement: float | None  # None: reported only


_BUILTIN_CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris.")],
    [("user", "Write one sentence about the sea."), ("assistant", "The sea is wide, cold and restless.")],
    [("user", "List three prime numbers."), ("assistant", "2, 3 and 5 are prime numbers.")],
    [("user", "Translate 'good morning' into French."), ("assistant", "Bonjour.")],
    [("user", "Explain LoRA in one sentence."), ("assistant", "LoRA trains two small matrices per layer.")],
]


def _sequences(split: Any) -> list[list[int]]:
    """The token ids the model reads for each row: the row, a pair's prompt + chosen answer, or a KTO
    row's prompt + completion."""
    if "chosen_ids" in split.column_names:
        return chosen_sequences(split)
    if "completion_ids" in split.column_names:
        return [p + c for p, c in zip(split["prompt_ids"], split["completion_ids"], strict=True)]
    return split["input_ids"]


def build_probes(
    tokenizer: Any, recipe: Recipe | None, log: Callable[[str], None]
) -> tuple[list[list[int]], str]:
    """Token ids of the probe rows, and where they came from (in words, for merge.json)."""
    if recipe is not None and recipe.stage in ("grpo", "rloo"):
        # An online-RL run's rows are prompts without answers: the built-in conversations are the probes.
        recipe = None
    if recipe is not None:
        builders = {"dpo": build_preference_datasets, "reward": build_preference_datasets}
        build = {**builders, "kto": build_unpaired_datasets}.get(recipe.stage, build_datasets)
        try:
            data = build(recipe.data, tokenizer, seed=recipe.training.seed)
        except LoratoolError as exc:
            log(f"note: cannot rebuild the run's data ({exc.message}); verifying on built-in prompts")
        else:
            held_out = data.validation is not None and len(data.validation) > 0
            split = data.validation if held_out else data.train
            rows = _sequences(split)[:MAX_PROBES]
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


def probe_logits(
    model: Any, probes: list[list[int]], what: str = "", log: Callable[[str], None] | None = None
) -> list[torch.Tensor]:
    """The logits of each probe row. With `what`, a progress line (rate, ETA) at least every 15 s: a big
    model on a busy CPU can take minutes here."""
    import torch

    heartbeat = Heartbeat(what, len(probes), write=log) if what else None
    device = next(model.parameters()).device
    logits = []
    with torch.inference_mode():
        for done, ids in enumerate(probes, start=1):
            logits.append(model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu())
            if heartbeat is not None:
                heartbeat.tick(done, "rows")
    return logits
