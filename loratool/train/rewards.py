"""The rewards of an online RL run (`grpo:` / `rloo:` `rewards`): each completion's scores.

Built-in verifiable rewards (exact match and a number against a reference column of the row, a regex or
JSON format check, a length target), a Python function loaded from a file the recipe names, and a
reward model (a finished loratool `reward` run). `load_rewards` turns the recipe's list into `Reward`s:
a name, a weight and `score(completions, completion_ids, prompts, columns) -> one float per completion`,
so that `loratool eval` can score generations with the same code. `trl_reward_funcs` wraps them as trl's
trainers call reward functions, checking what each returns.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.data.formats import Completion, Conversation
from loratool.data.prompts import as_number, last_number
from loratool.data.tokenize import encode_many
from loratool.errors import LoratoolError
from loratool.model import hardware
from loratool.model.load import load_model
from loratool.recipe import validate_recipe
from loratool.rundir.records import read_run

if TYPE_CHECKING:
    from loratool.recipe import RewardFunction

# score(completions, completion_ids, prompts, columns): columns maps each data column to its values, one
# per completion; returns one float (or None: does not apply) per completion.
Score = Callable[[list[str], list[list[int]], list[Any], dict[str, list[Any]]], list[float | None]]


@dataclass(frozen=True)
class Reward:
    """One reward, ready to score: logged as rewards/<name>/mean, counted `weight` times in the sum."""

    name: str
    weight: float
    score: Score
    key: str  # where the recipe sets it, e.g. grpo.rewards.0
    column: str | None = None  # the data column it compares with (exact_match, number), if any


def load_rewards(rewards: Sequence[RewardFunction], section: str) -> list[Reward]:
    """The recipe's rewards (`section`: grpo or rloo) as Rewards. A Python function's file is loaded
    here: a missing file or function is a LoratoolError naming the reward."""
    return [load_reward(reward, f"{section}.rewards.{i}") for i, reward in enumerate(rewards)]


def load_reward(reward: RewardFunction, key: str) -> Reward:
    """One reward as a Reward; `key` names where it was given, in its errors."""
    if reward.function is not None:
        score = _user_function(reward.function, key)
    elif reward.model is not None:
        score = _reward_model(reward.model, key)
    else:
        score = _built_in(reward)
    return Reward(reward.logged_name(), reward.weight, score, key, reward.reference_column())


def _built_in(reward: RewardFunction) -> Score:
    """The built-in reward the recipe names, as a Score."""
    if reward.exact_match is not None:
        column = reward.exact_match
        return lambda completions, ids, prompts, columns: exact_match(completions, columns[column])
    if reward.number is not None:
        column, tolerance = reward.number, reward.tolerance
        return lambda completions, ids, prompts, columns: number_match(
            completions, columns[column], tolerance
        )
    if reward.regex is not None:
        pattern = re.compile(reward.regex, re.DOTALL)
        return lambda completions, ids, prompts, columns: regex_match(completions, pattern)
    if reward.length is not None:
        target = reward.length
        return lambda completions, ids, prompts, columns: length_penalty(ids, target)
    return lambda completions, ids, prompts, columns: valid_json(completions)


# --- the built-in rewards ----------------------------------------------------------------------------------


def exact_match(completions: list[str], references: list[Any]) -> list[float]:
    """1.0 where the completion equals its reference, both stripped of surrounding whitespace."""
    return [float(c.strip() == str(r).strip()) for c, r in zip(completions, references, strict=True)]


def number_match(completions: list[str], references: list[Any], tolerance: float = 0.0) -> list[float]:
    """1.0 where the completion's last number is within `tolerance` of its reference number."""
    scores = []
    for completion, reference in zip(completions, references, strict=True):
        got, want = last_number(completion), as_number(reference)
        scores.append(float(got is not None and want is not None and abs(got - want) <= tolerance))
    return scores


def regex_match(completions: list[str], pattern: re.Pattern[str]) -> list[float]:
    """1.0 where the whole stripped completion matches `pattern`."""
    return [float(pattern.fullmatch(c.strip()) is not None) for c in completions]


def valid_json(completions: list[str]) -> list[float]:
    """1.0 where the stripped completion is one JSON value."""
    scores = []
    for completion in completions:
        try:
            json.loads(completion.strip())
            scores.append(1.0)
        except ValueError:
            scores.append(0.0)
    return scores


