"""`loratool eval REWARD_RUN`: how well a reward model ranks held-out preference pairs.

A reward model writes no answers: it scores them. On each held-out pair (the run's validation split,
rebuilt exactly as training built it, or `--data`), it scores prompt + chosen and prompt + rejected as
training did (data/preference.py, train/reward.py); the pair is ranked right when the chosen answer
scores higher. Reported for the trained adapter and, side by side, for the starting point ("base": the
adapter switched off and the score head as it was before training, re-created from training.seed as the
run created it), with the pairwise accuracy and the mean reward margin (chosen minus rejected) of each.
`eval/` gets metrics.json, scores.jsonl (every pair's scores) and report.md, in one rename.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool import __version__
from loratool.data.preference import build_preference_datasets
from loratool.errors import LoratoolError
from loratool.model import hardware
from loratool.model.load import load_model
from loratool.recipe import DataSection
from loratool.rundir.outputs import claim_output, library_versions

if TYPE_CHECKING:
    from loratool.generate.target import Target
    from loratool.recipe import Recipe

METRICS = "metrics.json"
SCORES = "scores.jsonl"
REPORT = "report.md"


def run_reward_eval(
    target: Target,
    out: Path,
    *,
    data: Path | None = None,
    max_samples: int | None = None,
    max_length: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Score the held-out pairs with the trained reward model and with its starting point; write `out`."""
    started = time.time()
    recipe, run_dir = target.recipe, target.run_dir
    assert recipe is not None and run_dir is not None
    with claim_output(out, kind="eval", record_name=METRICS, overwrite=True, log=log) as claimed:
        model, tokenizer, device = load_reward_model(recipe, run_dir, log)
        pairs, details = held_out_pairs(
            recipe, tokenizer, data, max_samples=max_samples, max_length=max_length
        )
        log(f"scoring {len(pairs):,} pairs of {details['description']}")
        batch = recipe.training.per_device_eval_batch_size
        scores = {"tuned": score_pairs(model, pairs, tokenizer.pad_token_id, device, batch)}
        with model.disable_adapter():  # the base, and the score head as it was before training
            scores["base"] = score_pairs(model, pairs, tokenizer.pad_token_id, device, batch)
        models = {name: pair_metrics(values) for name, values in scores.items()}
        record = {
            "loratool_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": {"path": str(target.path), "kind": "reward model", "adapter": str(run_dir)},
            "data": details,
            "settings": {"device": device, "batch_size": batch},
            "models": models,
            "difference": {
                key: models["tuned"][key] - models["base"][key]
                for key in ("pairwise_accuracy", "mean_margin")
            },
            "wall_time_s": round(time.time() - started, 2),
            "versions": library_versions("torch", "transformers", "peft"),
        }
        _write(claimed, record, scores, log)
    for line in summary_lines(models):
        log(line)
    log(f"report written to {out}")
    return out


def load_reward_model(recipe: Recipe, run_dir: Path, log: Callable[[str], None]) -> tuple[Any, Any, str]:
    """The run's base with its score head and adapter, its tokenizer, and the device. The seed is set as
    training set it before loading, so that the head PEFT keeps beside the trained one (used with the
    adapter off) is the untrained head the run started from."""
    from peft import PeftModel
    from transformers import AutoTokenizer, set_seed

    hw = hardware.detect()
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log(f"loading {recipe.base_model} with a score head on {hw.device} + the adapter in {run_dir}")
    set_seed(recipe.training.seed)
    base = load_model(recipe, hw, log)
    base.config.pad_token_id = tokenizer.pad_token_id  # the head scores the last token that is not padding
    if not recipe.is_quantized():
        base = base.to(hw.device)
    model = PeftModel.from_pretrained(base, run_dir).eval()
    return model, tokenizer, hw.device


