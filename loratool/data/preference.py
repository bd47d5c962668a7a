"""Preference pairs for DPO: rows -> (prompt, chosen, rejected) token ids, masked as for SFT.

Two row layouts:
- `preference`: `prompt`, `chosen`, `rejected`. All strings: raw text (no chat template), like a
  prompt/completion row. Message lists (the chat format): the prompt's messages, then one assistant message
  for each answer; a plain string beside message lists is read as a user prompt or an assistant answer.
- `sharegpt`: `conversations` (the prompt turns, `from`/`value`) with `chosen` and `rejected`, each one
  message (`{"from": "gpt", "value": ...}`), as in LLaMA-Factory's dpo_en_demo.json.

Each answer is turned into the example SFT would train on (formats.py: a Completion, or a Conversation
trained from the answer) and encoded by the same code (tokenize.py). The tokens that carry loss there are
the answer tokens here: the answer and its end-of-turn marker (or EOS). Everything before them is the
prompt, never trained. Rows are read, checked, truncated and counted in the data summary as for SFT.

A pair whose rejected answer is empty, or the same tokens as the chosen one (as written, or once
data.max_length has cut both), carries no preference signal: its DPO gradient is zero. Such pairs are
kept (they are harmless), counted and warned about; a training split made only of them is refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
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
    _sharegpt,
    _type_name,
    check_fields,
)
from loratool.data.summary import DataSummary, SourceSummary, SplitSummary
from loratool.data.templates import describe_choice
from loratool.data.tokenize import IGNORE
from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.recipe import DataSection, DataSource

# The fields each preference layout reads (before `columns` renames them); the first three are required.
FIELDS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected", "role", "content", "tools"),
    "sharegpt": (
        "conversations",
        "chosen",
        "rejected",
        "from",
        "value",
        "role",
        "content",
        "tools",
        "system",
    ),
}
ANSWERS = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """The same prompt answered twice, each as the example SFT would train on (loss on the answer only)."""

    chosen: Example
    rejected: Example


@dataclass
class _Pair:
    """One encoded pair, remembered with its source (for per-source counts) and its place in the file."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: SourceSummary
    location: str = ""
    no_signal: str | None = None  # why the pair teaches nothing (signal_problem), or None

    @property
    def tokens(self) -> int:
        """Tokens the model reads for this pair: the prompt twice, each answer once."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def loss_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def longest(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def build_preference_datasets(data: DataSection, tokenizer: Any, *, seed: int) -> PreparedData:
    """Read, check, template, tokenize and mask every preference pair of `data`; split off validation
    pairs. The datasets have the columns trl's DPOTrainer batches: prompt_ids, chosen_ids, rejected_ids."""
    from datasets import Dataset

    template = _Template(tokenizer, data.chat_template)
    train_sources, train_pairs = build_split(
        data.train, lambda source: _build_source(source, data, tokenizer, template)
    )
    _require_rows("data.train", train_sources, train_pairs, data)  # type: ignore[arg-type]
    random.Random(seed).shuffle(train_pairs)

    validation_sources: list[SourceSummary] = []
    validation_pairs: list[_Pair] | None = None
    origin = None
    if isinstance(data.validation, float):
        train_pairs, validation_pairs = _split_off(train_pairs, data.validation)  # type: ignore[arg-type]
        origin = f"{data.validation:.0%} of train, seed {seed}"
    elif data.validation:
        validation_sources, validation_pairs = build_split(
            data.validation, lambda source: _build_source(source, data, tokenizer, template)
        )
        _require_rows("data.validation", validation_sources, validation_pairs, data)  # type: ignore[arg-type]
    _require_signal(train_sources, train_pairs, data)

    summary = DataSummary(
        train=_split_summary("train", train_sources, train_pairs),
        validation=None
        if validation_pairs is None
        else _split_summary("validation", validation_sources, validation_pairs, origin),
        chat_template=describe_choice(data.chat_template) if template.used else None,
        chat_template_sha256=_sha256(tokenizer.chat_template) if template.used else None,
        max_length=data.max_length,
        truncation=data.truncation,
        completion_only_loss=True,  # the prompt of a pair is never trained
        seed=seed,
        warnings=template.warnings() + _signal_warnings(train_pairs, validation_pairs),
    )

    def dataset(pairs: list[_Pair]) -> Dataset:
        return Dataset.from_dict(
            {
                "prompt_ids": [p.prompt_ids for p in pairs],
                "chosen_ids": [p.chosen_ids for p in pairs],
                "rejected_ids": [p.rejected_ids for p in pairs],
            }
        )

    return PreparedData(
        train=dataset(train_pairs),
        validation=dataset(validation_pairs) if validation_pairs is not None else None,
        summary=summary,
    )


