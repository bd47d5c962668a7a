"""`loratool eval A B ...`: base -> SFT -> GRPO side by side on the same held-out rows, with the GRPO run's
rewards as extra metrics — through the real CLI, on a tiny model: each column equals what `eval` of that
TARGET alone gives, and what cannot be compared is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from helpers.eval import SMOKE, eval_cli, metrics
from loratool.cli import app

HELD_OUT = [
    {"instruction": "Spell the word backwards.", "input": "lantern", "output": "nretnal"},
    {"instruction": "Write the word in capital letters.", "input": "meadow", "output": "MEADOW"},
    {"instruction": "Spell the word backwards.", "input": "copper", "output": "reppoc"},
    {"instruction": "Write the word in capital letters.", "input": "harbor", "output": "HARBOR"},
]


def answers(folder: Path, column: str) -> list[str]:
    return [json.loads(line)[column] for line in (folder / "generations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("held-out") / "held_out.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HELD_OUT))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, held_out) -> tuple[Path, Path]:
    """A short SFT run (its validation file: the held-out rows) and a short GRPO run on the same base."""
    tmp = tmp_path_factory.mktemp("compare")
    recipe = smoke_recipe(
        tiny_llama,
        SMOKE,
        tmp / "sft",
        data={"train": [{"path": str(SMOKE), "format": "alpaca"}], "validation": [{"path": str(held_out)}]},
        training={"max_steps": 4, "save_steps": 4, "learning_rate": 1e-2},
    )
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp / "sft.yaml", recipe))])
    assert result.exit_code == 0, result.output
    grpo = CliRunner().invoke(
        app,
        ["train", str(REPO / "recipes" / "tiny-grpo.yaml"), "--set", f"base_model={tiny_llama}",
         "--set", f"training.output_dir={tmp / 'grpo'}", "--set", "training.max_steps=2",
         "--set", "training.save_steps=2"],
    )  # fmt: skip
    assert grpo.exit_code == 0, grpo.output
    return tmp / "sft", tmp / "grpo"


@pytest.fixture(scope="module")
def compared(runs, held_out, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("reports") / "sft-vs-grpo"
    result = eval_cli(*runs, "--data", held_out, "--compare-base", "--output", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_comparison_has_a_column_per_model_and_the_rl_rewards_as_metrics(compared):
    out, output = compared
    record = metrics(out)
    assert record["columns"] == ["base", "sft", "grpo"]
    assert [t["name"] for t in record["targets"]] == ["sft", "grpo"]
    assert [r["name"] for r in record["rewards"]] == ["exact_match", "length"]  # tiny-grpo.yaml's rewards
    assert "grpo's grpo.rewards.0" in record["rewards"][0]["given"]
    for column in record["columns"]:
        numbers = record["models"][column]
        assert numbers["rows"] == len(HELD_OUT)
        rewards = numbers["rewards"]
        # exact_match: answer has no `answer` column here: it compares with the reference, as eval's own
        # exact match does.
        assert rewards["exact_match"]["mean"] == pytest.approx(numbers["exact_match"])
        assert -1.0 <= rewards["length"]["mean"] <= 0.0 and rewards["length"]["scored"] == len(HELD_OUT)
        weighted = rewards["exact_match"]["mean"] + 0.5 * rewards["length"]["mean"]
        assert rewards["reward"]["mean"] == pytest.approx(weighted)
    assert "no 'answer' column" in output
    assert record["difference"] is None  # three columns: no single difference
    table = next(line for line in output.splitlines() if line.startswith("metric"))
    assert table.split() == ["metric", "base", "sft", "grpo"]
    assert "reward length (mean)" in output and "reward, weighted sum (mean)" in output
    report = (out / "report.md").read_text()
    assert "# Evaluation of `sft` vs `grpo`" in report and "| metric | base | sft | grpo |" in report


def test_each_column_equals_eval_of_that_target_alone(compared, runs, held_out, tmp_path):
    out, _ = compared
    sft, grpo = runs
    alone = eval_cli(sft, "--data", held_out, "--compare-base", "--output", tmp_path / "sft")
    assert alone.exit_code == 0, alone.output
    assert answers(tmp_path / "sft", "tuned") == answers(out, "sft")
    assert answers(tmp_path / "sft", "base") == answers(out, "base")
    assert metrics(tmp_path / "sft")["models"]["tuned"]["loss"] == pytest.approx(
        metrics(out)["models"]["sft"]["loss"]
    )
    rl = eval_cli(grpo, "--data", held_out, "--output", tmp_path / "grpo")
    assert rl.exit_code == 0, rl.output
    assert answers(tmp_path / "grpo", "tuned") == answers(out, "grpo")
    # eval of the GRPO run alone scores its own rewards too.
    assert (
        metrics(tmp_path / "grpo")["models"]["tuned"]["rewards"] == metrics(out)["models"]["grpo"]["rewards"]
    )


def test_without_data_the_first_runs_validation_file_is_used(runs, held_out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = eval_cli(*runs, "--reward", "{regex: '[A-Z]+', name: capitals}")
    assert result.exit_code == 0, result.output
    assert f"sft's validation file {held_out}" in result.output
    record = metrics(tmp_path / "eval-sft-vs-grpo")  # the default report directory
    assert record["columns"] == ["sft", "grpo"] and record["data"]["rows"] == len(HELD_OUT)
    assert [r["name"] for r in record["rewards"]] == ["capitals", "exact_match", "length"]
    capitals = [
        float(a.strip().isalpha() and a.strip().isupper())
        for a in answers(tmp_path / "eval-sft-vs-grpo", "grpo")
    ]
    assert record["models"]["grpo"]["rewards"]["capitals"]["mean"] == pytest.approx(
        sum(capitals) / len(capitals)
    )
    assert set(record["difference"]) >= {"loss", "exact_match", "rewards"}  # two columns: grpo minus sft


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["SFT"], "is given twice"),
        (["BASE", "--compare-base"], "already one of the TARGETs"),
        (["--reward", "function=rewards.py:boom"], "raised ZeroDivisionError"),
    ],
)
def test_what_cannot_be_compared_is_refused_and_writes_nothing(
    runs, held_out, tiny_llama, tmp_path, monkeypatch, extra, says
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(
        "def boom(completions, **kw):\n    return [1 / 0 for _ in completions]\n"
    )
    sft, grpo = runs
    named = {"SFT": str(sft), "BASE": str(tiny_llama)}
    result = eval_cli(
        sft, *[named.get(a, a) for a in extra], "--data", held_out, "--output", tmp_path / "report"
    )
    assert result.exit_code == 1, result.output
    assert says in result.output and "probably a loratool bug" not in result.output
    assert not (tmp_path / "report").exists()
