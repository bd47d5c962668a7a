"""`loratool data`: the rows as training sees them, which tokens carry loss, and what looks wrong.

Nothing here re-implements the pipeline: rows are read, formatted, templated, tokenized and masked by the
same functions training calls (read_source -> to_example / to_pair -> encode_many), and the data summary
is the one training prints. On top of that, each row's full tokenization (before data.max_length) is
kept, so that truncation can be measured, and the checks below look for the mistakes that only show
after a run has been paid for:

- an end-of-turn / EOS token of the template that never carries loss (the model never learns to stop);
- the generation config's EOS not being the template's end of turn (generation runs past the answer);
- rows whose loss is all masked (nothing to learn; training drops them);
- rows cut by max_length, and how many answer tokens that loses;
- exact duplicate rows;
- roles out of order (two user turns in a row, a system message in the middle, ...);
- a system prompt the chat template drops;
- preference pairs without signal (the rejected answer empty, or the same as the chosen one).

Each kind of row has its own small inspector: `inspect_rows` (supervised examples), `inspect_pairs`
(preference pairs, for a recipe with a dpo or reward section), `inspect_unpaired` (judged completions,
for a kto section) and `inspect_prompts` (what the model is prompted with, for grpo and rloo). An inspected
row lists the token `sequences` training feeds for it (one for an example; prompt + chosen and prompt + rejected for a pair) and the
`parts` it is shown in; the checks and the rendering work on those, so another kind of row (prompt-only
rows, unpaired KTO rows) is one more inspector and row class, not a branch in these.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from loratool.data.build import build_datasets, read_source
from loratool.data.formats import (
    Completion,
    Conversation,
    RowError,
    check_columns,
    resolve_format,
    to_example,
)
from loratool.data.preference import (
    PreferencePair,
    build_preference_datasets,
    check_preference_columns,
    resolve_preference_format,
    signal_problem,
    split_pair,
    to_pair,
)
from loratool.data.prompts import (
    build_prompt_datasets,
    check_prompt_columns,
    prompt_ids,
    resolve_prompt_format,
    to_prompt,
)
from loratool.data.tokenize import IGNORE, encode_many, render_conversation
from loratool.data.unpaired import (
    build_unpaired_datasets,
    check_unpaired_columns,
    resolve_unpaired_format,
    to_judged,
)
from loratool.errors import LoratoolError
from loratool.model.load import local_model_dir

if TYPE_CHECKING:
    from loratool.data.summary import DataSummary
    from loratool.recipe import DataSource, Recipe

SHOWN_EXAMPLES = 3  # locations listed under each warning
_PROBE_ANSWER = "Hello"
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]


@dataclass
class InspectedRow:
    """One row as training tokenizes it; `input_ids` / `labels` are the full rendering, before the cut
    at max_length (training keeps the first `max_length` tokens, or drops the row)."""

    location: str
    split: str
    raw: dict[str, Any]
    example: Any
    input_ids: list[int]
    labels: list[int]
    max_length: int

    LENGTH: ClassVar[str] = "tokens per row"  # what `length` counts (the histogram's axis)

    @property
    def truncated(self) -> bool:
        return len(self.input_ids) > self.max_length

    @property
    def loss_tokens(self) -> int:
        """Loss tokens training keeps (within max_length)."""
        return sum(label != IGNORE for label in self.labels[: self.max_length])

    @property
    def loss_tokens_cut(self) -> int:
        """Answer tokens beyond max_length: learned by no one."""
        return sum(label != IGNORE for label in self.labels[self.max_length :])

    @property
    def sequences(self) -> list[InspectedRow]:
        """The token sequences training feeds for this row: the row itself."""
        return [self]

    @property
    def length(self) -> int:
        """The tokens data.max_length is compared with."""
        return len(self.input_ids)

    def parts(self) -> list[Part]:
        return [Part(None, self, 0, len(self.input_ids))]

    def describe(self) -> str:
        return f"{len(self.input_ids):,} tokens, {self.loss_tokens:,} carry loss" + (
            f" · cut at max_length {self.max_length:,}" if self.truncated else ""
        )


@dataclass
class InspectedPair:
    """One preference pair as DPO training reads it: the shared prompt, then each answer (every answer
    token carries loss), before the cut at max_length (training keeps prompt + answer up to max_length
    tokens, cutting the answers, or drops the pair)."""

    location: str
    split: str
    raw: dict[str, Any]
    pair: PreferencePair
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    max_length: int

    LENGTH: ClassVar[str] = "tokens per pair, prompt + its longer answer"

    @property
    def example(self) -> Any:
        """The prompt with the chosen answer: what the role and system-prompt checks read."""
        return self.pair.chosen

    @cached_property
    def chosen(self) -> InspectedRow:
        """prompt + chosen answer, loss on the answer (train/dpo.py feeds this sequence)."""
        return self._sequence(self.pair.chosen, self.chosen_ids)

    @cached_property
    def rejected(self) -> InspectedRow:
        return self._sequence(self.pair.rejected, self.rejected_ids)

    def _sequence(self, example: Any, answer: list[int]) -> InspectedRow:
        labels = [IGNORE] * len(self.prompt_ids) + answer
        labels[0] = IGNORE  # position 0 is never predicted (tokenize.py)
        return InspectedRow(
            self.location, self.split, self.raw, example, self.prompt_ids + answer, labels, self.max_length
        )

    @property
    def sequences(self) -> list[InspectedRow]:
        return [self.chosen, self.rejected]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def truncated(self) -> bool:
        return self.length > self.max_length

    @property
    def no_signal(self) -> str | None:
        """Why the pair teaches nothing (preference.signal_problem), or None."""
        room = max(0, self.max_length - len(self.prompt_ids))
        whole = (self.chosen_ids, self.rejected_ids)
        return signal_problem(self.pair, whole, (self.chosen_ids[:room], self.rejected_ids[:room]))

    def parts(self) -> list[Part]:
        start = len(self.prompt_ids)
        return [
            Part("prompt", self.chosen, 0, start),
            Part("chosen", self.chosen, start, len(self.chosen.input_ids)),
            Part("rejected", self.rejected, start, len(self.rejected.input_ids)),
        ]

    def describe(self) -> str:
        loss = self.chosen.loss_tokens + self.rejected.loss_tokens
        text = (
            f"prompt {len(self.prompt_ids):,} tokens, chosen {len(self.chosen_ids):,}, rejected "
            f"{len(self.rejected_ids):,}: {loss:,} answer tokens carry loss"
        )
        if self.truncated:
            text += f" · cut at max_length {self.max_length:,}"
        if self.no_signal:
            text += f" · no signal: {self.no_signal}"
        return text


@dataclass
class InspectedPrompt:
    """One prompt of an online RL run (grpo, rloo) as the model is prompted with it: the rendered prompt,
    ending where the model's completion starts, and the columns the rewards read. No token carries loss:
    the completions the model generates during training are what it learns from."""

    location: str
    split: str
    raw: dict[str, Any]
    example: Any  # a Conversation (chat prompt), or a Completion with no completion (raw text)
    prompt_ids: list[int]
    columns: dict[str, Any]
    max_length: int

    LENGTH: ClassVar[str] = "prompt tokens"

    @cached_property
    def prompt(self) -> InspectedRow:
        ids = self.prompt_ids
        labels = [IGNORE] * len(ids)  # no max_length cut to show: an over-long prompt is dropped whole
        return InspectedRow(self.location, self.split, self.raw, self.example, ids, labels, 10**9)

    @property
    def sequences(self) -> list[InspectedRow]:
        return [self.prompt]

    @property
    def length(self) -> int:
        return len(self.prompt_ids)

    @property
    def truncated(self) -> bool:
        return False  # a prompt is never cut: one over max_length is dropped (the summary counts it)

    def parts(self) -> list[Part]:
        return [Part("prompt", self.prompt, 0, len(self.prompt_ids))]

    def describe(self) -> str:
        shown = ", ".join(f"{k}: {json.dumps(v, ensure_ascii=False)[:80]}" for k, v in self.columns.items())
        return f"{len(self.prompt_ids):,} prompt tokens; the completion starts at the end" + (
            f" · {shown}" if shown else ""
        )


Inspected = InspectedRow | InspectedPair | InspectedPrompt


@dataclass(frozen=True)
class Part:
    """What one labelled stretch of a row shows: tokens [start, stop) of one of its sequences."""

    name: str | None  # prompt, chosen, rejected; None for a whole supervised row
    sequence: InspectedRow
    start: int
    stop: int


@dataclass
class Finding:
    """One check that failed: what, how many rows, and the first few of them."""

    check: str
    message: str
    count: int
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "message": self.message, "count": self.count, "examples": self.examples}


@dataclass
class DataReport:
    summary: DataSummary
    rows: list[Any]  # InspectedRow, or InspectedPair for preference data
    findings: list[Finding]
    end_of_turn: str | None  # the token that closes an answer (template's end of turn, or EOS)
    tokenizer: Any
    length_meaning: str = InspectedRow.LENGTH  # what lengths() counts

    def lengths(self) -> list[int]:
        return [row.length for row in self.rows]


@dataclass(frozen=True)
class _Context:
    """What the checks read besides the rows."""

    recipe: Recipe
    tokenizer: Any
    eot_id: int | None


Check = Callable[[list[Any], _Context], "Finding | None"]


def inspect_data(recipe: Recipe, tokenizer: Any) -> DataReport:
    """Build the data as `train` does (summary included) and check every row, with the inspector of the
    recipe's kind of row."""
    inspectors = {"sft": inspect_rows, "dpo": inspect_pairs, "reward": inspect_pairs, "kto": inspect_unpaired,
                  "grpo": inspect_prompts, "rloo": inspect_prompts}  # fmt: skip
    if recipe.stage not in inspectors:
        raise LoratoolError(
            f"{recipe.stage}: `loratool data` cannot show this method's rows yet",
            hint="`loratool train RECIPE --dry-run` reads and checks every row as training will",
        )
    return inspectors[recipe.stage](recipe, tokenizer)


