"""Input problems through the CLI (`data` and `train --dry-run`): each ends in one `error:` line saying what
and where, one `hint:` line, exit code 1 — never an internal error (exit 3), never a hang on a FIFO."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from loratool.cli import app

pytestmark = pytest.mark.timeout(120)  # a FIFO opened for reading would block until then

ROWS = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(4)]
LONE = '{"instruction": "q", "output": "bad \\ud800 here"}'


def one_error(result, start: str) -> None:
    """Exit 1, and the output ends with exactly one error line (starting with `start`) and its hint."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-2]] and lines[-2].startswith(f"error: {start}"), result.output
    assert lines[-1].startswith("hint: ") and "probably a loratool bug" not in result.output


def commands(recipe: Path) -> list[list[str]]:
    return [["data", str(recipe), "--rows", "1"], ["train", str(recipe), "--dry-run"]]


def test_a_lone_surrogate_names_file_and_line_or_is_skipped(tmp_path, tiny_llama):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in ROWS[:2]) + LONE + "\n" + json.dumps(ROWS[2]) + "\n"
    )
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, data, tmp_path / "out"))
    for command in commands(recipe):
        one_error(CliRunner().invoke(app, command), f"{data}:3: invalid text: a lone UTF-16 surrogate")
    skip = smoke_recipe(tiny_llama, data, tmp_path / "out", data={"on_bad_row": "skip"})
    result = CliRunner().invoke(app, ["data", str(write_recipe(tmp_path / "skip.yaml", skip)), "--rows", "0"])
    assert result.exit_code == 0, result.output
    assert "4 read   3 used" in result.output and "1 dropped (1 malformed)" in result.output
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_data_is_named_and_never_read(tmp_path, tiny_llama):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, fifo, tmp_path / "out"))
    for command, key in zip(commands(recipe), ("data source", "data.train[0].path:"), strict=True):
        one_error(CliRunner().invoke(app, command), f"{key} {fifo} is a FIFO (named pipe), not a data file")


def test_a_symbolic_link_loop_as_base_model_is_named(tmp_path, smoke_data):
    loop = tmp_path / "model"
    os.symlink(loop.name, loop)
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(loop, smoke_data, tmp_path / "out"))
    for command in commands(recipe):
        one_error(CliRunner().invoke(app, command), f"base model {loop} is a symbolic link loop")


def test_a_tokenizer_without_pad_or_eos_is_refused_before_the_model_loads(tmp_path, tiny_llama, smoke_data):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["eos_token"], config["pad_token"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(model, smoke_data, tmp_path / "out"))
    for command in commands(recipe):
        one_error(CliRunner().invoke(app, command), f"the tokenizer of {model} (base_model) has neither")


def test_a_model_next_to_the_recipe_is_found_from_any_directory(
    tmp_path, monkeypatch, tiny_llama, smoke_data
):
    """`base_model: tiny` (a folder beside the recipe) is that folder wherever the command runs, not a hub id;
    the resolved recipe says which path was used."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copytree(tiny_llama, recipes / "tiny")
    recipe = write_recipe(recipes / "r.yaml", smoke_recipe("tiny", smoke_data, tmp_path / "out"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the recipe's directory nor one holding `tiny`
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"base_model: {recipes / 'tiny'}" in result.output
    assert "hub" not in result.output.lower()
