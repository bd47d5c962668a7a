"""The rewards of online RL (train/rewards.py): every built-in on hand-made completions, your own Python
function and what it may return, and the recipe's `rewards:` list as the schema checks it."""

from __future__ import annotations

import math
import re

import pytest
from pydantic import ValidationError

from loratool.errors import LoratoolError
from loratool.recipe import GrpoSection, RewardFunction
from loratool.train.rewards import (
    checked_scores,
    completion_text,
    exact_match,
    last_number,
    length_penalty,
    load_rewards,
    number_match,
    regex_match,
    score_all,
    trl_reward_funcs,
    valid_json,
)


def rewards(*items: dict) -> list:
    return load_rewards([RewardFunction(**item) for item in items], "grpo")


# --- the built-ins --------------------------------------------------------------------------------------------


def test_exact_match_compares_stripped_text_with_the_reference():
    completions = ["  42\n", "42.", "forty-two", "name=A; qty=3"]
    assert exact_match(completions, [42, "42", "42", " name=A; qty=3 "]) == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("so the answer is 42", 42.0),
        ("3 apples and 5 pears: 8", 8.0),
        ("a total of 1,250.5 euros", 1250.5),
        ("it is -7.", -7.0),
        ("about .5 of it", 0.5),
        ("no number here", None),
    ],
)
def test_last_number_reads_the_last_number_written(text, number):
    assert last_number(text) == number


def test_number_match_with_and_without_tolerance():
    completions = ["The total is 42", "I think 41.99", "no idea", "12 then 42"]
    assert number_match(completions, [42, "42", 42, 42.0]) == [1.0, 0.0, 0.0, 1.0]
    assert number_match(completions, [42] * 4, tolerance=0.05) == [1.0, 1.0, 0.0, 1.0]
    assert number_match(["7"], ["the answer is 7"]) == [1.0]  # a reference in prose: its last number


def test_regex_match_needs_the_whole_stripped_completion():
    pattern = re.compile(r"name=\w+; qty=\d+", re.DOTALL)
    got = regex_match(
        ["name=Ann; qty=3", " name=Ann; qty=3\n", "Sure! name=Ann; qty=3", "name=Ann; qty=x"], pattern
    )
    assert got == [1.0, 1.0, 0.0, 0.0]


def test_valid_json():
    assert valid_json(['{"a": 1}', " [1, 2] ", "42", "{'a': 1}", "{", ""]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_length_penalty_is_zero_at_the_target_and_minus_one_at_zero_or_twice():
    ids = [[0] * n for n in (10, 5, 0, 15, 20, 40)]
    assert length_penalty(ids, 10) == [0.0, -0.5, -1.0, -0.5, -1.0, -1.0]


def test_each_built_in_through_the_recipe_scores_its_column():
    loaded = rewards(
        {"exact_match": "answer"},
        {"number": "total", "tolerance": 0.5},
        {"regex": r"\d+"},
        {"valid_json": True},
        {"length": 2, "weight": -0.5, "name": "short"},
    )
    assert [(r.name, r.weight) for r in loaded] == [
        ("exact_match", 1.0), ("number", 1.0), ("regex", 1.0), ("valid_json", 1.0), ("short", -0.5),
    ]  # fmt: skip
    completions, ids = ["12", "it is 12.4"], [[1, 2], [1, 2, 3, 4]]
    columns = {"answer": ["12", "12"], "total": [12, 12]}
    scores = [score_all(r, completions, ids, ["p", "p"], columns) for r in loaded]
    assert scores == [[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, -1.0]]


# --- your own function ----------------------------------------------------------------------------------------


def write(tmp_path, body: str):
    path = tmp_path / "my_rewards.py"
    path.write_text(body)
    return path


def test_a_python_function_gets_completions_prompts_ids_and_every_column(tmp_path):
    path = write(
        tmp_path,
        "def score(completions, prompts, completion_ids, answer, **columns):\n"
        "    return [float(c == a) + 0.1 * len(i) + len(columns) for c, a, i in zip(completions, answer, completion_ids)]\n",
    )
    (reward,) = rewards({"function": f"{path}:score"})
    assert reward.name == "score" and reward.key == "grpo.rewards.0"
    got = score_all(
        reward, ["yes", "no"], [[1], [1, 2]], ["q1", "q2"], {"answer": ["yes", "x"], "topic": ["a", "b"]}
    )
    assert got == pytest.approx([2.1, 1.2])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def score(completions, **kw):\n    raise KeyError('answer')\n", r"raised KeyError: 'answer'"),
        ("def score(completions, **kw):\n    return [1.0]\n", r"returned 1 scores for 2 completions"),
        ("def score(completions, **kw):\n    return 1.0\n", r"returned float, not a list of numbers"),
        (
            "def score(completions, **kw):\n    return ['good', 1.0]\n",
            r"score 0 is 'good' \(str\), not a number",
        ),
        (
            "def score(completions, **kw):\n    return [float('nan'), 1.0]\n",
            r"score 0 is nan, not a finite number",
        ),
        (
            "def score(completions, answer):\n    return [0.0, 0.0]\n",
            r"raised TypeError: .*unexpected keyword",
        ),
    ],
    ids=["raises", "wrong length", "not a list", "not a number", "nan", "wrong signature"],
)
def test_a_bad_function_fails_with_the_reward_named(tmp_path, body, message):
    (reward,) = rewards({"function": f"{write(tmp_path, body)}:score", "name": "mine"})
    with pytest.raises(LoratoolError, match=message) as caught:
        score_all(reward, ["a", "b"], [[1], [2]], ["p", "p"], {"answer": ["a", "b"]})
    assert "reward 'mine' (grpo.rewards.0)" in caught.value.message
    assert caught.value.hint