def inspect_rows(recipe: Recipe, tokenizer: Any) -> DataReport:
    """Supervised examples: one sequence per row, loss where data.completion_only_loss puts it."""
    summary = build_datasets(recipe.data, tokenizer, seed=recipe.training.seed).summary  # sets the template
    rows = [row for source, split in _sources(recipe) for row in _rows_of(source, split, recipe, tokenizer)]
    return _report(recipe, tokenizer, summary, rows, InspectedRow.LENGTH, COMMON_CHECKS)


def inspect_pairs(recipe: Recipe, tokenizer: Any) -> DataReport:
    """Preference pairs: the prompt, the chosen and the rejected answer, as data/preference.py encodes
    them for DPO."""
    summary = build_preference_datasets(recipe.data, tokenizer, seed=recipe.training.seed).summary
    pairs = [
        pair for source, split in _sources(recipe) for pair in _pairs_of(source, split, recipe, tokenizer)
    ]
    return _report(recipe, tokenizer, summary, pairs, InspectedPair.LENGTH, (*COMMON_CHECKS, _no_signal))


def inspect_unpaired(recipe: Recipe, tokenizer: Any) -> DataReport:
    """KTO rows: each judged completion (both halves of a pair) as one sequence, loss on the completion,
    as data/unpaired.py encodes them."""
    summary = build_unpaired_datasets(recipe.data, tokenizer, seed=recipe.training.seed).summary
    rows = [row for source, split in _sources(recipe) for row in _judged_of(source, split, recipe, tokenizer)]
    return _report(recipe, tokenizer, summary, rows, InspectedRow.LENGTH, COMMON_CHECKS)


