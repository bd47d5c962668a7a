"""`loratool eval --compare-base` folds the run's adapter for its generation (loratool.generate.fold): the
report is the one the unfolded adapter gives, tuned and base side alike, through the real CLI."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from helpers.eval import SMOKE, eval_cli, metrics
from loratool.cli import app


def _generations(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]


def test_eval_with_a_folded_adapter_reports_what_the_unfolded_one_does(tmp_path, tiny_llama, monkeypatch):
    recipe = smoke_recipe(
        tiny_llama,
        SMOKE,
        tmp_path / "run",
        data={"train": [{"path": str(SMOKE), "format": "alpaca"}], "validation": 0.03, "max_length": 64},
    )
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output

    folded = eval_cli(tmp_path / "run", "--compare-base", "--output", tmp_path / "folded")
    assert folded.exit_code == 0, folded.output
    assert folded.output.count("adapter run folded into the base weights for generation") == 1

    monkeypatch.setattr("loratool.eval.run.folded", lambda *args, **kwargs: nullcontext())
    plain = eval_cli(tmp_path / "run", "--compare-base", "--output", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    assert "folded into the base weights" not in plain.output

    assert _generations(tmp_path / "folded") == _generations(tmp_path / "plain")
    models = metrics(tmp_path / "folded")["models"]
    assert (
        models["tuned"]["loss"] != models["base"]["loss"]
    )  # the adapter is on: the comparison means something
    assert models["tuned"]["loss"] == metrics(tmp_path / "plain")["models"]["tuned"]["loss"]
