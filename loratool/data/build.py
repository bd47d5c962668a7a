"""The data section -> tokenized, masked train / validation datasets, and a summary of what happened.

For each source: read rows -> format them into examples -> render + tokenize + mask -> apply max_length.
Every row read ends up used, held out for validation, or dropped with a reason, and is counted.
`datasets` is imported inside build_datasets, so importing this module stays light.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratool.data.formats import Conversation, Example, RowError, check_columns, resolve_format, to_example
from loratool.data.sources import open_source
from loratool.data.summary import DROP_REASONS, DataSummary, SourceSummary, SplitSummary
from loratool.data.templates import (
    apply_chat_template_choice,
    describe_choice,
    renders_tools,
    template_warnings,
)
from loratool.data.tokenize import IGNORE, encode_many
from loratool.errors import LoratoolError

if TYPE_CHECKING:
    import datasets

    from loratool.recipe import DataSection, DataSource

__all__ = ["DataSummary", "PreparedData", "build_datasets"]


@dataclass
class PreparedData:
    train: datasets.Dataset  # columns: input_ids (list[int]), labels (list[int], -100 = no loss)
    validation: datasets.Dataset | None  # same columns
    summary: DataSummary


@dataclass
class _Item:
    """One encoded row, remembered with the source it came from (for per-source counts)."""

    input_ids: list[int]
    labels: list[int]
    source: SourceSummary

    @property
    def loss_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


def build_datasets(data: DataSection, tokenizer: Any, *, seed: int) -> PreparedData:
    """Read, format, template, tokenize and mask every source of `data`; split off validation rows."""
    from datasets import Dataset

    template = _Template(tokenizer, data.chat_template)
    train_sources, train_items = build_split(
        data.train, lambda source: _build_source(source, data, tokenizer, template)
    )
    _require_rows("data.train", train_sources, train_items, data)
    random.Random(seed).shuffle(train_items)  # sources are mixed; the trainer reshuffles every epoch

    validation_sources: list[SourceSummary] = []
    validation_items: list[_Item] | None = None
    origin = None
    if isinstance(data.validation, float):
        train_items, validation_items = _split_off(train_items, data.validation)
        origin = f"{data.validation:.0%} of train, seed {seed}"
    elif data.validation:
        validation_sources, validation_items = build_split(
            data.validation, lambda source: _build_source(source, data, tokenizer, template)
        )
        _require_rows("data.validation", validation_sources, validation_items, data)

    summary = DataSummary(
        train=_split_summary("train", train_sources, train_items),
        validation=None
        if validation_items is None
        else _split_summary("validation", validation_sources, validation_items, origin),
        chat_template=describe_choice(data.chat_template) if template.used else None,
        chat_template_sha256=_sha256(tokenizer.chat_template) if template.used else None,
        max_length=data.max_length,
        truncation=data.truncation,
        completion_only_loss=data.completion_only_loss,
        seed=seed,
        warnings=template.warnings(),
    )

    def dataset(items: list[_Item]) -> Dataset:
        return Dataset.from_dict(
            {"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items]}
        )

    return PreparedData(
        train=dataset(train_items),
        validation=dataset(validation_items) if validation_items is not None else None,
        summary=summary,
    )


class _Template:
    """Sets the chat template once, when it is first needed (or at once, when the recipe names one)."""

    def __init__(self, tokenizer: Any, choice: str | None):
        self.tokenizer, self.choice, self.used = tokenizer, choice, False
        self.rows_with_tools = 0
        if choice is not None:
            self.ensure()

    def ensure(self) -> None:
        if not self.used:
            apply_chat_template_choice(self.tokenizer, self.choice)
            self.used = True

    def warnings(self) -> list[str]:
        if not self.used:
            return []
        warnings = template_warnings(self.tokenizer, self.choice)
        if self.rows_with_tools and not renders_tools(self.tokenizer):
            warnings.append(
                f"{self.rows_with_tools:,} rows define tools, but the chat template does not write tool "
                "definitions into the text: the model learns calls to functions it is never shown; set "
                "data.chat_template: chatml (or llama3, alpaca), which list them"
            )
        return warnings


def build_split(
    sources: list[DataSource], build_source: Callable[[DataSource], tuple[SourceSummary, list[Any]]]
) -> tuple[list[SourceSummary], list[Any]]:
    """Each source built by `build_source` (rows -> items), and all of their items in order."""
    summaries, items = [], []
    for source in sources:
        summary, source_items = build_source(source)
        summaries.append(summary)
        items += source_items
    return summaries, items


@dataclass
class SourceRows:
    """A source's rows parsed (examples, or preference pairs) with where each came from. Malformed and
    empty rows are already handled as data.on_bad_row says; `bad` does the same for rows found malformed
    later, when they are tokenized."""

    summary: SourceSummary
    parsed: list[Any]
    locations: list[str]
    bad: Callable[[str, str], None]
    rows: list[dict[str, Any]]  # each parsed row as read (the data view compares rows for duplicates)


def read_source(
    source: DataSource,
    data: DataSection,
    resolve: Callable[[DataSource, Any, str], str],
    check: Callable[[DataSource, str], None],
    parse: Callable[[Any, str, DataSource], Any],
    what: str = "format",
) -> SourceRows:
    """Open a source, decide its format from its first good row (`resolve`, `check`) and parse every row."""
    rows_iter, fingerprint = open_source(source)
    rows = list(rows_iter)
    first = next((row for row in rows if row.error is None), None)
    fmt = resolve(source, first.data if first else None, first.location if first else "")
    check(source, fmt)
    summary = SourceSummary(path=source.path, format=fmt, fingerprint=fingerprint, read=len(rows))

    def bad(location: str, reason: str) -> None:
        if data.on_bad_row == "fail":
            raise LoratoolError(
                f"{location}: {reason}",
                hint="fix the row, or set data.on_bad_row: skip to leave malformed rows out "
                "(they are counted in the data summary)",
            )
        summary.drop("malformed", location, reason)

    parsed, locations, read_rows = [], [], []
    for row in rows:
        if row.error is not None:
            bad(row.location, row.error)
            continue
        try:
            parsed.append(parse(row.data, fmt, source))
            locations.append(row.location)
            read_rows.append(row.data)
        except RowError as exc:
            if exc.kind == "empty":
                summary.drop("empty", row.location, exc.reason)
            else:
                bad(row.location, f"{exc.reason} ({what} {fmt})")
    return SourceRows(summary, parsed, locations, bad, read_rows)


def encode_source(
    source: DataSource, examples: list[Example], tokenizer: Any, *, completion_only_loss: bool
) -> list[Any]:
    """encode_many, with the source named in its errors."""
    try:
        return encode_many(examples, tokenizer, completion_only_loss=completion_only_loss)
    except LoratoolError as exc:
        raise LoratoolError(f"data source {source.path}: {exc.message}", exc.hint) from None


def _build_source(
    source: DataSource, data: DataSection, tokenizer: Any, template: _Template
) -> tuple[SourceSummary, list[_Item]]:
    read = read_source(source, data, resolve_format, check_columns, to_example)
    summary, examples, locations, bad = read.summary, read.parsed, read.locations, read.bad
    if any(isinstance(example, Conversation) for example in examples):
        template.ensure()
        template.rows_with_tools += sum(bool(getattr(example, "tools", None)) for example in examples)
    encoded = encode_source(source, examples, tokenizer, completion_only_loss=data.completion_only_loss)

    items = []
    for location, result in zip(locations, encoded, strict=True):
        if isinstance(result, RowError):
            bad(location, result.reason)
            continue
        input_ids, labels = result
        length = len(input_ids)
        truncated = length > data.max_length
        if truncated:
            if data.truncation == "drop":
                summary.drop("too_long", location, f"{length} tokens, over data.max_length={data.max_length}")
                continue
            input_ids, labels = input_ids[: data.max_length], labels[: data.max_length]
        if labels.count(IGNORE) == len(labels):
            why = (
                f"no token to learn from in the first {data.max_length} of its {length} tokens"
                if truncated
                else "no token to learn from (no assistant turn, or only empty ones)"
            )
            summary.drop("no_loss", location, why)
            continue
        summary.truncated += truncated
        items.append(_Item(input_ids, labels, summary))
    return summary, items


def _split_off(items: list[_Item], fraction: float) -> tuple[list[_Item], list[_Item]]:
    """Hold out `fraction` of the (already seed-shuffled) rows, at least one, leaving at least one."""
    count = max(1, round(len(items) * fraction))
    if len(items) - count < 1:
        raise LoratoolError(
            f"data.validation: {fraction} of {len(items)} usable training row(s) leaves none to train on",
            hint="add training rows, or give data.validation its own sources",
        )
    held_out = items[:count]
    for item in held_out:
        item.source.held_out += 1
    return items[count:], held_out


def _split_summary(
    name: str, sources: list[SourceSummary], items: list[_Item], origin: str | None = None
) -> SplitSummary:
    """Token counts of the rows that made it into the split; a source's `used` counts only its rows here."""
    if sources:
        for source in sources:
            source.used, source.tokens, source.loss_tokens = 0, 0, 0
        for item in items:
            item.source.used += 1
            item.source.tokens += len(item.input_ids)
            item.source.loss_tokens += item.loss_tokens
    return SplitSummary(
        name=name,
        sources=sources,
        rows=len(items),
        tokens=sum(len(i.input_ids) for i in items),
        loss_tokens=sum(i.loss_tokens for i in items),
        longest=max((len(i.input_ids) for i in items), default=0),
        origin=origin,
    )