def inspect_prompts(recipe: Recipe, tokenizer: Any) -> DataReport:
    """Online RL prompts (grpo, rloo): each prompt as the trainer renders it, with the columns the rewards
    read; the checks that concern generation (where it stops, duplicates, roles, the system prompt)."""
    rl = getattr(recipe, recipe.stage)
    data = build_prompt_datasets(recipe.data, tokenizer, seed=recipe.training.seed, rewards=rl.rewards,
                                 section=recipe.stage)  # fmt: skip
    prompts = [p for source, split in _sources(recipe) for p in _prompts_of(source, split, recipe, tokenizer)]
    checks = (_generation_eos, _duplicates, _roles_out_of_order, _system_dropped)
    return _report(recipe, tokenizer, data.summary, prompts, InspectedPrompt.LENGTH, checks)


def _prompts_of(source: DataSource, split: str, recipe: Recipe, tokenizer: Any) -> list[InspectedPrompt]:
    """The prompts of one source, rendered as for training; rows training leaves out are left to the
    summary."""
    read = read_source(
        source, recipe.data, resolve_prompt_format, check_prompt_columns, to_prompt, "prompt format"
    )
    out = []
    for location, raw, row in zip(read.locations, read.rows, read.parsed, strict=True):
        try:
            ids = prompt_ids(row, tokenizer)
        except RowError:
            continue
        if len(ids) <= recipe.data.max_length:
            example = Conversation(row.prompt) if row.conversational else Completion(row.prompt, "")
            out.append(
                InspectedPrompt(location, split, raw, example, ids, row.columns, recipe.data.max_length)
            )
    return out


