"""Prompt-only rows for online RL (`grpo` / `rloo`): a prompt for the model to answer, and the columns the
rewards read (a reference `answer`, ...). Nothing is trained on these rows directly: the model generates
completions for each prompt during training and the rewards score them.

One row layout, `prompt`: the `prompt` field is a string (raw text: no chat template, like a
prompt/completion row) or a list of chat messages (rendered by the chat template, with the assistant turn
opened for the answer, as trl's trainers render them). Every other field of the row is kept, as it is, for
the rewards. Rows are read, checked and counted in the data summary as for SFT: a malformed row, or one
without a column a reward needs (or, for a `number` reward, without a number in it), stops with its
file:line or is skipped (`data.on_bad_row`). A prompt is never cut (that would change the question): one
longer than data.max_length tokens is dropped and counted.

The datasets hold the columns the trainers read: `prompt`, and `columns` (each row's other fields as JSON,
which train/rewards.py hands to the rewards; JSON keeps each value's type as the file wrote it), and
`prompt_tokens` (for `loratool plan`).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratool.data.build import (
    PreparedData,
    _require_rows,
    _sha256,
    _split_off,
    _Template,
    build_split,
    read_source,
)
from loratool.data.formats import (
    MESSAGE_ROLES,
    RowError,
    _Fields,
    _message_list,
    _renamed_keys,
    _type_name,
    _with_system,
    check_fields,
)
from loratool.data.summary import DataSummary, SourceSummary, SplitSummary
from loratool.data.templates import describe_choice
from loratool.data.tokenize import _render
from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.recipe import DataSection, DataSource, RewardFunction

# The last number in a text: an optional sign, digits with optional thousands commas, a decimal part.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
FIELDS = ("prompt", "role", "content")  # what the layout reads (before `columns` renames them)
COLUMNS = "columns"  # the dataset column holding each row's other fields, as JSON


@dataclass(frozen=True)
class PromptRow:
    """A prompt to answer (text, or chat messages) and the row's other fields, for the rewards."""

    prompt: str | list[dict[str, str]]
    columns: dict[str, Any]

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class _Item:
    prompt: str | list[dict[str, str]]
    columns: dict[str, Any]
    prompt_ids: list[int]
    source: SourceSummary
    location: str


def build_prompt_datasets(
    data: DataSection, tokenizer: Any, *, seed: int, rewards: list[RewardFunction], section: str
) -> PreparedData:
    """Read and check every prompt row of `data` (`section`: grpo or rloo, whose `rewards` say which
    columns each row needs), tokenize each prompt as the trainer will to count it, and split off
    validation prompts. The datasets have the columns the trainers read: prompt, columns."""
    from datasets import Dataset

    template = _Template(tokenizer, data.chat_template)
    needs = reference_columns(rewards, section)

    def build(source: DataSource) -> tuple[SourceSummary, list[_Item]]:
        return _build_source(source, data, tokenizer, template, needs)

    train_sources, train_items = build_split(data.train, build)
    _require_rows("data.train", train_sources, train_items, data)  # type: ignore[arg-type]
    random.Random(seed).shuffle(train_items)

    validation_sources: list[SourceSummary] = []
    validation_items: list[_Item] | None = None
    origin = None
    if isinstance(data.validation, float):
        train_items, validation_items = _split_off(train_items, data.validation)  # type: ignore[arg-type]
        origin = f"{data.validation:.0%} of train, seed {seed}"
    elif data.validation:
        validation_sources, validation_items = build_split(data.validation, build)
        _require_rows("data.validation", validation_sources, validation_items, data)  # type: ignore[arg-type]
    _require_one_kind(train_items + (validation_items or []))

    summary = DataSummary(
        train=_split_summary("train", train_sources, train_items),
        validation=None
        if validation_items is None
        else _split_summary("validation", validation_sources, validation_items, origin),
        chat_template=describe_choice(data.chat_template) if template.used else None,
        chat_template_sha256=_sha256(tokenizer.chat_template) if template.used else None,
        max_length=data.max_length,
        truncation="drop",  # a prompt is never cut
        completion_only_loss=True,  # the prompt is never trained; the generated completions are
        seed=seed,
        warnings=template.warnings(),
    )

    def dataset(items: list[_Item]) -> Dataset:
        return Dataset.from_dict(
            {
                "prompt": [item.prompt for item in items],
                COLUMNS: [json.dumps(item.columns, ensure_ascii=False) for item in items],
                "prompt_tokens": [len(item.prompt_ids) for item in items],  # for `loratool plan`
            }
        )

    return PreparedData(
        train=dataset(train_items),
        validation=dataset(validation_items) if validation_items is not None else None,
        summary=summary,
    )


def _require_one_kind(items: list[_Item]) -> None:
    """trl renders a batch of prompts as chat messages or as text by its first prompt: one kind per run."""
    chat = [item for item in items if isinstance(item.prompt, list)]
    if chat and len(chat) < len(items):
        text = next(item for item in items if not isinstance(item.prompt, list))
        raise LoratoolError(
            f"{text.location}: a text prompt, while {chat[0].location} (and {len(chat) - 1:,} more) hold chat "
            "messages: the prompts of a run are all text or all chat messages",
            hint='write every prompt as a list of messages ([{"role": "user", "content": ...}]), or every '
            "one as text",
        )


