"""Unpaired judgements for KTO: rows -> (prompt, completion, label) token ids, masked as for SFT.

Row layouts:
- `unpaired` (trl's unpaired preference format): `prompt`, `completion` and `label` (true: a desirable
  completion, false: an undesirable one). Strings are raw text (no chat template), like a prompt/completion
  row; message lists (the chat format) are the prompt's messages and one assistant message, and a plain
  string beside message lists is read as a user prompt or an assistant answer (as for preference pairs).
- preference pairs (`preference` or `sharegpt`, data/preference.py): each pair becomes two rows, its chosen
  answer desirable and its rejected answer undesirable — what trl's KTOTrainer does with paired data
  (`unpair_preference_dataset`).

The completion is encoded by the same code as SFT (tokenize.py): its tokens and end-of-turn marker (or EOS)
are the completion, everything before them the prompt. A source row is one row of the data summary even
when it is a pair (its two halves stay together on the same side of a validation split); the datasets
hold one example per completion, with the columns trl's KTO collator batches: prompt_ids, completion_ids,
label.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratool.data.build import (
    PreparedData,
    _require_rows,
    _sha256,
    _split_off,
    _Template,
    build_split,
    encode_source,
    read_source,
)
from loratool.data.formats import (
    Conversation,
    Example,
    RowError,
    _Fields,
    _prompt_completion,
    _renamed_keys,
    _type_name,
    check_fields,
)
from loratool.data.preference import (
    FIELDS as PAIR_FIELDS,
)
from loratool.data.preference import (
    _answer_span,
    _as_messages,
    _one_answer,
    prompt_kept,
    resolve_preference_format,
    to_pair,
)
from loratool.data.summary import DataSummary, SourceSummary, SplitSummary
from loratool.data.templates import describe_choice
from loratool.data.tokenize import IGNORE
from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.recipe import DataSection, DataSource

FIELDS = ("prompt", "completion", "label", "role", "content", "tools")
REQUIRED = ("prompt", "completion", "label")


@dataclass(frozen=True)
class Judged:
    """One completion of a prompt, as the example SFT would train on, and whether it is desirable."""

    example: Example
    desirable: bool


@dataclass
class _Row:
    """One source row encoded: one completion (unpaired) or two (a pair), each (prompt, completion, label)."""

    completions: list[tuple[list[int], list[int], bool]]
    source: SourceSummary

    @property
    def tokens(self) -> int:
        return sum(len(p) + len(c) for p, c, _ in self.completions)

    @property
    def loss_tokens(self) -> int:
        return sum(len(c) for _, c, _ in self.completions)

    @property
    def longest(self) -> int:
        return max(len(p) + len(c) for p, c, _ in self.completions)


def build_unpaired_datasets(data: DataSection, tokenizer: Any, *, seed: int) -> PreparedData:
    """Read, check, template, tokenize and mask every row of `data` (unpaired rows, or pairs split in
    two); split off validation rows. Columns: prompt_ids, completion_ids, label."""
    from datasets import Dataset

    template = _Template(tokenizer, data.chat_template)
    train_sources, train_rows = build_split(
        data.train, lambda source: _build_source(source, data, tokenizer, template)
    )
    _require_rows("data.train", train_sources, train_rows, data)  # type: ignore[arg-type]
    random.Random(seed).shuffle(train_rows)

    validation_sources: list[SourceSummary] = []
    validation_rows: list[_Row] | None = None
    origin = None
    if isinstance(data.validation, float):
        train_rows, validation_rows = _split_off(train_rows, data.validation)  # type: ignore[arg-type]
        origin = f"{data.validation:.0%} of train, seed {seed}"
    elif data.validation:
        validation_sources, validation_rows = build_split(
            data.validation, lambda source: _build_source(source, data, tokenizer, template)
        )
        _require_rows("data.validation", validation_sources, validation_rows, data)  # type: ignore[arg-type]

    summary = DataSummary(
        train=_split_summary("train", train_sources, train_rows),
        validation=None
        if validation_rows is None
        else _split_summary("validation", validation_sources, validation_rows, origin),
        chat_template=describe_choice(data.chat_template) if template.used else None,
        chat_template_sha256=_sha256(tokenizer.chat_template) if template.used else None,
        max_length=data.max_length,
        truncation=data.truncation,
        completion_only_loss=True,  # the prompt is never trained
        seed=seed,
        warnings=template.warnings() + _label_warnings(train_rows),
    )

    def dataset(rows: list[_Row]) -> Dataset:
        completions = [c for row in rows for c in row.completions]
        return Dataset.from_dict(
            {
                "prompt_ids": [p for p, _, _ in completions],
                "completion_ids": [c for _, c, _ in completions],
                "label": [label for _, _, label in completions],
            }
        )

    return PreparedData(
        train=dataset(train_rows),
        validation=dataset(validation_rows) if validation_rows is not None else None,
        summary=summary,
    )


def desirable_rows(dataset: Any) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of prompt + completion for the desirable completions, loss on the completion:
    the rows SFT would train on, for evaluating a KTO run on its own validation rows."""
    rows = []
    for prompt, completion, label in zip(
        dataset["prompt_ids"], dataset["completion_ids"], dataset["label"], strict=True
    ):
        if label:
            labels = [IGNORE] * len(prompt) + completion
            labels[0] = IGNORE  # position 0 is never predicted (tokenize.py)
            rows.append((prompt + completion, labels))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Rows -> judged completions
