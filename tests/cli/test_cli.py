"""The command line itself: help without heavy imports, one clean error message per failure."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import REPO
from loratool import __version__
from loratool.cli import app


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from loratool.cli import app\n"
        "for args in (['--help'], ['train', '--help']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout


@pytest.mark.parametrize("command", [[], ["train"], ["recipe-reference"]])
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_train_help_lists_options():
    output = CliRunner().invoke(app, ["train", "--help"]).output
    for option in ("--set", "--dry-run", "--overwrite", "--resume", "RECIPE"):
        assert option in output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_recipe_reference_lists_keys():
    result = CliRunner().invoke(app, ["recipe-reference"])
    assert result.exit_code == 0
    assert "training.learning_rate  (default: 0.0002)" in result.output
    assert "quantization.bnb_4bit_quant_type" in result.output


def test_missing_recipe_is_one_line_error_with_hint(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == f"error: recipe file not found: {tmp_path / 'nope.yaml'}"
    assert result.output.splitlines()[1].startswith("hint: ")


def test_recipe_problems_exit_1_without_traceback_in_a_real_process(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "base_model: x\ndata: {train: [{path: a.jsonl}]}\ntraining: {output_dir: o, learnig_rate: 1}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "loratool", "train", str(recipe)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 1
    assert "training.learnig_rate: unknown key — did you mean training.learning_rate?" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_unexpected_errors_are_clean_too(monkeypatch, tmp_path):
    import loratool.recipe

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loratool.recipe, "load_recipe", explode)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 3  # an internal error, not one the user can fix
    assert "error: unexpected RuntimeError: boom" in result.output and "LORATOOL_DEBUG=1" in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base_model: x\ntraining:\n  output_dir: o\n   seed: 1\n", "YAML syntax error"),
        (
            "base_model: x\ndata: {train: [{path: a}]}\ntraining: {output_dir: o, seed: many}\n",
            "training.seed: expected",
        ),
        (
            "base_model: x\ndata: {train: [{path: a}]}\ntraining: {output_dir: o}\nlora: {rank: 8}\n",
            "lora.rank: unknown key",
        ),
        ("base_model: x\ndata: {train: []}\ntraining: {output_dir: o}\n", "data.train: expected"),
    ],
)
def test_recipe_errors_exit_1_with_error_and_hint(tmp_path, text, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and expected in result.output
    assert "\nhint: " in result.output and "Traceback" not in result.output


def test_unreadable_recipes_exit_1_naming_the_file(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("base_model: x  # café\n".encode("latin-1"))
    twice = tmp_path / "twice.yaml"
    twice.write_text(
        "base_model: x\nlora: {r: 8}\ndata: {train: [{path: a}]}\ntraining: {output_dir: o}\nlora: {}\n"
    )
    for path, expected in [
        (tmp_path, f"error: {tmp_path} is a directory, not a recipe file"),
        (latin, f"error: {latin}:1: the recipe is not UTF-8 text"),
        (twice, "lora: key given twice (lines 2 and 5)"),
    ]:
        result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
        assert result.exit_code == 1, result.output
        assert expected in result.output and "\nhint: " in result.output and "Traceback" not in result.output


def test_optimizer_typo_is_refused_by_dry_run_before_anything_is_written(tmp_path, tiny_llama, smoke_data):
    from conftest import smoke_recipe, write_recipe

    out = tmp_path / "run"
    recipe = smoke_recipe(tiny_llama, smoke_data, out, training={"optim": "adamw_tourch"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["train", str(path), *extra])
        assert result.exit_code == 1, result.output
        assert (
            "error: training.optim: 'adamw_tourch' is not a valid optimizer — did you mean adamw_torch?"
            in result.output
        )
        assert "Traceback" not in result.output and "loading" not in result.output
        assert not out.exists()
