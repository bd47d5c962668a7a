"""Rewards as metrics of `loratool eval`: the functions an online RL run maximizes, scored on the answers
eval generated, so that base -> SFT -> RL can be compared on what RL was trained for.

Which rewards: every `--reward` given on the command line, then the rewards of each GRPO / RLOO run
evaluated (its recipe's `rewards`, the same code training scored with: train/rewards.py), once each. A
run's own Python-function reward is named but not run unless `--reward` asks for it (a run directory
may come from someone else), and one that cannot load (its reward-model run is gone) is skipped with a
warning.

What a reward sees, per held-out row: the answer (text, and its token ids without the end of turn), the
prompt (the row's `prompt` column when it has one, as GRPO passes it; else the conversation before the
answer, or the text prompt), and the row's columns as read from the file, plus `reference`, the answer
eval compares with. A reward that compares with a column the rows lack (`exact_match: answer` on alpaca
rows) is compared with `reference` instead, and eval says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from loratool.data.formats import Completion, Conversation, RowError, resolve_format, to_example
from loratool.data.sources import open_source
from loratool.errors import LoratoolError
from loratool.recipe import DataSource, RewardFunction
from loratool.train.rewards import Reward, load_reward, score_all

if TYPE_CHECKING:
    from loratool.generate.target import Target

REFERENCE = "reference"  # the column every reward can read: the answer eval compares with


def parse_reward_option(spec: str) -> RewardFunction:
    """`--reward SPEC`: `KIND=VALUE` (exact_match=answer, regex=..., length=30, function=file.py:name,
    model=RUN_DIR), a bare `valid_json`, or a YAML mapping with the recipe's keys ('{number: answer,
    tolerance: 0.01, weight: 2}')."""
    text = spec.strip()
    if text.startswith("{"):
        try:
            fields = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise _bad(spec, f"not a YAML mapping ({str(exc).splitlines()[0]})") from None
        if not isinstance(fields, dict):
            raise _bad(spec, "not a YAML mapping")
    elif "=" in text:
        kind, _, value = text.partition("=")
        fields = {kind.strip(): _scalar(value) if kind.strip() in ("length", "valid_json") else value}
    else:
        fields = {text: True}
    for key in ("function", "model"):  # given on the command line: relative to the current directory
        if isinstance(fields.get(key), str):
            fields[key] = _absolute(fields[key], key)
    try:
        return RewardFunction.model_validate(fields)
    except ValidationError as exc:
        problem = "; ".join(
            f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise _bad(spec, problem) from None


def _scalar(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _absolute(value: str, key: str) -> str:
    if key == "function":
        file, _, name = value.rpartition(":")
        return f"{Path(file).expanduser().absolute()}:{name}" if file else value
    return str(Path(value).expanduser().absolute())


def _bad(spec: str, problem: str) -> LoratoolError:
    return LoratoolError(
        f"--reward {spec!r}: {problem}",
        hint="give KIND=VALUE (exact_match=answer, number=answer, regex=PATTERN, length=TOKENS, "
        "function=file.py:name, model=REWARD_RUN), valid_json, or a YAML mapping with a recipe reward's "
        "keys, e.g. '{number: answer, tolerance: 0.5, weight: 2}'",
    )


def eval_rewards(specs: list[str], targets: list[Target], log: Callable[[str], None]) -> list[Reward]:
    """The rewards to score with: the --reward options, then each online RL run's own (a reward the
    command line or an earlier run already gives, under the same name and settings, counts once)."""
    chosen: list[Reward] = []
    seen: dict[str, RewardFunction] = {}

    def add(reward: RewardFunction, key: str) -> None:
        name = reward.logged_name()
        if name in seen:
            if seen[name] != reward:
                raise LoratoolError(
                    f"two different rewards are named {name!r} ({key}, and one given earlier)",
                    hint="give the --reward a name of its own: '{exact_match: answer, name: my_match}'",
                )
            return
        seen[name] = reward
        chosen.append(load_reward(reward, key))  # a missing function file fails here, named

    for spec in specs:
        add(parse_reward_option(spec), f"--reward {spec}")
    for target in targets:
        recipe = target.recipe
        if recipe is None or recipe.stage not in ("grpo", "rloo"):
            continue
        section = getattr(recipe, recipe.stage)
        for i, reward in enumerate(section.rewards):
            key = f"{target.name}'s {recipe.stage}.rewards.{i}"
            if reward.function is not None and reward.logged_name() not in seen:
                # A run directory may come from someone else: eval runs no code it was not asked to.
                log(
                    f"note: {key} (function {reward.function}) is not scored: eval runs a reward's Python "
                    f"file only when asked — add --reward function={reward.function} to score it"
                )
                continue
            try:
                add(reward, key)
            except LoratoolError as exc:  # e.g. its reward-model run is gone: the other numbers still count
                log(f"warning: {key} is not scored: {exc.message}")
    if chosen:
        log("rewards scored as metrics: " + ", ".join(f"{r.name} ({r.key})" for r in chosen))
    return chosen


# --- what the rewards read -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardInputs:
    """Per evaluated row: the prompt as a reward is given it, and every column (one value per row)."""

    prompts: list[Any]
    columns: dict[str, list[Any]]


def reward_inputs(
    files: list[Path], references: list[str], complete: list[bool], rendered: list[str]
) -> RewardInputs:
    """The rows of `files` that the evaluated rows came from, matched in order by their reference answer
    (rows the data build dropped, e.g. too long, are skipped; `complete` False: the reference was cut at
    max_length, so it is matched as the start of the row's answer). No file (a fraction split off the
    training rows): only `reference`, and the rendered prompts."""
    rows: list[dict[str, Any]] = []
    for file in files:
        read, _ = open_source(DataSource(path=str(file)))
        rows += [row.data for row in read if row.data is not None]
    matched: list[dict[str, Any] | None] = []
    at = 0
    for reference, whole in zip(references, complete, strict=True):
        found = next((j for j in range(at, len(rows)) if _holds(rows[j], reference.strip(), whole)), None)
        if found is None:  # not in the file as read: keep the row without columns rather than shift others
            matched.append(None)
            continue
        matched.append(rows[found])
        at = found + 1
    keys = sorted({key for row in matched if row for key in row} - {REFERENCE})
    columns = {key: [row.get(key) if row else None for row in matched] for key in keys}
    columns[REFERENCE] = list(references)
    prompts = [_prompt(row, text) for row, text in zip(matched, rendered, strict=True)]
    return RewardInputs(prompts, columns)


def _holds(row: dict[str, Any], reference: str, whole: bool) -> bool:
    return any(s.strip() == reference if whole else s.strip().startswith(reference) for s in _strings(row))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _prompt(row: dict[str, Any] | None, rendered: str) -> Any:
    """What GRPO would pass as the prompt: the row's `prompt` column, else the conversation before the
    answer (the text prompt of a completion row), else the prompt as the model saw it."""
    if row is None:
        return rendered
    if "prompt" in row:
        return row["prompt"]
    source = DataSource(path="eval")
    try:
        example = to_example(row, resolve_format(source, row), source)
    except (RowError, LoratoolError, KeyError):
        return rendered
    if isinstance(example, Completion):
        return example.prompt
    if isinstance(example, Conversation):
        last = max((i for i, m in enumerate(example.messages) if m.get("role") == "assistant"), default=None)
        return example.messages[:last] if last else rendered
    return rendered


# --- scoring -------------------------------------------------------------------------------------------


def score_answers(
    rewards: list[Reward], answers: list[str], answer_ids: list[list[int]], inputs: RewardInputs
) -> dict[str, dict[str, float | int]]:
    """Each reward's mean and spread over the answers (a None score is left out, as trl does), and the
    weighted sum the run maximized (`reward`) when there are several."""
    if not rewards:
        return {}
    scored: dict[str, list[float]] = {}
    for reward in rewards:
        scored[reward.name] = score_all(reward, answers, answer_ids, inputs.prompts, inputs.columns)
    out = {name: _spread(values) for name, values in scored.items()}
    if len(rewards) > 1:
        total = [
            sum(r.weight * scored[r.name][i] for r in rewards if not math.isnan(scored[r.name][i]))
            for i in range(len(answers))
        ]
        out["reward"] = _spread(total)
    return out


def with_fallbacks(rewards: list[Reward], inputs: RewardInputs, log: Callable[[str], None]) -> RewardInputs:
    """A reward comparing with a column the rows lack compares with the reference answer instead."""
    columns = dict(inputs.columns)
    for reward in rewards:
        column = reward.column
        if column is None or any(v is not None for v in columns.get(column, [])):
            continue
        columns[column] = columns[REFERENCE]
        log(
            f"reward {reward.name}: the rows have no {column!r} column; it compares with the reference answer"
        )
    return RewardInputs(inputs.prompts, columns)


def _spread(values: list[float]) -> dict[str, float | int]:
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return {"mean": math.nan, "std": math.nan, "scored": 0}
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / len(kept))
    return {"mean": mean, "std": std, "scored": len(kept)}
