"""What the data pipeline did, per split and per source: printed before training, stored in run.json.

For every source, `read == used + held_out + sum(dropped.values())`: each row read is accounted for.
A row is a supervised example, or a preference pair (a prompt with a chosen and a rejected answer); the
summary says which numbers count what for each (`SplitSummary.kind`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Why a row was left out, in the order the summary lists them.
DROP_REASONS = {
    "malformed": "malformed",  # bad JSON, missing field, wrong type... (data.on_bad_row: skip)
    "too_long": "too long",  # longer than data.max_length with truncation: drop
    "no_loss": "no loss tokens",  # nothing left to learn: no assistant turn, or all of it past max_length
    "prompt_too_long": "prompt too long",  # a pair's prompt alone fills max_length (prompt_truncation)
    "empty": "empty",  # an empty output / completion / text
}
SHOWN_BAD_ROWS = 5


@dataclass
class SourceSummary:
    """One data source within one split."""

    path: str
    format: str
    fingerprint: dict[str, Any]
    read: int = 0
    used: int = 0  # rows of this split
    held_out: int = 0  # rows split off into validation (data.validation: fraction)
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    tokens: int = 0
    loss_tokens: int = 0
    bad_rows: list[dict[str, str]] = field(default_factory=list)  # first few {location, reason}
    # Preference pairs used that teach nothing (rejected empty, or the same as chosen); None: not pairs.
    without_signal: int | None = None
    prompts_cut: int = 0  # pairs whose prompt lost its start (data.prompt_truncation: keep_end)

    def drop(self, reason: str, location: str | None = None, why: str | None = None) -> None:
        self.dropped[reason] += 1
        if location is not None and len(self.bad_rows) < SHOWN_BAD_ROWS:
            self.bad_rows.append({"location": location, "reason": why or DROP_REASONS[reason]})

    def to_dict(self) -> dict[str, Any]:
        pairs = (
            {}
            if self.without_signal is None
            else {"pairs_without_signal": self.without_signal, "pairs_with_prompt_cut": self.prompts_cut}
        )
        return {
            "path": self.path,
            "format": self.format,
            "fingerprint": self.fingerprint,
            "rows_read": self.read,
            "rows_used": self.used,
            "rows_held_out_for_validation": self.held_out,
            "rows_truncated": self.truncated,
            "rows_dropped": dict(self.dropped),
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "loss_fraction": _fraction(self.loss_tokens, self.tokens),
            "bad_rows": list(self.bad_rows),
            **pairs,
        }


@dataclass
class SplitSummary:
    """The rows of one split. `origin` says where a split-off validation set came from."""

    name: str
    sources: list[SourceSummary]
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    longest: int = 0
    origin: str | None = None
    kind: str = "rows"  # "rows" (supervised: tokens and longest are per row) or "pairs" (see _COUNTS)

    @property
    def loss_fraction(self) -> float:
        return _fraction(self.loss_tokens, self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "loss_fraction": self.loss_fraction,
            "longest": self.longest,
            "origin": self.origin,
            "sources": [s.to_dict() for s in self.sources],
        }


@dataclass
class DataSummary:
    """Everything the data pipeline did: `.format()` for people, `.to_dict()` for run.json."""

    train: SplitSummary
    validation: SplitSummary | None
    chat_template: str | None  # how the template is named; None when no row needed one
    chat_template_sha256: str | None
    max_length: int
    truncation: str
    completion_only_loss: bool
    seed: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, for run.json."""
        return {
            "train": self.train.to_dict(),
            "validation": self.validation.to_dict() if self.validation else None,
            "chat_template": self.chat_template,
            "chat_template_sha256": self.chat_template_sha256,
            "max_length": self.max_length,
            "truncation": self.truncation,
            "completion_only_loss": self.completion_only_loss,
            "seed": self.seed,
            "warnings": list(self.warnings),
        }

    def format(self) -> str:
        """A compact table, printed before training."""
        train, val = self.train, self.validation
        count = f"{len(train.sources)} source{'s' if len(train.sources) != 1 else ''}"
        head = f"data: train {train.rows:,} rows ({count})"
        if val is not None:
            head += f" · validation {val.rows:,} rows" + (f" ({val.origin})" if val.origin else "")
        if self.chat_template:
            head += f" · chat template: {self.chat_template}"
        lines = [head]
        splits = [train] if val is None or val.origin else [train, val]
        rows = [_source_cells(source) for split in splits for source in split.sources]
        table = iter(_table(rows))
        for split in splits:
            if len(splits) > 1:
                lines.append(f"  {split.name}:")
            lines.extend("  " + next(table) for _ in split.sources)
        limits = f" (max_length {self.max_length:,}, {self.truncation})"
        lines.append(f"  {_tokens_line(train)}{limits}")
        if val is not None:
            lines.append(f"  {_tokens_line(val)}")
        shown_sources = [source for split in splits for source in split.sources]
        left_out = [row for source in shown_sources for row in source.bad_rows]
        if left_out:
            total = sum(sum(source.dropped.values()) for source in shown_sources)
            first = "first " if total > min(len(left_out), SHOWN_BAD_ROWS) else ""
            lines.append(f"  rows left out ({first}{min(len(left_out), SHOWN_BAD_ROWS)} of {total}):")
            lines.extend(f"    {row['location']}: {row['reason']}" for row in left_out[:SHOWN_BAD_ROWS])
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _source_cells(s: SourceSummary) -> list[str]:
    """One table row: name, format, counts; the last cell (drop reasons) is left unpadded."""
    reasons = ", ".join(f"{n:,} {DROP_REASONS[r]}" for r, n in s.dropped.items() if n)
    return [
        _display(s.path),
        s.format,
        f"{s.read:,} read",
        f"{s.used:,} used",
        f"{s.held_out:,} to validation" if s.held_out else "",
        f"{s.truncated:,} truncated"
        + (f" ({s.prompts_cut:,} from the prompt's start)" if s.prompts_cut else ""),
        f"{s.without_signal:,} without signal" if s.without_signal else "",
        f"{sum(s.dropped.values()):,} dropped" + (f" ({reasons})" if reasons else ""),
    ]


