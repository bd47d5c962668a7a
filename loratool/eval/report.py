"""What `loratool eval` shows: report.md (written into eval/) and the compact terminal summary."""

from __future__ import annotations

import math
from typing import Any

from loratool.eval.lm_harness import metric_rows

# (key in metrics.json, label, format, higher is better)
ROWS = (
    ("loss", "loss (nats/token)", "{:.4f}", False),
    ("perplexity", "perplexity", "{:.2f}", False),
    ("exact_match", "exact match", "{:.1%}", True),
    ("rouge_l_f1", "ROUGE-L F1", "{:.3f}", True),
    ("bleu", "BLEU", "{:.2f}", True),
    ("chrf", "chrF", "{:.2f}", True),
    ("mean_generated_tokens", "mean answer length (tokens)", "{:.1f}", None),
)
EXAMPLES_IN_REPORT = 5
EXAMPLES_IN_TERMINAL = 2


def _fmt(fmt: str, value: Any) -> str:
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def _columns(record: dict[str, Any]) -> list[str]:
    """The models in the order they are shown: the comparison's own order, else base then tuned."""
    return record.get("columns") or [name for name in ("base", "tuned") if name in record["models"]]


def summary_table(record: dict[str, Any]) -> list[list[str]]:
    """Header + one row per metric (and per reward scored): one column per model, and the difference
    when there are two."""
    columns = _columns(record)
    both = len(columns) == 2
    difference = record.get("difference") or {}
    table = [["metric", *columns, *(["difference"] if both else [])]]
    rows = [(label, fmt, [record["models"][c].get(key) for c in columns], difference.get(key))
            for key, label, fmt, _ in ROWS]  # fmt: skip
    for reward in record.get("rewards") or []:
        name = reward["name"]
        means = [((record["models"][c].get("rewards") or {}).get(name) or {}).get("mean") for c in columns]
        rows.append((f"reward {name} (mean)", "{:.3f}", means, (difference.get("rewards") or {}).get(name)))
    if len(record.get("rewards") or []) > 1:
        means = [
            ((record["models"][c].get("rewards") or {}).get("reward") or {}).get("mean") for c in columns
        ]
        total = (difference.get("rewards") or {}).get("reward")
        rows.append(("reward, weighted sum (mean)", "{:.3f}", means, total))
    for label, fmt, values, diff in rows:
        row = [label, *(_fmt(fmt, v) for v in values)]
        if both:
            row.append(_fmt(fmt.replace("{:", "{:+"), diff))
        table.append(row)
    return table


def terminal_summary(record: dict[str, Any], generations: list[dict[str, Any]]) -> list[str]:
    """The table with aligned columns, then a couple of prompts with the answers side by side."""
    lines = _aligned(summary_table(record))
    data = record["data"]
    lines.insert(0, f"{data['rows']} rows, {data['loss_tokens']} loss tokens")
    lines += _aligned(lm_eval_table(record))
    error = (record.get("lm_eval") or {}).get("error")
    if error:
        lines.append(f"lm-evaluation-harness failed: {error}")
    for g in generations[:EXAMPLES_IN_TERMINAL]:
        lines.append("")
        lines.append(f"prompt: {_last_lines(g['prompt'], 200)}")
        lines.append(f"  reference{_cut_mark(g, record)}: {_short(g['reference'])}")
        for name in _columns(record):
            lines.append(f"  {name}: {_short(g[name])}")
    return lines


def lm_eval_table(record: dict[str, Any]) -> list[list[str]]:
    """Header + one row per lm-eval task metric, one column per model; empty without lm-eval numbers."""

    names, rows = metric_rows(record)
    if not rows:
        return []
    return [["lm-eval task metric", *names], *rows]


def _aligned(table: list[list[str]]) -> list[str]:
    if not table:
        return []
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]


def _cut_mark(generation: dict[str, Any], record: dict[str, Any]) -> str:
    """Marks a reference that max_length cut short: no answer can match it exactly."""
    if generation.get("reference_complete", True):
        return ""
    return f" (cut at max_length={record['data'].get('max_length')} tokens)"


