"""Rewards as eval metrics (eval/reward_metrics.py) and the checks of a comparison of several TARGETs
(eval/compare.py) that need no model: the --reward forms, which file row each evaluated row came from,
the reference fallback, the weighted sum, unique column names and the same-rows rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loratool.errors import LoratoolError
from loratool.eval.compare import column_names, same_rows
from loratool.eval.reward_metrics import (
    REFERENCE,
    eval_rewards,
    parse_reward_option,
    reward_inputs,
    score_answers,
    with_fallbacks,
)
from loratool.generate.target import Target


@pytest.mark.parametrize(
    ("spec", "kind", "value"),
    [
        ("exact_match=answer", "exact_match", "answer"),
        ("number=total", "number", "total"),
        ("regex=name=.+; qty=\\d+", "regex", "name=.+; qty=\\d+"),  # only the first = splits
        ("length=30", "length", 30),
        ("valid_json", "valid_json", True),
        ("{number: answer, tolerance: 0.5, weight: 2}", "number", "answer"),
    ],
)
def test_reward_option_forms(spec, kind, value):
    reward = parse_reward_option(spec)
    assert reward.kind == kind and getattr(reward, kind) == value
    if spec.startswith("{"):
        assert reward.tolerance == 0.5 and reward.weight == 2


def test_a_function_reward_on_the_command_line_is_read_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reward = parse_reward_option("function=mine.py:score")
    assert reward.function == f"{tmp_path / 'mine.py'}:score"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("bogus=1", "bogus"),  # unknown kind: the schema names the key
        ("length=-3", "length"),
        ("{exact_match: a, regex: b}", "exactly one"),
        ("{exact_match: [", "not a YAML mapping"),
        ("function=nofile", "file.py:function"),
    ],
)
def test_a_bad_reward_option_says_what_and_how(spec, says):
    with pytest.raises(LoratoolError) as err:
        parse_reward_option(spec)
    assert says in err.value.message and f"--reward {spec!r}" in err.value.message
    assert "KIND=VALUE" in (err.value.hint or "")


def test_a_missing_reward_function_file_is_named_before_anything_loads(tmp_path):
    with pytest.raises(LoratoolError) as err:
        eval_rewards([f"function={tmp_path / 'gone.py'}:score"], [], print)
    assert "gone.py" in err.value.message and "--reward" in err.value.message


def test_two_different_rewards_under_one_name_are_refused():
    with pytest.raises(LoratoolError) as err:
        eval_rewards(["exact_match=answer", "{exact_match: ticket}"], [], print)
    assert "exact_match" in err.value.message and "name" in (err.value.hint or "")
    same = eval_rewards(["exact_match=answer", "exact_match=answer"], [], print)
    assert [r.name for r in same] == ["exact_match"]  # the same reward twice counts once


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_evaluated_row_gets_the_columns_of_the_file_row_it_came_from(tmp_path):
    file = write_rows(
        tmp_path / "held.jsonl",
        [
            {"instruction": "Add.", "input": "2+2", "output": "4", "answer": 4},
            {"instruction": "Add.", "input": "a very long row the build dropped", "output": "dropped", "answer": 0},
            {"prompt": [{"role": "user", "content": "Add 3+3."}], "completion": "6", "answer": 6},
            {"instruction": "Spell.", "input": "cat", "output": "c-a-t, which is a long answer", "answer": 9},
        ],
    )  # fmt: skip
    # Rows 0, 2 and 3 were evaluated (row 1 dropped); row 3's reference was cut at max_length.
    inputs = reward_inputs([file], ["4", "6", "c-a-t, which"], [True, True, False], ["r0", "r2", "r3"])
    assert inputs.columns["answer"] == [4, 6, 9]
    assert inputs.columns["input"] == ["2+2", None, "cat"]
    assert inputs.columns[REFERENCE] == ["4", "6", "c-a-t, which"]
    # The prompt: the row's own `prompt` column, else the conversation before the answer.
    assert inputs.prompts[1] == [{"role": "user", "content": "Add 3+3."}]
    assert inputs.prompts[0] == [{"role": "user", "content": "Add.\n\n2+2"}]


def test_a_row_not_found_in_the_file_keeps_the_others_in_place(tmp_path):
    file = write_rows(
        tmp_path / "held.jsonl",
        [{"prompt": "p", "completion": "a", "k": 1}, {"prompt": "q", "completion": "b", "k": 2}],
    )
    inputs = reward_inputs([file], ["zzz", "b"], [True, True], ["rendered 0", "rendered 1"])
    assert inputs.columns["k"] == [None, 2] and inputs.prompts == ["rendered 0", "q"]


def test_rewards_score_answers_with_the_reference_when_the_column_is_missing(tmp_path):
    messages: list[str] = []
    rewards = eval_rewards(["exact_match=answer", "{length: 4, weight: 0.5}"], [], messages.append)
    inputs = reward_inputs([], ["yes", "no", "maybe"], [True] * 3, ["p"] * 3)
    inputs = with_fallbacks(rewards, inputs, messages.append)
    assert any("no 'answer' column" in m for m in messages)
    got = score_answers(rewards, ["yes", "nope", "maybe"], [[1, 2, 3, 4], [1, 2], [1] * 8], inputs)
    assert got["exact_match"] == {
        "mean": pytest.approx(2 / 3),
        "std": pytest.approx(math.sqrt(2 / 9)),
        "scored": 3,
    }
    lengths = [0.0, -0.5, -1.0]
    assert got["length"]["mean"] == pytest.approx(sum(lengths) / 3)
    total = [1 + 0.5 * lengths[0], 0 + 0.5 * lengths[1], 1 + 0.5 * lengths[2]]
    assert got["reward"]["mean"] == pytest.approx(sum(total) / 3)  # the weighted sum, as RL maximizes it


def test_a_reward_function_that_raises_or_returns_the_wrong_shape_is_named(tmp_path):
    file = tmp_path / "rewards.py"
    file.write_text(
        "def boom(completions, **kw):\n    raise ValueError('bad')\n\ndef short(completions, **kw):\n    return [1.0]\n"
    )
    inputs = reward_inputs([], ["a", "b"], [True, True], ["p", "p"])
    for name, says in (("boom", "raised ValueError: bad"), ("short", "returned 1 scores for 2 completions")):
        rewards = eval_rewards([f"function={file}:{name}"], [], print)
        with pytest.raises(LoratoolError) as err:
            score_answers(rewards, ["a", "b"], [[1], [2]], inputs)
        assert says in err.value.message and name in err.value.message


def test_a_function_reward_reads_the_rows_columns(tmp_path):
    file = tmp_path / "rewards.py"
    file.write_text(
        "def close(completions, answer, reference, **kw):\n    return [float(c == str(a)) for c, a in zip(completions, answer)]\n"
    )
    data = write_rows(
        tmp_path / "held.jsonl",
        [
            {"prompt": "1+1", "completion": "2", "answer": 2},
            {"prompt": "2+2", "completion": "4", "answer": 4},
        ],
    )
    inputs = reward_inputs([data], ["2", "4"], [True, True], ["p", "p"])
    rewards = eval_rewards([f"function={file}:close"], [], print)
    assert score_answers(rewards, ["2", "5"], [[1], [1]], inputs)["close"]["mean"] == 0.5


def test_column_names_are_the_targets_names_made_unique(tmp_path):
    targets = [
        Target("run", tmp_path / "a" / "run"),
        Target("run", tmp_path / "b" / "run"),
        Target("run", tmp_path / "base"),
    ]
    assert column_names(targets, compare_base=True) == ["run", "run-2", "base-2"]
    assert column_names(targets, compare_base=False) == ["run", "run-2", "base"]
    assert column_names([Target("run", tmp_path / "prompt")], compare_base=False) == ["prompt-2"]


def test_targets_that_keep_other_rows_are_refused_with_the_fix(tmp_path):
    same_rows("sft", ["a", "b"], "grpo", ["a ", "b"], tmp_path / "d.jsonl")  # whitespace aside: the same
    with pytest.raises(LoratoolError) as err:
        same_rows("sft", ["a", "b"], "grpo", ["a"], tmp_path / "d.jsonl")
    assert "grpo keeps 1 rows" in err.value.message and "sft keeps 2" in err.value.message
    assert "--max-length" in (err.value.hint or "")


def test_a_runs_own_rewards_are_scored_but_its_python_file_only_when_asked(tmp_path):
    from loratool.recipe import validate_recipe

    file = tmp_path / "mine.py"
    file.write_text("def fmt(completions, **kw):\n    return [1.0 for _ in completions]\n")
    recipe = validate_recipe(
        {
            "base_model": "some/model",
            "data": {"train": [{"path": "p.jsonl", "format": "prompt"}]},
            "grpo": {"rewards": [{"exact_match": "answer"}, {"function": f"{file}:fmt"},
                                 {"model": str(tmp_path / "gone-reward-run")}]},
            "training": {"output_dir": "out"},
        }
    )  # fmt: skip
    run = Target("run", tmp_path / "rl", recipe=recipe)
    messages: list[str] = []
    rewards = eval_rewards([], [run], messages.append)
    assert [r.name for r in rewards] == ["exact_match"]
    assert any("fmt" in m and "not scored" in m and "--reward function=" in m for m in messages)
    assert any(m.startswith("warning: rl's grpo.rewards.2 is not scored") for m in messages)
    asked = eval_rewards([f"function={file}:fmt"], [run], messages.append)
    assert [r.name for r in asked] == ["fmt", "exact_match"]  # asked for: scored, and counted once