def reference_columns(rewards: list[RewardFunction], section: str) -> dict[str, tuple[str, str]]:
    """Each column a reward compares with -> (the reward's key, its kind): exact_match, number."""
    needs: dict[str, tuple[str, str]] = {}
    for i, reward in enumerate(rewards):
        column = reward.reference_column()
        if column is not None and (column not in needs or reward.kind == "number"):
            needs[column] = (f"{section}.rewards.{i}", reward.kind)
    return needs


# ---------------------------------------------------------------------------------------------------------
# Rows -> prompts
# ---------------------------------------------------------------------------------------------------------


def resolve_prompt_format(source: DataSource, first: dict[str, Any] | None, location: str = "") -> str:
    """`prompt`; for `auto`, the first row (after `columns`) must have a prompt field."""
    if source.format == "prompt" or first is None:
        return "prompt"
    if "prompt" in _renamed_keys(first, source.columns):
        return "prompt"
    found = ", ".join(sorted(first)) or "none"
    raise LoratoolError(
        f"data source {source.path}: the first row ({location}) has no prompt; its keys are: {found}",
        hint="with a grpo or rloo section each row is a prompt to answer (a string or a list of chat "
        'messages) plus the columns the rewards read, e.g. {"prompt": "What is 2+3?", "answer": 5}; '
        "`columns:` maps your field name, e.g. columns: {prompt: question}",
    )


def check_prompt_columns(source: DataSource, fmt: str) -> None:
    """`columns` may only rename the prompt and its messages' role / content; `roles` must map to roles."""
    check_fields(source, FIELDS, "prompt format")


def to_prompt(row: dict[str, Any], fmt: str, source: DataSource) -> PromptRow:
    """One row -> one prompt with its other fields, or RowError saying what does not fit."""
    fields = _Fields(row, source.columns)
    name = fields.name("prompt")
    value = fields.get("prompt")
    if value is None:
        raise RowError(f"field {name!r} is missing")
    others = {key: item for key, item in row.items() if key != name}
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"field {name!r} is empty", kind="empty")
        return PromptRow(value, others)
    if not isinstance(value, list):
        raise RowError(f"field {name!r} must be a string or a list of chat messages, got {_type_name(value)}")
    messages = _message_list(fields, "prompt", "role", "content", {**MESSAGE_ROLES, **source.roles})
    if messages[-1]["role"] == "assistant":
        raise RowError(
            f"field {name!r} ends with an assistant message: the model answers after the prompt's last "
            "message, so the prompt ends with the user's turn"
        )
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return PromptRow(_with_system(plain, source.system_prompt), others)


def prompt_ids(prompt: PromptRow, tokenizer: Any) -> list[int]:
    """The prompt's tokens as the trainer feeds them: chat messages rendered by the chat template with
    the assistant turn opened; text as the tokenizer encodes it (its BOS included)."""
    if prompt.conversational:
        text = _render(tokenizer, prompt.prompt, None, add_generation_prompt=True)  # type: ignore[arg-type]
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return tokenizer(prompt.prompt, verbose=False)["input_ids"]


def reference_problem(row: PromptRow, needs: dict[str, tuple[str, str]]) -> str | None:
    """Why a row cannot be scored by the rewards (a column missing, or not a number), or None."""
    for column, (key, kind) in needs.items():
        value = row.columns.get(column)
        if value is None:
            return f"column {column!r} is missing ({key} compares the completion with it)"
        if kind == "number" and as_number(value) is None:
            return f"column {column!r} holds no number ({value!r}), which the number reward of {key} needs"
    return None


def last_number(text: str) -> float | None:
    """The last number written in `text` ("... 1,250.5 in total" -> 1250.5), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def as_number(value: Any) -> float | None:
    """A reference value as a number: a JSON number, or a string holding one (its last number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return last_number(value)
    return None


# ---------------------------------------------------------------------------------------------------------
# Prompts -> token counts, per source
# ---------------------------------------------------------------------------------------------------------


def _build_source(
    source: DataSource,
    data: DataSection,
    tokenizer: Any,
    template: _Template,
    needs: dict[str, tuple[str, str]],
) -> tuple[SourceSummary, list[_Item]]:
    read = read_source(source, data, resolve_prompt_format, check_prompt_columns, to_prompt, "prompt format")
    summary, prompts, locations, bad = read.summary, read.parsed, read.locations, read.bad
    if any(prompt.conversational for prompt in prompts):
        template.ensure()
    items = []
    for location, prompt in zip(locations, prompts, strict=True):
        problem = reference_problem(prompt, needs)
        if problem is not None:
            bad(location, problem)
            continue
        try:
            ids = prompt_ids(prompt, tokenizer)
        except RowError as exc:
            bad(location, exc.reason)
            continue
        if len(ids) > data.max_length:
            summary.drop(
                "too_long",
                location,
                f"the prompt is {len(ids)} tokens, over data.max_length={data.max_length}",
            )
            continue
        items.append(_Item(prompt.prompt, prompt.columns, ids, summary, location))
    return summary, items


def _split_summary(
    name: str, sources: list[SourceSummary], items: list[_Item], origin: str | None = None
) -> SplitSummary:
    """Counts of the prompts in the split: their tokens (no token of a prompt carries loss)."""
    if sources:
        for source in sources:
            source.used, source.tokens, source.loss_tokens = 0, 0, 0
        for item in items:
            item.source.used += 1
            item.source.tokens += len(item.prompt_ids)
    return SplitSummary(
        name=name,
        sources=sources,
        rows=len(items),
        tokens=sum(len(i.prompt_ids) for i in items),
        loss_tokens=0,
        longest=max((len(i.prompt_ids) for i in items), default=0),
        origin=origin,
        kind="prompts",
    )