def length_penalty(completion_ids: list[list[int]], target: int) -> list[float]:
    """0 at `target` tokens, falling linearly to -1 at no tokens and at twice the target (and beyond)."""
    return [max(-1.0, -abs(len(ids) - target) / target) for ids in completion_ids]


# --- your own function -------------------------------------------------------------------------------------


def _user_function(spec: str, key: str) -> Score:
    """`file.py:name` loaded from that file, called as the schema documents (RewardFunction.function)."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    given_here = key.startswith("--")  # a command-line option (eval --reward), not a recipe key
    where = key if given_here else f"{key}.function"
    if not path.is_file():
        raise LoratoolError(
            f"{where}: no Python file at {path.resolve()}",
            hint="give the path of your reward file, relative to the current directory "
            "(--reward function=rewards.py:my_reward)"
            if given_here
            else "give the path of your reward file, relative to the recipe's directory "
            "(function: rewards.py:my_reward)",
        )
    module_name = f"loratool_reward_{abs(hash(str(path.resolve())))}"
    spec_obj = importlib.util.spec_from_file_location(module_name, path)
    assert spec_obj is not None and spec_obj.loader is not None
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec_obj.loader.exec_module(module)
    except Exception as exc:  # whatever the user's file raises while it is imported
        sys.modules.pop(module_name, None)
        raise LoratoolError(
            f"{where}: importing {path} failed: {type(exc).__name__}: {exc}",
            hint="fix the file (run `python " + str(path) + "` to see the error in full)",
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise LoratoolError(
            f"{where}: {path} has no function {name!r}"
            + (" (it is not callable)" if hasattr(module, name) else ""),
            hint=f"functions in that file: {', '.join(found) or 'none'}",
        )

    def score(
        completions: list[str], completion_ids: list[list[int]], prompts: list[Any], columns: dict[str, list]
    ) -> list[float | None]:
        return function(completions=completions, prompts=prompts, completion_ids=completion_ids, **columns)

    return score


def checked_scores(reward: Reward, scores: Any, count: int) -> list[float]:
    """What a reward returned, as `count` floats (None -> NaN: trl leaves it out of that reward's mean),
    or a LoratoolError naming the reward and what is wrong with it."""
    where = f"reward {reward.name!r} ({reward.key})"
    hint = f"a reward returns one number (or None) per completion, in order: a list of {count} floats"
    if hasattr(scores, "tolist") and not isinstance(scores, list):  # a numpy array or torch tensor
        scores = scores.tolist()
    if not isinstance(scores, list | tuple):
        raise LoratoolError(f"{where} returned {type(scores).__name__}, not a list of numbers", hint=hint)
    if len(scores) != count:
        raise LoratoolError(f"{where} returned {len(scores)} scores for {count} completions", hint=hint)
    out = []
    for i, value in enumerate(scores):
        if value is None:
            out.append(math.nan)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LoratoolError(
                f"{where}: score {i} is {value!r} ({type(value).__name__}), not a number", hint=hint
            )
        if not math.isfinite(value):
            raise LoratoolError(
                f"{where}: score {i} is {value}, not a finite number",
                hint="return None for a completion the reward does not apply to",
            )
        out.append(float(value))
    return out


def score_all(
    reward: Reward,
    completions: list[str],
    completion_ids: list[list[int]],
    prompts: list[Any],
    columns: dict[str, list[Any]],
) -> list[float]:
    """The reward's checked scores; an exception it raises becomes a LoratoolError naming it."""
    try:
        scores = reward.score(completions, completion_ids, prompts, columns)
    except LoratoolError:
        raise
    except Exception as exc:  # the user's function may raise anything
        raise LoratoolError(
            f"reward {reward.name!r} ({reward.key}) raised {type(exc).__name__}: {exc}",
            hint="fix the reward function; it is called with completions=, prompts=, completion_ids= and "
            "each data column as a keyword argument (accept **kwargs for the ones it does not use)",
        ) from None
    return checked_scores(reward, scores, len(completions))


# --- a reward model ----------------------------------------------------------------------------------------


def _reward_model(path: str, key: str) -> Score:
    """A finished `reward` run scoring prompt + completion, encoded as its training pairs were (its own
    tokenizer and chat template; a chat prompt gets the completion as the assistant's answer). Checked
    now; the model loads at the first score, onto the training device."""
    run_dir = reward_run(path, f"{key}.model")
    loaded: list[Any] = []

    def score(
        completions: list[str], completion_ids: list[list[int]], prompts: list[Any], columns: dict[str, list]
    ) -> list[float | None]:
        if not loaded:
            loaded.extend(load_reward_run(run_dir))
        model, tokenizer, max_length = loaded
        return score_texts(model, tokenizer, max_length, prompts, completions)

    return score


def reward_run(path: str, key: str) -> Path:
    """The run directory `path` names, checked to be a finished loratool run of a reward model."""
    run_dir = Path(path).expanduser().resolve()
    record = read_run(run_dir) if run_dir.is_dir() else None
    hint = "point it at the training.output_dir of a finished `loratool train` run with a `reward` section"
    if record is None:
        raise LoratoolError(f"{key}: {run_dir} is not a loratool run directory", hint=hint)
    if record.stage != "reward":
        raise LoratoolError(
            f"{key}: {run_dir} is a {record.stage or 'sft'} run, not a reward model", hint=hint
        )
    if not record.complete or not (run_dir / "adapter_config.json").is_file():
        raise LoratoolError(
            f"{key}: the reward run in {run_dir} did not finish (status: {record.status})", hint=hint
        )
    return run_dir


def load_reward_run(run_dir: Path) -> tuple[Any, Any, int]:
    """The reward run's base with its score head and adapter (AutoModelForSequenceClassification + PEFT),
    in eval mode on this machine's device, its tokenizer and its data.max_length."""
    from peft import PeftModel  # deferred: peft and transformers load torch
    from transformers import AutoTokenizer

    record = read_run(run_dir)
    assert record is not None
    recipe = validate_recipe(record.recipe_dict() or {}, source=str(run_dir / "recipe.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hw = hardware.detect()
    base = load_model(recipe, hw, lambda _: None)
    base.config.pad_token_id = tokenizer.pad_token_id  # the head scores the last token that is not padding
    if not recipe.is_quantized():
        base = base.to(hw.device)
    model = PeftModel.from_pretrained(base, run_dir).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer, recipe.data.max_length


def score_texts(
    model: Any, tokenizer: Any, max_length: int, prompts: list[Any], completions: list[str], batch: int = 8
) -> list[float | None]:
    """The reward model's score of each prompt + completion, as its training pairs were encoded."""
    import torch  # deferred: torch is heavy

    examples = [
        Conversation([*prompt, {"role": "assistant", "content": completion}])
        if isinstance(prompt, list)
        else Completion(str(prompt), completion)
        for prompt, completion in zip(prompts, completions, strict=True)
    ]
    encoded = encode_many(examples, tokenizer, completion_only_loss=True)
    sequences = [result[0][:max_length] if isinstance(result, tuple) else None for result in encoded]
    pad, device = tokenizer.pad_token_id, next(model.parameters()).device
    scores: list[float | None] = [None] * len(sequences)  # a pair the template rejects: not scored
    kept = [i for i, s in enumerate(sequences) if s]
    for start in range(0, len(kept), batch):
        chunk = kept[start : start + batch]
        width = max(len(sequences[i]) for i in chunk)  # type: ignore[arg-type]
        ids = [sequences[i] + [pad] * (width - len(sequences[i])) for i in chunk]  # type: ignore[operator]
        mask = [[1] * len(sequences[i]) + [0] * (width - len(sequences[i])) for i in chunk]  # type: ignore[arg-type]
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                use_cache=False,
            ).logits
        for i, value in zip(chunk, logits[:, 0].float().cpu().tolist(), strict=True):
            scores[i] = value
    return scores


# --- as trl's trainers call reward functions ---------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """A completion as trl hands it: text, or (conversational prompts) a list of one assistant message."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def trl_reward_funcs(rewards: list[Reward], column: str) -> list[Callable[..., list[float]]]:
    """One function per reward, as GRPOTrainer / RLOOTrainer call them (prompts=, completions=,
    completion_ids=, and each dataset column as a keyword). `column` holds each row's other data columns
    as JSON (data/prompts.py). Each function is named after its reward: trl logs rewards/<__name__>/mean."""

    def wrap(reward: Reward) -> Callable[..., list[float]]:
        def reward_function(
            prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **kwargs: Any
        ) -> list[float]:
            rows = [json.loads(text) for text in kwargs[column]]
            names = list(dict.fromkeys(name for row in rows for name in row))
            columns = {name: [row.get(name) for row in rows] for name in names}
            texts = [completion_text(c) for c in completions]
            return score_all(reward, texts, [list(ids) for ids in completion_ids], prompts, columns)

        reward_function.__name__ = reward.name
        reward_function.__qualname__ = reward.name
        return reward_function

    return [wrap(reward) for reward in rewards]