def _sources(recipe: Recipe) -> list[tuple[DataSource, str]]:
    data = recipe.data
    splits = [("train", data.train)]
    if isinstance(data.validation, list):
        splits.append(("validation", data.validation))
    return [(source, split) for split, sources in splits for source in sources]


def _rows_of(source: DataSource, split: str, recipe: Recipe, tokenizer: Any) -> list[InspectedRow]:
    """The rows of one source, encoded by the pipeline's own functions; malformed / empty rows are left
    to the summary (which counts them exactly as training does)."""
    read = read_source(source, recipe.data, resolve_format, check_columns, to_example)
    encoded = encode_many(read.parsed, tokenizer, completion_only_loss=recipe.data.completion_only_loss)
    out = []
    for location, raw, example, result in zip(read.locations, read.rows, read.parsed, encoded, strict=True):
        if isinstance(result, RowError):
            continue
        ids, labels = result
        out.append(InspectedRow(location, split, raw, example, ids, labels, recipe.data.max_length))
    return out


def _pairs_of(source: DataSource, split: str, recipe: Recipe, tokenizer: Any) -> list[InspectedPair]:
    """The pairs of one source, encoded and split into prompt and answers as for training; pairs that
    training leaves out are left to the summary."""
    read = read_source(
        source, recipe.data, resolve_preference_format, check_preference_columns, to_pair, "preference format"
    )
    pairs: list[PreferencePair] = read.parsed
    encoded = encode_many(
        [p.chosen for p in pairs] + [p.rejected for p in pairs], tokenizer, completion_only_loss=True
    )
    out = []
    for location, raw, pair, chosen, rejected in zip(
        read.locations, read.rows, pairs, encoded[: len(pairs)], encoded[len(pairs) :], strict=True
    ):
        if isinstance(chosen, RowError) or isinstance(rejected, RowError):
            continue
        parts = split_pair(chosen, rejected)
        if parts is not None:
            out.append(InspectedPair(location, split, raw, pair, *parts, recipe.data.max_length))
    return out


def _judged_of(source: DataSource, split: str, recipe: Recipe, tokenizer: Any) -> list[InspectedRow]:
    """The judged completions of one source, encoded as for training, each named with its label. A pair's
    two halves carry the label KTO gives each (and so are not duplicates of each other)."""
    read = read_source(source, recipe.data, resolve_unpaired_format, check_unpaired_columns, to_judged)
    judged = [
        (location, raw if len(row) == 1 else {**raw, "label": j.desirable}, j)
        for location, raw, row in zip(read.locations, read.rows, read.parsed, strict=True)
        for j in row
    ]
    encoded = encode_many([j.example for _, _, j in judged], tokenizer, completion_only_loss=True)
    out = []
    for (location, raw, j), result in zip(judged, encoded, strict=True):
        if not isinstance(result, RowError):
            ids, labels = result
            named = f"{location} ({'desirable' if j.desirable else 'undesirable'})"
            out.append(InspectedRow(named, split, raw, j.example, ids, labels, recipe.data.max_length))
    return out


def _report(
    recipe: Recipe,
    tokenizer: Any,
    summary: DataSummary,
    rows: list[Any],
    meaning: str,
    checks: tuple[Check, ...],
) -> DataReport:
    eot_id = end_of_turn_id(tokenizer, rows)
    context = _Context(recipe, tokenizer, eot_id)
    findings = [f for f in (check(rows, context) for check in checks) if f is not None]
    eot = tokenizer.convert_ids_to_tokens(eot_id) if eot_id is not None else None
    return DataReport(summary, rows, findings, eot, tokenizer, meaning)