def held_out_pairs(
    recipe: Recipe,
    tokenizer: Any,
    data: Path | None,
    *,
    max_samples: int | None,
    max_length: int | None,
) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:
    """(prompt + chosen, prompt + rejected) token ids of the held-out pairs, and where they came from."""
    section = recipe.data
    if data is not None:
        # Read as validation sources, which keep file order; the train entry only satisfies the schema.
        file = [{"path": str(data)}]
        section = DataSection.model_validate({**section.model_dump(), "train": file, "validation": file})
    elif section.validation is None:
        raise LoratoolError(
            "the reward run's recipe has no data.validation: there are no held-out pairs to score",
            hint="pass --data FILE with held-out preference pairs (rows the run did not train on)",
        )
    if max_length is not None:
        section = section.model_copy(update={"max_length": max_length})
    try:
        built = build_preference_datasets(section, tokenizer, seed=recipe.training.seed)
    except LoratoolError as exc:
        where = f"--data {data}" if data is not None else "the run's validation data"
        raise LoratoolError(f"cannot build {where}: {exc.message}", hint=exc.hint) from None
    split = built.validation
    assert split is not None
    pairs = [
        (p + c, p + r)
        for p, c, r in zip(split["prompt_ids"], split["chosen_ids"], split["rejected_ids"], strict=True)
    ][:max_samples]
    origin = built.summary.validation.origin if built.summary.validation else None
    if data is not None:
        details = {"source": "file", "path": str(data), "description": f"{data} (in file order)"}
    else:
        origin = origin or "data.validation sources"
        details = {
            "source": "validation",
            "origin": origin,
            "description": f"the run's validation split ({origin})",
        }
    return pairs, {**details, "pairs": len(pairs), "max_length": section.max_length}


def score_pairs(
    model: Any, pairs: list[tuple[list[int], list[int]]], pad_id: int, device: str, batch: int
) -> list[tuple[float, float]]:
    """(chosen score, rejected score) of each pair, batched as the reward trainer batches them: right
    padding with an attention mask."""
    import torch

    sequences = [s for pair in pairs for s in pair]
    values: list[float] = []
    for start in range(0, len(sequences), batch):
        chunk = sequences[start : start + batch]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        values += logits[:, 0].float().cpu().tolist()
    return list(zip(values[0::2], values[1::2], strict=True))


def pair_metrics(scores: list[tuple[float, float]]) -> dict[str, float | int]:
    """Pairwise accuracy (chosen scored above rejected; a tie counts as wrong, as in trl), mean margin and
    the mean score of each answer."""
    count = len(scores)
    margins = [c - r for c, r in scores]
    return {
        "pairs": count,
        "pairwise_accuracy": sum(m > 0 for m in margins) / count if count else 0.0,
        "mean_margin": sum(margins) / count if count else 0.0,
        "mean_chosen_reward": sum(c for c, _ in scores) / count if count else 0.0,
        "mean_rejected_reward": sum(r for _, r in scores) / count if count else 0.0,
    }


def summary_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """One line per model, the trained one first."""
    return [
        f"{name}: pairwise accuracy {m['pairwise_accuracy']:.1%} · mean margin {m['mean_margin']:+.4f} "
        f"(chosen {m['mean_chosen_reward']:+.4f}, rejected {m['mean_rejected_reward']:+.4f}) on {m['pairs']:,} pairs"
        for name, m in models.items()
    ]


def report_markdown(record: dict[str, Any]) -> str:
    """report.md: the two models side by side."""
    rows = [
        f"| {name} | {m['pairwise_accuracy']:.1%} | {m['mean_margin']:+.4f} | {m['mean_chosen_reward']:+.4f} | "
        f"{m['mean_rejected_reward']:+.4f} |"
        for name, m in record["models"].items()
    ]
    return "\n".join(
        [
            f"# Reward model evaluation: {Path(record['target']['adapter']).name}",
            "",
            f"{record['data']['pairs']:,} pairs of {record['data']['description']}. A pair is ranked right "
            "when the chosen answer scores higher. `base`: the adapter off and the untrained score head.",
            "",
            "| model | pairwise accuracy | mean margin | mean chosen | mean rejected |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def _write(
    claimed: Any, record: dict[str, Any], scores: dict[str, list[tuple[float, float]]], log: Any
) -> None:
    """The three files into a partial directory, renamed into place (as eval/run.py does)."""
    partial = claimed.partial()
    try:
        lines = [
            json.dumps({"index": i, **{f"{name}_{answer}": s[i][k] for name, s in scores.items()
                                       for k, answer in enumerate(("chosen", "rejected"))}})
            for i in range(len(scores["tuned"]))
        ]  # fmt: skip
        (partial / SCORES).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        (partial / REPORT).write_text(report_markdown(record), encoding="utf-8")
        claimed.place(partial, record, log)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