def report_markdown(record: dict[str, Any], generations: list[dict[str, Any]], loss_curve: str | None) -> str:
    """report.md: summary table, a handful of prompts with every answer, the loss curve, provenance."""
    target, data, settings = record["target"], record["data"], record["settings"]
    if record.get("targets"):  # several TARGETs side by side
        title = " vs ".join(f"`{t['name']}`" for t in record["targets"])
    else:
        title = f"`{target['path']}`"
    out = [f"# Evaluation of {title}", ""]
    out.append(
        f"{data['rows']} rows ({data['loss_tokens']} loss tokens) of "
        + (
            f"`{data['path']}` (in file order)"
            if data.get("path")
            else f"the run's validation split ({data.get('origin')})"
        )
        + f", max_length {data.get('max_length')}"
        + f"; answers generated with {settings['decoding']} decoding, at most {settings['max_new_tokens']} "
        "new tokens."
    )
    out += ["", "## Summary", ""]
    table = summary_table(record)
    out.append("| " + " | ".join(table[0]) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(table[0]) - 1)) + "|")
    out += ["| " + " | ".join(row) + " |" for row in table[1:]]
    out += [
        "",
        "- **loss**: token-weighted mean cross-entropy (nats) over the tokens training computes loss on "
        "(same chat template, masking and max_length); perplexity = exp(loss). The trainer's `eval_loss` "
        "averages per-batch means instead: the two are equal when the validation set fits in one "
        "evaluation batch.",
        "- **exact match**: answer equal to the reference after stripping surrounding whitespace. "
        "**ROUGE-L F1**: mean per row (`rouge_score`, lower-cased word tokens). **BLEU**, **chrF**: "
        "corpus-level (`sacrebleu` defaults).",
    ]
    if record.get("rewards"):
        given = ", ".join(f"`{r['name']}` ({r['given']}, weight {r['weight']:g})" for r in record["rewards"])
        out.append(
            f"- **rewards**: {given}, each the mean over the answers (a reward returning None for an answer "
            "leaves it out); the weighted sum is what an RL run maximizes."
        )
    trainer = record.get("trainer_final_eval_loss")
    if trainer is not None:
        out.append(f"- The trainer logged a final `eval_loss` of {trainer:.4f} for this run.")
    if data.get("truncated_references"):
        out.append(
            f"- {data['truncated_references']} reference(s) were cut by max_length={data['max_length']}: "
            "exact match cannot be reached on those rows."
        )
    harness = record.get("lm_eval")
    if harness:
        out += ["", "## lm-evaluation-harness", ""]
        limit = f", at most {harness['limit']} examples per task" if harness.get("limit") else ""
        out.append(f"Tasks: {', '.join(f'`{t}`' for t in harness.get('tasks') or [])}{limit}.")
        if harness.get("error"):
            out += ["", f"**lm-eval failed**: `{harness['error']}`"]
        table = lm_eval_table(record)
        if table:
            out += ["", "| " + " | ".join(table[0]) + " |"]
            out.append("|" + "|".join(["---"] + ["---:"] * (len(table[0]) - 1)) + "|")
            out += ["| " + " | ".join(row) + " |" for row in table[1:]]
        if harness.get("models"):
            out += ["", "<details><summary>lm-eval's results</summary>", "", "```json"]
            out += [_json(harness["models"]), "```", "", "</details>"]
    if loss_curve:
        out += ["", "## Training loss", "", f"![training and validation loss]({loss_curve})"]
    out += ["", "## Examples", ""]
    for g in generations[:EXAMPLES_IN_REPORT]:
        reference = f"Reference{_cut_mark(g, record)}:"
        out += [f"### Row {g['index']}", "", "Prompt:", "", _fence(g["prompt"]), "", reference, ""]
        out += [_fence(g["reference"])]
        for name in _columns(record):
            shown = name.capitalize() if name in ("base", "tuned") else f"`{name}`"
            out += ["", f"{shown}:", "", _fence(g[name])]
        out.append("")
    out += ["## Provenance", ""]
    for one in record.get("targets") or [target]:
        indent = "  " if "name" in one else ""  # several targets: each one's lines under its name
        if indent:
            out.append(f"- `{one['name']}`:")
        out.append(f"{indent}- target: `{one['path']}` ({one['kind']})")
        base = one.get("base_model") or {}
        if base:
            fingerprint = str(base.get("fingerprint"))[:31]
            out.append(f"{indent}- base model: `{base.get('id')}` (fingerprint `{fingerprint}…`)")
        if one.get("adapter"):
            out.append(f"{indent}- adapter: `{one['adapter']}`")
    out.append(
        f"- device {settings['device']}, dtype {settings['dtype']}"
        + (", 4/8-bit base as trained" if settings.get("quantized_base") else "")
        + f"; seed {settings['seed']}, temperature {settings['temperature']}, top_p {settings['top_p']}"
    )
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
    out.append(f"- loratool {record['loratool_version']}; {versions}; written {record['created_at']}")
    return "\n".join(out) + "\n"


def _fence(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}text\n{text}\n{fence}"


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _last_lines(text: str, limit: int) -> str:
    """The end of a rendered prompt (the question is last), on one line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str)