def end_of_turn_id(tokenizer: Any, rows: list[Any]) -> int | None:
    """The token that closes an assistant answer: the first special token the chat template writes after
    an answer (<|im_end|>, <|eot_id|>, </s>), or the EOS that raw-text examples end with."""
    conversational = any(isinstance(row.example, Conversation) for row in rows)
    if conversational and tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        except Exception:  # the pipeline already refused a template that fails on this probe
            text = ""
        if _PROBE_ANSWER in text:
            after = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
            special = set(tokenizer.all_special_ids) | {
                i for i, t in tokenizer.added_tokens_decoder.items() if t.special
            }
            for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
                if token in special:
                    return int(token)
    return tokenizer.eos_token_id


# --- the checks: each returns a Finding, or None when all is well ------------------------------------------
# A check reads a row's token sequences (`row.sequences`), its `example` and `raw`, so that it works for
# every kind of row that has them; a row counts once however many sequences it has.


def _holds_end_of_turn(seq: InspectedRow, eot_id: int) -> bool:
    return eot_id in seq.input_ids[: seq.max_length] and seq.loss_tokens > 0


def _learns_end_of_turn(seq: InspectedRow, eot_id: int) -> bool:
    return any(i == eot_id and label != IGNORE for i, label in zip(seq.input_ids, seq.labels, strict=True))


def _eot_without_loss(rows: list[Any], context: _Context) -> Finding | None:
    eot_id = context.eot_id
    if eot_id is None:
        return None
    eot = context.tokenizer.convert_ids_to_tokens(eot_id)
    have = [r for r in rows if any(_holds_end_of_turn(s, eot_id) for s in r.sequences)]
    if rows and not have and not any(eot_id in s.input_ids for r in rows for s in r.sequences):
        return Finding(
            "end_of_turn_never_learned",
            f"the end of turn {eot!r} appears in no row: the model is never shown where an answer stops",
            len(rows),
            [r.location for r in rows[:SHOWN_EXAMPLES]],
        )
    unlearned = [
        r
        for r in have
        if not all(_learns_end_of_turn(s, eot_id) for s in r.sequences if _holds_end_of_turn(s, eot_id))
    ]
    if not unlearned:
        return None
    share = "any" if len(unlearned) == len(have) else f"{len(unlearned):,}"
    share = f"{share} of the {len(have):,} rows"
    return Finding(
        "end_of_turn_never_learned",
        f"the end of turn {eot!r} carries no loss in {share} that hold it: the model does not learn to stop "
        "there (check data.completion_only_loss and the template's generation markers)",
        len(unlearned),
        [r.location for r in unlearned[:SHOWN_EXAMPLES]],
    )


def _generation_eos(rows: list[Any], context: _Context) -> Finding | None:
    """generation_config.json's eos_token_id (else config.json's) must include the end of turn, or
    `generate` runs on after the answer, into a made-up next turn."""

    recipe, tokenizer, eot_id = context.recipe, context.tokenizer, context.eot_id
    if eot_id is None:
        return None
    folder = local_model_dir(recipe.base_model, recipe.model.revision, log=lambda _: None)
    eos: Any = None
    where = None
    for name in ("generation_config.json", "config.json"):
        path = folder / name if folder is not None else None
        if path is not None and path.is_file():
            try:
                eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                eos = None
            if eos is not None:
                where = name
                break
    if eos is None:
        return None
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    if eot_id in eos_ids:
        return None
    eot = tokenizer.convert_ids_to_tokens(eot_id)
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(int(i))!r} ({i})" for i in sorted(eos_ids))
    return Finding(
        "generation_eos_mismatch",
        f"the base model's {where} stops generation at {names}, but the chat template ends a turn with "
        f"{eot!r} ({eot_id}). loratool's generate, chat, eval and serve stop there as well, and merge "
        f"writes {eot_id} into the merged model's generation_config.json; nothing to do for them. Only the "
        f"base's own files, with this adapter served by another tool, would run past the answer: add "
        f"{eot_id} to its generation_config eos_token_id there",
        1,
        [str(folder / where) if folder and where else recipe.base_model],
    )