def test_none_means_the_reward_does_not_apply():
    (reward,) = rewards({"valid_json": True})
    assert [math.isnan(x) for x in checked_scores(reward, [None, 1], 2)] == [True, False]


def test_a_missing_file_or_function_is_refused_when_the_rewards_load(tmp_path):
    with pytest.raises(LoratoolError, match=r"grpo.rewards.0.function: no Python file at .*nowhere.py"):
        rewards({"function": f"{tmp_path}/nowhere.py:score"})
    path = write(tmp_path, "def score_one(completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(LoratoolError, match=r"has no function 'score'") as caught:
        rewards({"function": f"{path}:score"})
    assert "score_one" in caught.value.hint  # what the file does have
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(LoratoolError, match=r"importing .*broken.py failed: ModuleNotFoundError"):
        rewards({"function": f"{broken}:score"})


def test_a_reward_model_must_be_a_finished_reward_run(tmp_path):
    import json

    from conftest import LORATOOL_RUN

    with pytest.raises(LoratoolError, match=r"grpo.rewards.0.model: .* is not a loratool run directory"):
        rewards({"model": str(tmp_path)})
    (tmp_path / "run.json").write_text(json.dumps({**LORATOOL_RUN, "status": "complete", "stage": "sft"}))
    with pytest.raises(LoratoolError, match=r"is a sft run, not a reward model"):
        rewards({"model": str(tmp_path)})
    (tmp_path / "run.json").write_text(json.dumps({**LORATOOL_RUN, "status": "failed", "stage": "reward"}))
    with pytest.raises(LoratoolError, match=r"did not finish \(status: failed\)"):
        rewards({"model": str(tmp_path)})


# --- as trl calls them --------------------------------------------------------------------------------------


def test_trl_functions_carry_the_reward_names_and_read_the_json_columns():
    import json

    funcs = trl_reward_funcs(rewards({"exact_match": "answer"}, {"length": 2, "name": "short"}), "columns")
    assert [f.__name__ for f in funcs] == ["exact_match", "short"]  # trl logs rewards/<__name__>/mean
    chat = [[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": "8"}]]
    columns = [json.dumps({"answer": 7}), json.dumps({"answer": "7"})]
    got = funcs[0](
        prompts=["p", "p"],
        completions=chat,
        completion_ids=[[1], [2, 3]],
        columns=columns,
        trainer_state=None,
    )
    assert got == [1.0, 0.0]
    assert funcs[1](prompts=["p"], completions=["ab"], completion_ids=[[1, 2]], columns=["{}"]) == [0.0]
    assert completion_text("plain") == "plain"


# --- the recipe's rewards: list ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewards_list", "message"),
    [
        ([], r"rewards\n.*at least 1 item"),
        ([{}], r"rewards\.0\n.*exactly one of exact_match, .*; none is set"),
        ([{"exact_match": "a", "regex": "b"}], r"exact_match and regex are both set"),
        ([{"exact_match": "a"}, {"exact_match": "b"}], r"two rewards are logged as exact_match"),
        ([{"function": "rewards.py"}], r"must be `file.py:function`"),
        ([{"regex": "("}], r"not a valid regular expression"),
        ([{"exact_match": "a", "tolerance": 0.1}], r"tolerance: only used by a `number` reward"),
        ([{"exact_match": "a", "wieght": 2}], r"wieght\n.*Extra inputs"),
        ([{"length": 0}], r"length\n.*greater than 0"),
    ],
)
def test_the_schema_refuses_bad_rewards(rewards_list, message):
    with pytest.raises(ValidationError, match=message):
        GrpoSection(rewards=rewards_list)


def test_logged_names_default_to_the_kind_the_function_or_the_model_folder():
    section = GrpoSection(
        rewards=[
            {"number": "answer"},
            {"function": "r.py:correct"},
            {"model": "out/rm-run"},
            {"valid_json": True},
        ]
    )
    assert [r.logged_name() for r in section.rewards] == ["number", "correct", "rm-run", "valid_json"]
    assert [r.reference_column() for r in section.rewards] == ["answer", None, None, None]