# ---------------------------------------------------------------------------------------------------------


def resolve_unpaired_format(source: DataSource, first: dict[str, Any] | None, location: str = "") -> str:
    """`unpaired`, `preference` or `sharegpt`; for `auto`, detected from the keys of the first row."""
    if source.format in ("unpaired", *PAIR_FIELDS):
        return source.format
    if first is None:
        return "unpaired"
    if set(REQUIRED) <= _renamed_keys(first, source.columns):
        return "unpaired"
    try:
        return resolve_preference_format(source, first, location)
    except LoratoolError:
        found = ", ".join(sorted(first)) or "none"
        raise LoratoolError(
            f"data source {source.path}: the first row ({location}) is neither an unpaired row nor a "
            f"preference pair; its keys are: {found}",
            hint="with a kto section each row needs prompt + completion + label (format: unpaired), or "
            "prompt + chosen + rejected (format: preference); `columns:` maps your field names to those, "
            "e.g. columns: {completion: answer, label: thumbs_up}",
        ) from None


def check_unpaired_columns(source: DataSource, fmt: str) -> None:
    """`columns` may only rename fields the layout reads; `roles` must map to real roles."""
    fields = FIELDS if fmt == "unpaired" else PAIR_FIELDS[fmt]
    check_fields(source, fields, f"{'unpaired' if fmt == 'unpaired' else 'preference'} format {fmt}")


def to_judged(row: dict[str, Any], fmt: str, source: DataSource) -> list[Judged]:
    """One row -> its judged completions (two for a pair), or RowError saying what does not fit."""
    if fmt != "unpaired":
        pair = to_pair(row, fmt, source)
        return [Judged(pair.chosen, True), Judged(pair.rejected, False)]
    fields = _Fields(row, source.columns)
    values = {name: fields.get(name) for name in REQUIRED}
    for name, value in values.items():
        if value is None:
            raise RowError(f"field {fields.name(name)!r} is missing")
    label = values.pop("label")
    if not isinstance(label, bool):
        raise RowError(
            f"field {fields.name('label')!r} must be true or false (is the completion desirable?), got "
            f"{_type_name(label)} {label!r}"
        )
    if any(isinstance(value, list | dict) for value in values.values()):  # the chat format
        values = {
            name: _as_messages(value, "user" if name == "prompt" else "assistant", fields)
            for name, value in values.items()
        }
    renamed = {**row, **{fields.name(name): value for name, value in values.items()}}
    example = _prompt_completion(_Fields(renamed, source.columns), source)
    return [Judged(_one_answer(example, fields.name("completion")), label)]


# ---------------------------------------------------------------------------------------------------------
# Judged completions -> token ids, per source
# ---------------------------------------------------------------------------------------------------------