def _no_loss(rows: list[Any], context: _Context) -> Finding | None:
    never = [r for r in rows if all(label == IGNORE for s in r.sequences for label in s.labels)]
    cut = [r for r in rows if r not in never and any(s.loss_tokens == 0 for s in r.sequences)]
    if not never and not cut:
        return None
    parts = []
    if never:
        parts.append(
            f"{len(never):,} have no token that carries loss (no assistant turn, or only empty ones)"
        )
    if cut:
        parts.append(f"{len(cut):,} lose every loss token to max_length")
    return Finding(
        "all_loss_masked",
        f"rows with nothing to learn: {'; '.join(parts)}; training drops them",
        len(never) + len(cut),
        [r.location for r in (never + cut)[:SHOWN_EXAMPLES]],
    )


def _truncated(rows: list[Any], context: _Context) -> Finding | None:
    eot_id = context.eot_id
    cut = [r for r in rows if any(s.truncated for s in r.sequences)]
    if not cut:
        return None

    def lost(row: Any) -> int:
        return sum(s.loss_tokens_cut for s in row.sequences)

    total = sum(sum(label != IGNORE for label in s.labels) for r in rows for s in r.sequences)
    stops = sum(
        1 for r in cut if eot_id is not None and any(eot_id in s.labels[s.max_length :] for s in r.sequences)
    )
    longest = max(r.length for r in cut)
    limit = cut[0].max_length
    message = (
        f"{len(cut):,} rows are longer than max_length={limit:,} (longest {longest:,} tokens): "
        f"{sum(lost(r) for r in cut):,} answer tokens ({sum(lost(r) for r in cut) / max(total, 1):.1%} of all) "
        "are cut"
    )
    if stops:
        message += f", and {stops:,} rows lose the end of turn that teaches the model to stop"
    return Finding(
        "truncated",
        message,
        len(cut),
        [f"{r.location} ({r.length:,} tokens, {lost(r):,} answer tokens cut)" for r in cut[:SHOWN_EXAMPLES]],
    )


def _duplicates(rows: list[Any], context: _Context) -> Finding | None:
    first: dict[str, str] = {}
    repeats = []
    for r in rows:
        key = json.dumps(r.raw, sort_keys=True, ensure_ascii=False, default=str)
        if key in first:
            repeats.append(f"{r.location} = {first[key]}")
        else:
            first[key] = r.location
    if not repeats:
        return None
    return Finding(
        "duplicates",
        f"{len(repeats):,} rows repeat an earlier row exactly: they weigh double in training, and a copy "
        "that lands in validation measures memory, not generalization",
        len(repeats),
        repeats[:SHOWN_EXAMPLES],
    )


def _role_problem(messages: list[dict[str, Any]]) -> str | None:
    roles = [m.get("role") for m in messages]
    for i, role in enumerate(roles):
        if role == "system" and i != 0:
            return f"system message at position {i}"
    body = [(i, r) for i, r in enumerate(roles) if r != "system"]
    if body and body[0][1] not in ("user",):
        return f"starts with {body[0][1]}, not user"
    for (_, a), (j, b) in zip(body, body[1:], strict=False):
        if a == b and a in ("user", "assistant"):
            return f"two {a} turns in a row (positions {j - 1} and {j})"
        if b == "tool" and a not in ("assistant", "tool"):
            return f"tool result at position {j} does not follow an assistant call"
    return None


def _roles_out_of_order(rows: list[Any], context: _Context) -> Finding | None:
    bad = []
    for r in rows:
        if isinstance(r.example, Conversation):
            problem = _role_problem(r.example.messages)
            if problem:
                bad.append(f"{r.location}: {problem}")
    if not bad:
        return None
    return Finding(
        "roles_out_of_order",
        f"{len(bad):,} conversations have roles out of order (expected: optional system, then user and "
        "assistant alternating): many templates render them silently as something the model never sees "
        "at inference",
        len(bad),
        bad[:SHOWN_EXAMPLES],
    )


def _system_dropped(rows: list[Any], context: _Context) -> Finding | None:
    tokenizer = context.tokenizer
    dropped, with_system = [], 0
    for r in rows:
        if not isinstance(r.example, Conversation):
            continue
        systems = [m for m in r.example.messages if m.get("role") == "system" and m.get("content")]
        if not systems:
            continue
        with_system += 1
        try:
            text = render_conversation(r.example, tokenizer)[0]
        except Exception:  # rows the template rejects were reported by the pipeline
            continue
        if any(str(m["content"]).strip() not in text for m in systems):
            dropped.append(r.location)
    if not dropped:
        return None
    return Finding(
        "system_prompt_dropped",
        f"the chat template drops the system prompt of {len(dropped):,} of {with_system:,} rows that have "
        "one: the model is trained without it; choose a template that renders system messages "
        "(data.chat_template: chatml or llama3)",
        len(dropped),
        dropped[:SHOWN_EXAMPLES],
    )


