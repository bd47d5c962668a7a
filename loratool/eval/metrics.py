"""The numbers `loratool eval` reports: held-out loss as training computes it, and generation metrics.

Loss: token-weighted mean cross-entropy (nats) over every token whose label is not -100, i.e. exactly the
tokens training learns from (same template, same masking, same max_length: the rows come from
loratool.data.build_datasets). Perplexity = exp(loss).

How it relates to the trainer's `eval_loss`: the trainer takes the token mean of each evaluation batch and
averages those means over batches (weighted by rows per batch). Both are the same number when the
validation set fits in one evaluation batch (per_device_eval_batch_size); with several batches of unequal
token counts they differ slightly, and the number here is the one that does not depend on batching.

Generation metrics compare each answer with the reference answer (the last assistant turn):
- exact match: share of answers equal to the reference after stripping leading/trailing whitespace;
- ROUGE-L F1: mean over rows, Google's `rouge_score` (lower-cased, ASCII word tokens, no stemming);
- BLEU and chrF: corpus-level, `sacrebleu` defaults (BLEU 13a tokenizer; chrF character 6-grams, beta 2);
- mean generated length, in tokens (the stop token not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

IGNORE = -100


@dataclass(frozen=True)
class LossResult:
    loss: float  # nats per loss token
    loss_tokens: int
    rows: int
    row_losses: list[float]  # per row: mean over its loss tokens (same order as the rows)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def heldout_loss(
    model: Any,
    rows: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    max_batch_tokens: int = 2048,
    progress: Any = None,
) -> LossResult:
    """Cross-entropy of every loss token of `rows` ((input_ids, labels) pairs), summed in float64.

    Rows go through the model in batches, padded on the right with an attention mask (a padded position
    is never attended to by a real one, and carries no label), with the KV cache off so that no state is
    carried between rows. Batches hold rows of similar length, at most `max_batch_tokens` tokens including
    padding, which bounds the logits tensor (tokens x vocabulary)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    done = 0
    for batch in _batches(rows, max_batch_tokens):
        if progress is not None:  # a callable(rows done), e.g. metrics.Heartbeat(...).tick
            progress(done)
        done += len(batch)
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, i in enumerate(batch):
            row_ids, row_labels = rows[i]
            ids[j, : len(row_ids)] = torch.tensor(row_ids)
            labels[j, : len(row_labels)] = torch.tensor(row_labels)
            mask[j, : len(row_ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        # labels[t] is the target of position t, predicted from position t - 1 (the model does not shift).
        targets = labels[:, 1:].to(device)
        token_loss = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
        ).view(targets.shape)
        per_row = token_loss.double().sum(dim=1).cpu().tolist()
        per_count = (targets != IGNORE).sum(dim=1).cpu().tolist()
        for j, i in enumerate(batch):
            sums[i], counts[i] = per_row[j], per_count[j]
    total = sum(counts)
    return LossResult(
        loss=sum(sums) / total if total else math.nan,
        loss_tokens=total,
        rows=len(rows),
        row_losses=[s / c if c else math.nan for s, c in zip(sums, counts, strict=True)],
    )


def _batches(rows: list[tuple[list[int], list[int]]], max_tokens: int) -> list[list[int]]:
    """Row indices grouped by similar length, each group's padded size within max_tokens (at least one row)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(rows[i][0]) * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def generation_metrics(answers: list[str], references: list[str], lengths: list[int]) -> dict[str, float]:
    """Exact match, ROUGE-L F1, BLEU, chrF and mean generated length (see module docstring)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not answers:
        return {}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references, strict=True)]
    return {
        "exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True))
        / len(answers),
        "rouge_l_f1": sum(rouge) / len(rouge),
        "bleu": sacrebleu.corpus_bleu(answers, [references]).score,
        "chrf": sacrebleu.corpus_chrf(answers, [references]).score,
        "mean_generated_tokens": sum(lengths) / len(lengths),
    }
