"""`loratool train --dry-run` reports every input of a recipe before loading anything
(loratool/train/inputs.py)."""

from __future__ import annotations

from typer.testing import CliRunner

from helpers.inputs import recipe_in
from loratool.cli import app


def test_dry_run_reports_all_inputs_before_loading_anything(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.chdir(tmp_path)
    path = recipe_in(tmp_path / "r", "./no/model", "a.jsonl", "b.jsonl", tmp_path=tmp_path)
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == "error: 3 inputs of the recipe cannot be resolved:"
    assert [line.split(":")[0].strip() for line in lines[1:4]] == [
        "- base model not found",
        "- data.train[0].path",
        "- data.train[1].path",
    ]
    assert not (tmp_path / "out").exists()