def _no_signal(pairs: list[InspectedPair], context: _Context) -> Finding | None:
    """Pairs whose rejected answer is empty or the same as the chosen one: a DPO gradient of zero."""
    empty = [p for p in pairs if p.no_signal]
    if not empty:
        return None
    return Finding(
        "pairs_without_signal",
        f"{len(empty):,} of {len(pairs):,} pairs carry no preference signal (the rejected answer is empty, "
        "or the same as the chosen one): DPO learns nothing from them",
        len(empty),
        [f"{p.location}: {p.no_signal}" for p in empty[:SHOWN_EXAMPLES]],
    )


# The checks every kind of row gets; an inspector adds its own (inspect_pairs: _no_signal).
COMMON_CHECKS: tuple[Check, ...] = (
    _eot_without_loss,
    _generation_eos,
    _no_loss,
    _truncated,
    _duplicates,
    _roles_out_of_order,
    _system_dropped,
)


# --- rendering -----------------------------------------------------------------------------------------


def token_runs(
    row: InspectedRow, tokenizer: Any, start: int = 0, stop: int | None = None
) -> list[tuple[str, str]]:
    """The row (tokens [start, stop) of it) as (kind, text) runs: kind is `loss` (carries loss),
    `context` (no loss) or `cut` (past max_length: never seen in training). Runs are decoded whole, so
    multi-byte characters stay intact."""
    stop = len(row.labels) if stop is None else stop
    kinds = [
        "cut" if i >= row.max_length else "loss" if row.labels[i] != IGNORE else "context"
        for i in range(start, stop)
    ]
    runs: list[tuple[str, str]] = []
    first = 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[first]:
            text = tokenizer.decode(row.input_ids[start + first : start + i], skip_special_tokens=False)
            runs.append((kinds[first], text))
            first = i
    return runs


def part_runs(part: Part, tokenizer: Any) -> list[tuple[str, str]]:
    return token_runs(part.sequence, tokenizer, part.start, part.stop)


_ANSI = {"loss": "\x1b[1;32m", "context": "\x1b[2m", "cut": "\x1b[9;31m"}
_RESET = "\x1b[0m"


def format_row(row: Inspected, tokenizer: Any, *, color: bool) -> str:
    """A header line, then each part of the row (a pair: `prompt:`, `chosen:`, `rejected:`) as text with
    the tokens that carry loss marked."""
    lines = [f"── {row.location} ({row.split}) · {row.describe()}"]
    for part in row.parts():
        shown = []
        for kind, text in part_runs(part, tokenizer):
            if color:
                shown.append(f"{_ANSI[kind]}{text}{_RESET}")
            elif kind == "loss":
                shown.append(f"[[{text}]]")
            elif kind == "cut":
                shown.append(f"✂{text}")
            else:
                shown.append(text)
        lines.append((f"{part.name}: " if part.name else "") + "".join(shown))
    return "\n".join(lines)