def _table(rows: list[list[str]]) -> list[str]:
    """Aligned lines: name and format left-aligned, counts right-aligned, the last cell as is; a column
    empty in every row (no rows held out for validation) is left out."""
    keep = [k for k in range(len(rows[0])) if any(row[k] for row in rows)] if rows else []
    widths = {k: max(len(row[k]) for row in rows) for k in keep}
    last = len(rows[0]) - 1 if rows else 0
    lines = []
    for row in rows:
        cells = [
            row[k] if k == last else row[k].ljust(widths[k]) if k < 2 else row[k].rjust(widths[k])
            for k in keep
        ]
        lines.append("   ".join(cells).rstrip())
    return lines


# What the mean and the longest of a split count, per kind of row. A pair's tokens are what the model
# reads for it (its prompt once with each answer); max_length applies to each of its two sequences.
_COUNTS = {
    "rows": "{mean} per row on average, longest {longest}",
    "pairs": "{mean} per pair on average (prompt twice + chosen + rejected) · longest sequence "
    "(prompt + one answer) {longest}",
    # online RL: the completions are generated during training, up to max_completion_length each
    "prompts": "{mean} per prompt on average, longest {longest} (plus the completions generated for each)",
}


def _tokens_line(split: SplitSummary) -> str:
    mean = split.tokens / split.rows if split.rows else 0
    counts = _COUNTS[split.kind].format(mean=f"{mean:,.0f}", longest=f"{split.longest:,}")
    if split.kind == "prompts":  # no token of a prompt carries loss: the completions learn
        return f"{split.name}: {split.tokens:,} prompt tokens · {counts}"
    return f"{split.name}: {split.tokens:,} tokens · loss on {100 * split.loss_fraction:.1f}% · {counts}"


def _display(path: str) -> str:
    """A source as the summary shows it: relative to the working directory when inside it, and shortened
    from the left when long (the file name is what tells sources apart)."""
    shown = path
    if os.path.isabs(path):
        try:
            shown = str(Path(path).relative_to(Path.cwd()))
        except ValueError:
            shown = path
    if len(shown) <= 40:
        return shown
    parts = Path(shown).parts
    return os.path.join("…", *parts[-2:]) if len(parts) > 2 else shown


def _fraction(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0