def chosen_sequences(dataset: Any) -> list[list[int]]:
    """Each pair's prompt followed by its chosen answer: the text the tuned model should prefer."""
    return [p + c for p, c in zip(dataset["prompt_ids"], dataset["chosen_ids"], strict=True)]


def padded_pair_lengths(dataset: Any) -> list[int]:
    """Tokens each pair occupies in a batch: its two sequences, padded to the longer one."""
    return [
        2 * (len(p) + max(len(c), len(r)))
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]


def chosen_rows(dataset: Any) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of prompt + chosen answer, loss on the answer: the rows SFT would train on, for
    evaluating a DPO run on its own validation pairs."""
    rows = []
    for prompt, chosen in zip(dataset["prompt_ids"], dataset["chosen_ids"], strict=True):
        labels = [IGNORE] * len(prompt) + chosen
        labels[0] = IGNORE  # position 0 is never predicted (tokenize.py)
        rows.append((prompt + chosen, labels))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Rows -> pairs
# ---------------------------------------------------------------------------------------------------------


def resolve_preference_format(source: DataSource, first: dict[str, Any] | None, location: str = "") -> str:
    """`preference` or `sharegpt`; for `auto`, detected from the keys of the first row (after `columns`)."""
    if source.format in FIELDS:
        return source.format
    if first is None:
        return "preference"  # no readable row: nothing will be encoded
    keys = _renamed_keys(first, source.columns)
    if {"conversations", *ANSWERS} <= keys:
        return "sharegpt"
    if {"prompt", *ANSWERS} <= keys:
        return "preference"
    found = ", ".join(sorted(first)) or "none"
    raise LoratoolError(
        f"data source {source.path}: the first row ({location}) is not a preference pair; its keys are: "
        f"{found}",
        hint="with a dpo section each row needs prompt + chosen + rejected (format: preference) or "
        "conversations + chosen + rejected (format: sharegpt); `columns:` maps your field names to those, "
        "e.g. columns: {prompt: question, chosen: good, rejected: bad}",
    )


def check_preference_columns(source: DataSource, fmt: str) -> None:
    """`columns` may only rename fields the layout reads; `roles` must map to real roles."""
    check_fields(source, FIELDS[fmt], f"preference format {fmt}")


def to_pair(row: dict[str, Any], fmt: str, source: DataSource) -> PreferencePair:
    """One row -> one pair, or RowError saying what does not fit."""
    read = _sharegpt_answer if fmt == "sharegpt" else _preference_answer
    chosen, rejected = (read(row, source, answer) for answer in ANSWERS)
    return PreferencePair(chosen, rejected)


def _preference_answer(row: dict[str, Any], source: DataSource, answer: str) -> Example:
    """prompt + one answer as a prompt/completion row (formats.py reads it, columns and roles included)."""
    fields = _Fields(row, source.columns)
    values = {name: fields.get(name) for name in ("prompt", *ANSWERS)}
    for name, value in values.items():
        if value is None:
            raise RowError(f"field {fields.name(name)!r} is missing")
    if any(isinstance(value, list | dict) for value in values.values()):  # the chat format
        values = {
            name: _as_messages(value, "user" if name == "prompt" else "assistant", fields)
            for name, value in values.items()
        }
    renamed = {**row, **{fields.name(name): value for name, value in values.items()}}
    view = _Fields(renamed, {**source.columns, "completion": fields.name(answer)})
    return _one_answer(_prompt_completion(view, source), fields.name(answer))


def _sharegpt_answer(row: dict[str, Any], source: DataSource, answer: str) -> Example:
    """The conversation with one answer appended, read as a ShareGPT row and trained on that answer."""
    fields = _Fields(row, source.columns)
    turns, message = fields.get("conversations"), fields.get(answer)
    if message is None:
        raise RowError(f"field {fields.name(answer)!r} is missing")
    if isinstance(message, list) and len(message) == 1:
        message = message[0]
    if not isinstance(message, dict):
        raise RowError(
            f'field {fields.name(answer)!r} must be one message object ({{"from": "gpt", "value": ...}}), '
            f"got {_type_name(message)}" + (f" of {len(message)} items" if isinstance(message, list) else "")
        )
    where = fields.name("conversations")
    if turns is None:
        raise RowError(f"field {where!r} is missing")
    if not isinstance(turns, list) or not turns:
        what = "an empty list" if isinstance(turns, list) else _type_name(turns)
        raise RowError(f"field {where!r} must be a list of the prompt's messages, got {what}")
    conversation = _sharegpt(_Fields({**row, where: [*turns, message]}, source.columns), source)
    assert isinstance(conversation, Conversation)
    trained_from = len(conversation.messages) - 1  # the answer: the last message
    return _one_answer(replace(conversation, trained_from=trained_from), fields.name(answer))


def _as_messages(value: Any, role: str, fields: _Fields) -> Any:
    """A plain string beside chat messages becomes one message of `role`; one message object, a list."""
    if isinstance(value, str):
        return [{fields.name("role"): role, fields.name("content"): value}]
    if isinstance(value, dict):
        return [value]
    return value


def _one_answer(example: Example, name: str) -> Example:
    """An answer is one assistant message: DPO scores it as one continuous span of tokens."""
    if isinstance(example, Conversation):
        answer = example.messages[example.trained_from :]
        if len(answer) != 1:
            raise RowError(f"field {name!r} must hold one assistant message, got {len(answer)} messages")
        if answer[0]["role"] != "assistant":
            raise RowError(f"field {name!r} must be an assistant message, got role {answer[0]['role']!r}")
    return example


# ---------------------------------------------------------------------------------------------------------
# Pairs -> token ids, per source
# ---------------------------------------------------------------------------------------------------------


def _build_source(
    source: DataSource, data: DataSection, tokenizer: Any, template: _Template
) -> tuple[SourceSummary, list[_Pair]]:
    read = read_source(
        source, data, resolve_preference_format, check_preference_columns, to_pair, what="preference format"
    )
    summary, pairs, locations, bad = read.summary, read.parsed, read.locations, read.bad

    examples = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    if any(isinstance(example, Conversation) for example in examples):
        template.ensure()
        template.rows_with_tools += sum(bool(getattr(pair.chosen, "tools", None)) for pair in pairs)
    encoded = encode_source(source, examples, tokenizer, completion_only_loss=True)

    kept = []
    for location, example, chosen, rejected in zip(
        locations, pairs, encoded[: len(pairs)], encoded[len(pairs) :], strict=True
    ):
        for result in (chosen, rejected):
            if isinstance(result, RowError):
                bad(location, result.reason)
                break
        else:
            pair = _pair(example, chosen, rejected, data, summary, location)
            if pair is not None:
                kept.append(pair)
    return summary, kept


def split_pair(
    chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]]
) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt, chosen answer, rejected answer) token ids of a pair, from each answer's (input_ids,
    labels) as encoded for SFT, before data.max_length; None when an answer has no token to learn from."""
    spans = [_answer_span(labels) for _, labels in (chosen, rejected)]
    if None in spans:
        return None
    (chosen_ids, _), (rejected_ids, _) = chosen, rejected
    (chosen_start, chosen_end), (rejected_start, rejected_end) = spans  # type: ignore[misc]
    # The answers start where their prompts end; a tokenizer may merge the last prompt token with the
    # answer differently in the two, so the shared prompt is their common prefix (trl does the same).
    start = min(chosen_start, rejected_start, _common_prefix(chosen_ids, rejected_ids))
    return chosen_ids[:start], chosen_ids[start:chosen_end], rejected_ids[start:rejected_end]