def _sha256(template: str | dict[str, str]) -> str:
    # A few tokenizers hold several named templates ({"default": ..., "tool_use": ...}).
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _require_rows(key: str, sources: list[SourceSummary], items: list[_Item], data: DataSection) -> None:
    """An empty split is an error that says where every row went."""
    if items:
        return
    read = sum(s.read for s in sources)
    if read == 0:
        raise LoratoolError(
            f"{key}: the sources hold no rows ({', '.join(s.path for s in sources)})",
            hint="check the paths, and max_rows",
        )
    dropped = {r: sum(s.dropped[r] for s in sources) for r in DROP_REASONS}
    main = max(dropped, key=lambda r: dropped[r])
    reasons = [f"{n} {DROP_REASONS[r]}" for r, n in dropped.items() if n]
    counts = f" (dropped: {', '.join(reasons)})" if len(reasons) > 1 else ""
    share = f"all {read}" if dropped[main] == read else f"{dropped[main]} of the {read}"
    why = {
        "too_long": f"{share} rows were longer than data.max_length={data.max_length} tokens",
        "no_loss": f"{share} rows had no token left to learn from",
        "malformed": f"{share} rows were malformed",
        "empty": f"{share} rows were empty",
    }[main]
    hint = {
        "too_long": "raise data.max_length or set data.truncation: truncate",
        "no_loss": "conversations need an assistant turn, and it must start before data.max_length="
        f"{data.max_length} tokens; or set data.completion_only_loss: false",
        "malformed": "fix the rows (the first one is named above), and check that format: matches the file",
        "empty": "check that columns: maps the output field to the right column",
    }[main]
    first = next((f"; first: {row['location']}: {row['reason']}" for s in sources for row in s.bad_rows), "")
    raise LoratoolError(f"{key}: no usable rows: {why}{counts}{first}", hint=hint)