def _build_source(
    source: DataSource, data: DataSection, tokenizer: Any, template: _Template
) -> tuple[SourceSummary, list[_Row]]:
    read = read_source(
        source, data, resolve_unpaired_format, check_unpaired_columns, to_judged, what="format"
    )
    summary, parsed, locations, bad = read.summary, read.parsed, read.locations, read.bad
    judged = [j for row in parsed for j in row]
    if any(isinstance(j.example, Conversation) for j in judged):
        template.ensure()
        template.rows_with_tools += sum(bool(getattr(row[0].example, "tools", None)) for row in parsed)
    encoded = iter(encode_source(source, [j.example for j in judged], tokenizer, completion_only_loss=True))

    kept = []
    for location, row in zip(locations, parsed, strict=True):
        results = [next(encoded) for _ in row]
        error = next((r for r in results if isinstance(r, RowError)), None)
        if error is not None:
            bad(location, error.reason)
            continue
        completions = []
        for j, result in zip(row, results, strict=True):
            completion = _cut(result, data, summary, location)
            if completion is None:
                break
            completions.append((*completion, j.desirable))
        else:
            kept.append(_Row(completions, summary))  # type: ignore[arg-type]
    return summary, kept


def _cut(
    encoded: tuple[list[int], list[int]], data: DataSection, summary: SourceSummary, location: str
) -> tuple[list[int], list[int]] | None:
    """(prompt, completion) token ids, cut to data.max_length; None (counted) when the row is dropped."""
    input_ids, labels = encoded
    span = _answer_span(labels)
    if span is None:
        summary.drop("no_loss", location, "a completion has no token to learn from (empty, or only markup)")
        return None
    start, end = span
    prompt, completion = input_ids[:start], input_ids[start:end]
    length = len(prompt) + len(completion)
    if length <= data.max_length:
        return prompt, completion
    if data.truncation == "drop":
        summary.drop("too_long", location, f"{length} tokens, over data.max_length={data.max_length}")
        return None
    if data.prompt_truncation == "keep_end":  # as for preference pairs: the prompt loses its start
        kept = prompt_kept(len(prompt), len(completion), data.max_length)
        summary.prompts_cut += kept < len(prompt)
        prompt = prompt[len(prompt) - kept :]
    room = data.max_length - len(prompt)
    if room <= 0:
        summary.drop(
            "prompt_too_long",
            location,
            f"the prompt alone is {len(prompt)} tokens, data.max_length={data.max_length} "
            "(data.prompt_truncation: keep_end cuts it from its start instead)",
        )
        return None
    summary.truncated += 1
    return prompt, completion[:room]


def _split_summary(
    name: str, sources: list[SourceSummary], rows: list[_Row], origin: str | None = None
) -> SplitSummary:
    """Counts of the source rows that made it into the split (a pair counts once)."""
    if sources:
        for source in sources:
            source.used, source.tokens, source.loss_tokens = 0, 0, 0
        for row in rows:
            row.source.used += 1
            row.source.tokens += row.tokens
            row.source.loss_tokens += row.loss_tokens
    return SplitSummary(
        name=name,
        sources=sources,
        rows=len(rows),
        tokens=sum(r.tokens for r in rows),
        loss_tokens=sum(r.loss_tokens for r in rows),
        longest=max((r.longest for r in rows), default=0),
        origin=origin,
    )


def label_counts(rows: list[_Row]) -> tuple[int, int]:
    """(desirable, undesirable) completions."""
    labels = [label for row in rows for _, _, label in row.completions]
    return sum(labels), len(labels) - sum(labels)


def _label_warnings(rows: list[_Row]) -> list[str]:
    """KTO learns from both kinds of completion: a training split with only one kind is warned about."""
    desirable, undesirable = label_counts(rows)
    if desirable and undesirable:
        return []
    missing = "undesirable (label: false)" if desirable else "desirable (label: true)"
    return [
        f"train: all {desirable + undesirable:,} completions have the same label — there is no {missing} "
        "completion, so KTO only pushes one way"
    ]
