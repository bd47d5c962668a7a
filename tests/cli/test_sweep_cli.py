"""`loratool sweep` through the CLI without training: unknown keys and bad values refused before
any cell trains, the overwrite rules, the dry run, what cannot vary, the help.

The cells run in this process here (the sweep's `run_loratool` is replaced by the same command through the
CLI runner), so that a 2x2 grid on a tiny model stays fast; the real fresh-process path is the slow test at
the end."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from helpers.sweep import sweep, tiny_recipe
from loratool.cli import app
from loratool.train import sweep as sweep_module


def test_unknown_key_names_the_closest_valid_key(tmp_path, tiny_llama, smoke_data):
    recipe = tiny_recipe(tmp_path, tiny_llama, smoke_data)
    result = sweep(str(recipe), "--vary", "lora.rr=4,8", "--output", str(tmp_path / "s"))
    assert result.exit_code == 1
    assert "error: --vary lora.rr: unknown key — did you mean lora.r?" in result.output
    result = sweep(str(recipe), "--vary", "training.learnig_rate=1e-3", "--output", str(tmp_path / "s"))
    assert "--vary training.learnig_rate: unknown key — did you mean training.learning_rate?" in result.output
    assert not (tmp_path / "s").exists()


def test_a_bad_value_is_refused_before_any_cell_trains(tmp_path, tiny_llama, smoke_data, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_module, "run_loratool", lambda command, log: calls.append(command) or (0, None))
    recipe = tiny_recipe(tmp_path, tiny_llama, smoke_data)
    # The bad value is in the last cell: nothing may train before it is found.
    result = sweep(str(recipe), "--vary", "lora.r=8,16,0", "--output", str(tmp_path / "s"))
    assert result.exit_code == 1
    assert "1 of 3 cells have a recipe that does not load (nothing was trained)" in result.output
    assert "cell r=0: lora.r: expected greater than 0 (got 0)" in result.output
    assert calls == [] and not (tmp_path / "s").exists()


def test_overwrite_follows_the_rules_of_every_output(tmp_path, tiny_llama, smoke_data, monkeypatch):
    monkeypatch.setattr(sweep_module, "run_loratool", lambda command, log: (1, "boom"))
    recipe = tiny_recipe(tmp_path, tiny_llama, smoke_data)
    args = [str(recipe), "--vary", "lora.r=4,8"]
    first = sweep(*args)  # default output: sweep-NAME next to training.output_dir
    output = tmp_path / "out" / "sweep-tiny"
    assert first.exit_code == 1 and "2 of 2 cells failed" in first.output and "r=4: boom" in first.output
    assert json.loads((output / "sweep.json").read_text())["status"] == "failed"
    assert sweep(*args, "--resume", "--overwrite").exit_code == 1
    (output / "NOTES.md").write_text("mine")
    refused = sweep(*args, "--overwrite")
    assert refused.exit_code == 1 and "NOTES.md" in refused.output
    assert (output / "NOTES.md").read_text() == "mine"
    (output / "NOTES.md").unlink()
    again = sweep(*args, "--overwrite")
    assert again.exit_code == 1 and "2 of 2 cells failed" in again.output
    assert sorted(p.name for p in output.iterdir()) == [
        "results.csv", "results.md", "sweep.json", "sweep.log", "sweep.png"
    ]  # fmt: skip
    nothing = tmp_path / "empty"
    result = sweep(*args, "--resume", "--output", str(nothing))
    assert result.exit_code == 1 and "holds no sweep to resume" in result.output


def test_dry_run_checks_every_cell_and_writes_nothing(tmp_path, tiny_llama, smoke_data):
    recipe = tiny_recipe(tmp_path, tiny_llama, smoke_data)
    result = sweep(str(recipe), "--vary", "lora.target_modules=[q_proj],[q_proj,v_proj]", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "--- cell 2/2: target_modules=q_proj_v_proj" in result.output
    counts = [line for line in result.output.splitlines() if "trainable parameters" in line]
    assert len(counts) == 2 and counts[0] != counts[1]
    assert "dry run: all 2 cells check out" in result.output
    assert not (tmp_path / "out").exists()


def test_output_dir_and_set_keys_cannot_vary(tmp_path, tiny_llama, smoke_data):
    recipe = tiny_recipe(tmp_path, tiny_llama, smoke_data)
    result = sweep(str(recipe), "--vary", "training.output_dir=a,b")
    assert result.exit_code == 1 and "set by the sweep" in result.output
    result = sweep(str(recipe), "--vary", "lora.r=4,8", "--set", "lora.r=16")
    assert result.exit_code == 1 and "also given with --set" in result.output


def test_sweep_help_lists_its_options():
    result = CliRunner().invoke(app, ["sweep", "--help"])
    assert result.exit_code == 0
    for option in (
        "--vary",
        "--set",
        "--output",
        "--eval",
        "--eval-data",
        "--dry-run",
        "--resume",
        "--overwrite",
    ):
        assert option in result.output