def signal_problem(
    pair: PreferencePair, whole: tuple[list[int], list[int]], kept: tuple[list[int], list[int]]
) -> str | None:
    """Why a pair teaches DPO nothing, or None: the rejected answer is empty, or the chosen and rejected
    answer tokens are the same, as written (`whole`) or as data.max_length leaves them (`kept`)."""
    if not _answer_text(pair.rejected).strip():
        return "the rejected answer is empty"
    if whole[0] == whole[1]:
        return "chosen and rejected are the same answer"
    if kept[0] == kept[1]:
        return (
            f"chosen and rejected differ only after their first {len(kept[0])} tokens, cut by data.max_length"
        )
    return None


def _answer_text(example: Example) -> str:
    """The answer of a one-answer example, as text; a tool call counts as text."""
    if isinstance(example, Conversation):
        answer = example.messages[-1]
        return str(answer.get("content") or "") + ("tool_calls" if answer.get("tool_calls") else "")
    return example.completion


def _pair(
    example: PreferencePair,
    chosen: tuple[list[int], list[int]],
    rejected: tuple[list[int], list[int]],
    data: DataSection,
    summary: SourceSummary,
    location: str,
) -> _Pair | None:
    """The shared prompt and the two answers, cut to data.max_length; None (counted) when dropped."""
    parts = split_pair(chosen, rejected)
    if parts is None:
        summary.drop("no_loss", location, "an answer has no token to learn from (empty, or only markup)")
        return None
    prompt, chosen_ids, rejected_ids = parts
    answers = [chosen_ids, rejected_ids]
    longest = len(prompt) + max(len(a) for a in answers)
    truncated = longest > data.max_length
    if truncated:
        if data.truncation == "drop":
            summary.drop("too_long", location, f"{longest} tokens, over data.max_length={data.max_length}")
            return None
        if data.prompt_truncation == "keep_end":
            kept = prompt_kept(len(prompt), longest - len(prompt), data.max_length)
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
        answers = [answer[:room] for answer in answers]
    summary.truncated += truncated
    no_signal = signal_problem(example, (chosen_ids, rejected_ids), (answers[0], answers[1]))
    return _Pair(prompt, answers[0], answers[1], summary, location, no_signal)