def histogram_lines(lengths: list[int], max_length: int, bins: int = 10, width: int = 40) -> list[str]:
    """A text histogram of token lengths."""
    if not lengths:
        return []
    low, top = min(lengths), max(lengths)
    step = max(1, -(-(top - low + 1) // bins))
    bins = -(-(top - low + 1) // step)
    counts = Counter(min((n - low) // step, bins - 1) for n in lengths)
    most = max(counts.values())
    lines = []
    for b in range(bins):
        lo, hi = low + b * step, min(low + (b + 1) * step - 1, top)
        bar = "█" * round(width * counts.get(b, 0) / most)
        over = " > max_length" if lo > max_length else ""
        lines.append(f"  {lo:>7,}-{hi:<7,} {counts.get(b, 0):>7,} {bar}{over}")
    return lines


def format_report(report: DataReport, *, rows: int, color: bool) -> str:
    lines = [report.summary.format(), ""]
    lengths = report.lengths()
    if lengths:
        ordered = sorted(lengths)
        median = ordered[len(ordered) // 2]
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        lines.append(
            f"lengths ({report.length_meaning}, before max_length={report.summary.max_length:,}): "
            f"median {median:,} · "
            f"95th percentile {p95:,} · longest {ordered[-1]:,}"
        )
        lines += histogram_lines(lengths, report.summary.max_length)
        lines.append("")
    legend = (
        f"{_ANSI['loss']}carries loss{_RESET} · {_ANSI['context']}no loss{_RESET} · "
        f"{_ANSI['cut']}cut by max_length{_RESET}"
        if color
        else "[[carries loss]] · no loss · ✂cut by max_length"
    )
    shown = report.rows[:rows]
    if shown:
        if report.length_meaning == InspectedPrompt.LENGTH:  # online RL: nothing of a prompt carries loss
            lines.append(
                f"first {len(shown)} prompts as the model is prompted with them (it answers after each):"
            )
        else:
            lines.append(f"first {len(shown)} rows as training tokenizes them ({legend}):")
        for row in shown:
            lines += [format_row(row, report.tokenizer, color=color), ""]
    if report.end_of_turn:
        lines.append(f"end of turn: {report.end_of_turn!r}")
    if report.findings:
        lines.append(f"{len(report.findings)} warning{'s' if len(report.findings) > 1 else ''}:")
        for f in report.findings:
            lines.append(f"  warning: {f.message}")
            lines += [f"    e.g. {example}" for example in f.examples]
    else:
        lines.append("checks: no problem found")
    return "\n".join(lines)


def length_histogram_png(report: DataReport, path: Path | None = None) -> bytes:
    """The token-length histogram as a PNG (written to `path` when given), with max_length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    lengths = report.lengths()
    ax.hist(lengths or [0], bins=min(50, max(5, len(set(lengths)))), color="#4a7ab5")
    ax.axvline(report.summary.max_length, color="#c0392b", linestyle="--", label="data.max_length")
    ax.set_xlabel(f"{report.length_meaning} (before max_length)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    png = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(png)
    return png


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
pre.summary { background: #f6f6f6; padding: 1em; overflow-x: auto; }
.row { border: 1px solid #ddd; border-radius: 4px; margin: 1em 0; }
.row h3 { margin: 0; padding: .4em .8em; background: #f0f0f0; font-size: .9em; font-weight: normal; }
.row pre { margin: 0; padding: .8em; white-space: pre-wrap; word-break: break-word; }
.loss { background: #c8f0c8; color: #064006; font-weight: bold; }
.context { color: #777; }
.cut { color: #b22; text-decoration: line-through; }
.warning { color: #8a4b00; }
.part { display: block; color: #555; font-size: .8em; font-weight: bold; }
"""


def to_html(report: DataReport, *, rows: int) -> str:
    """A self-contained HTML page (inline CSS, the histogram as a data URI) to share the inspection."""
    esc = html.escape
    png = base64.b64encode(length_histogram_png(report)).decode()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>loratool data</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Training data, as the model sees it</h1>",
        "<p><span class='loss'>carries loss</span> · <span class='context'>no loss</span> · "
        "<span class='cut'>cut by max_length</span></p>",
        f"<pre class='summary'>{esc(report.summary.format())}</pre>",
        f"<img alt='token lengths' src='data:image/png;base64,{png}'>",
        "<h2>Checks</h2>",
    ]
    if report.findings:
        parts.append("<ul>")
        for f in report.findings:
            examples = "".join(f"<li>{esc(e)}</li>" for e in f.examples)
            parts.append(f"<li class='warning'>{esc(f.message)}<ul>{examples}</ul></li>")
        parts.append("</ul>")
    else:
        parts.append("<p>No problem found.</p>")
    parts.append(f"<h2>First {min(rows, len(report.rows))} rows</h2>")
    for row in report.rows[:rows]:
        shown = []
        for part in row.parts():
            label = f"<span class='part'>{esc(part.name)}</span>" if part.name else ""
            runs = part_runs(part, report.tokenizer)
            body = "".join(f"<span class='{kind}'>{esc(text)}</span>" for kind, text in runs)
            shown.append(f"<pre>{label}{body}</pre>")
        parts.append(
            f"<div class='row'><h3>{esc(row.location)} · {esc(row.describe())}</h3>{''.join(shown)}</div>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)