def prompt_kept(prompt: int, answer: int, max_length: int) -> int:
    """How many of a prompt's last tokens `keep_end` keeps: the answer (the longer one) whole when it fits
    in half of max_length, else half of max_length goes to the answers; never more than the prompt has."""
    return min(prompt, max(max_length - answer, max_length - max_length // 2))


def _answer_span(labels: list[int]) -> tuple[int, int] | None:
    """[first, last + 1) of the tokens that carry loss, or None when none does."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    return (trained[0], trained[-1] + 1) if trained else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _split_summary(
    name: str, sources: list[SourceSummary], pairs: list[_Pair], origin: str | None = None
) -> SplitSummary:
    """Counts of the pairs that made it into the split (a row is a pair)."""
    if sources:
        for source in sources:
            source.used, source.tokens, source.loss_tokens, source.without_signal = 0, 0, 0, 0
        for pair in pairs:
            pair.source.used += 1
            pair.source.tokens += pair.tokens
            pair.source.loss_tokens += pair.loss_tokens
            pair.source.without_signal += pair.no_signal is not None  # type: ignore[operator]
    return SplitSummary(
        name=name,
        sources=sources,
        rows=len(pairs),
        tokens=sum(p.tokens for p in pairs),
        loss_tokens=sum(p.loss_tokens for p in pairs),
        longest=max((p.longest for p in pairs), default=0),
        origin=origin,
        kind="pairs",
    )


def _without_signal(pairs: list[_Pair]) -> list[_Pair]:
    return [p for p in pairs if p.no_signal is not None]


def _signal_warnings(train: list[_Pair], validation: list[_Pair] | None) -> list[str]:
    """One warning per split that holds pairs without signal: how many, and one of them."""
    warnings = []
    for name, pairs in (("train", train), ("validation", validation or [])):
        if empty := _without_signal(pairs):
            warnings.append(
                f"{name}: {len(empty):,} of {len(pairs):,} pairs carry no preference signal (the rejected "
                "answer is empty, or the same as the chosen one): DPO learns nothing from them; e.g. "
                f"{empty[0].location}: {empty[0].no_signal}"
            )
    return warnings


def _require_signal(sources: list[SourceSummary], pairs: list[_Pair], data: DataSection) -> None:
    """Training pairs that all teach nothing make a run that cannot move the model: refused."""
    empty = _without_signal(pairs)
    if not pairs or len(empty) < len(pairs):
        return
    files = ", ".join(dict.fromkeys(s.path for s in sources))
    raise LoratoolError(
        f"data.train: no preference pair carries signal: in all {len(pairs):,} training pairs of {files} the "
        f"rejected answer is empty or the same as the chosen one; e.g. {empty[0].location}: "
        f"{empty[0].no_signal}",
        hint="DPO learns from the difference between the two answers of a pair: check that chosen and "
        "rejected hold different answers (columns: maps them to your fields, e.g. columns: {chosen: good, "
        f"rejected: bad}}); if they differ only near the end, raise data.max_length (now {data.max_length})",
    )
