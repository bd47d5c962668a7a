"""`loratool sweep`: a grid of recipe variants, one run directory per cell, one table and one plot.

The cells run in this process here (the sweep's `run_loratool` is replaced by the same command through the
CLI runner), so that a 2x2 grid on a tiny model stays fast; the real fresh-process path is the slow test at
the end."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from conftest import REPO
from helpers.sweep import sweep, tiny_recipe
from loratool.cli import app
from loratool.rundir.records import read_run
from loratool.train import sweep as sweep_module

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def in_process(command: list[str], log) -> tuple[int, str | None]:
    """`loratool COMMAND` through the CLI runner instead of a fresh process: same arguments, same exit
    code and error line."""
    result = CliRunner().invoke(app, command)
    lines = result.output.splitlines()
    for line in lines:
        log(f"  {line}")
    return result.exit_code, sweep_module.error_message(lines)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_llama):
    """A 2x2 grid (lora.r x lora.use_dora) trained once for the tests that read it."""
    folder = tmp_path_factory.mktemp("grid")
    recipe = tiny_recipe(folder, tiny_llama, REPO / "recipes" / "data" / "smoke.jsonl")
    output = folder / "sweep"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep_module, "run_loratool", in_process)
        result = sweep(str(recipe), "--vary", "lora.r=4,8", "--vary", "lora.use_dora=false,true",
                       "--output", str(output))  # fmt: skip
    return recipe, output, result


def test_a_2x2_grid_gives_four_runs_and_a_table_that_matches_them(grid):
    _, output, result = grid
    assert result.exit_code == 0, result.output
    names = ["r=4,use_dora=false", "r=4,use_dora=true", "r=8,use_dora=false", "r=8,use_dora=true"]
    record = json.loads((output / "sweep.json").read_text())
    assert record["status"] == "complete"
    assert [c["cell"] for c in record["cells"]] == names
    with (output / "results.csv").open() as fh:
        table = {row["cell"]: row for row in csv.DictReader(fh)}
    markdown = (output / "results.md").read_text()
    for cell in record["cells"]:
        run = read_run(output / cell["run_dir"])
        assert run is not None and run.complete
        recipe = run.recipe_dict()
        assert cell["values"] == {"lora.r": recipe["lora"]["r"], "lora.use_dora": recipe["lora"]["use_dora"]}
        assert cell["trainable_parameters"] == run.train["trainable_parameters"]
        assert cell["validation_loss"] == run.train["final_eval_loss"]
        assert cell["train_loss_mean"] == run.train["train_loss"]
        assert cell["peak_memory_bytes"] == run.peak_memory_bytes["process_rss"]  # no GPU in the tests
        # The table rounds to 0.1 tok/s; compare with the same rounding (an abs tolerance of
        # 0.05 fails on exact halves such as 2406.25, which round() sends down to 2406.2).
        assert cell["tokens_per_second"] == round(run.train["tokens_trained"] / run.train["train_seconds"], 1)
        last_logged = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        assert cell["train_loss_final"] == [r["loss"] for r in last_logged if "loss" in r][-1]
        row = table[cell["cell"]]
        assert int(row["trainable_parameters"]) == run.train["trainable_parameters"]
        assert float(row["validation_loss"]) == pytest.approx(run.train["final_eval_loss"])
        assert f"| {recipe['lora']['r']} | {str(recipe['lora']['use_dora']).lower()} | complete |" in markdown
    params = {c["cell"]: c["trainable_parameters"] for c in record["cells"]}
    assert params["r=8,use_dora=false"] == 2 * params["r=4,use_dora=false"]  # rank doubles A and B
    assert params["r=4,use_dora=true"] > params["r=4,use_dora=false"]  # DoRA adds magnitude vectors
    assert record["files"] == sorted(["sweep.json", "sweep.log", "results.md", "results.csv", "sweep.png"])


def test_the_plot_is_a_png(grid):
    _, output, _ = grid
    png = output / "sweep.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 100


def test_resume_keeps_finished_cells_without_training_them(grid, monkeypatch):
    recipe, output, _ = grid

    def must_not_run(command, log):
        raise AssertionError(f"a finished cell was run again: {command}")

    monkeypatch.setattr(sweep_module, "run_loratool", must_not_run)
    args = [
        str(recipe),
        "--vary",
        "lora.r=4,8",
        "--vary",
        "lora.use_dora=false,true",
        "--output",
        str(output),
    ]
    refused = sweep(*args)
    assert refused.exit_code == 1 and "already exists" in refused.output and "--overwrite" in refused.output
    result = sweep(*args, "--resume")
    assert result.exit_code == 0, result.output
    record = json.loads((output / "sweep.json").read_text())
    assert {c["status"] for c in record["cells"]} == {"complete (kept)"}
    assert all(c["trainable_parameters"] for c in record["cells"])


def test_a_failing_cell_is_reported_and_the_others_kept(tmp_path, tiny_llama, smoke_data, monkeypatch):
    # A value the schema accepts that fails only once the model is loaded: a layer name it does not have.
    monkeypatch.setattr(sweep_module, "run_loratool", in_process)
    recipe = tiny_recipe(tmp_path, tiny_llama, smoke_data)
    output = tmp_path / "s"
    result = sweep(str(recipe), "--vary", "lora.target_modules=[no_such_layer],[q_proj,v_proj]",
                   "--output", str(output))  # fmt: skip
    assert result.exit_code == 1
    reason = "lora.target_modules: no_such_layer matches no layer of the model"
    assert "error: sweep: 1 of 2 cells failed" in result.output
    assert f"target_modules=no_such_layer: {reason}" in result.output
    assert not (output / "target_modules=no_such_layer").exists()  # failed before it wrote anything
    kept = read_run(output / "target_modules=q_proj_v_proj")
    assert kept is not None and kept.complete
    record = json.loads((output / "sweep.json").read_text())
    assert record["status"] == "failed"
    assert [(c["status"], c["error"]) for c in record["cells"]] == [("failed", reason), ("complete", None)]
    assert f"- `target_modules=no_such_layer`: {reason}" in (output / "results.md").read_text()
    assert (output / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE


def test_eval_metrics_join_the_table(tmp_path, tiny_llama, smoke_data, monkeypatch):
    monkeypatch.setattr(sweep_module, "run_loratool", in_process)
    recipe = tiny_recipe(tmp_path, tiny_llama, smoke_data)
    output = tmp_path / "s"
    result = sweep(str(recipe), "--vary", "lora.r=4", "--output", str(output), "--eval-max-samples", "3",
                   "--eval-max-new-tokens", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((output / "r=4" / "eval" / "metrics.json").read_text())
    cell = json.loads((output / "sweep.json").read_text())["cells"][0]
    assert report["models"]["tuned"]["rows"] == 3
    assert cell["eval"]["loss"] == report["models"]["tuned"]["loss"]
    assert cell["eval"]["exact_match"] == report["models"]["tuned"]["exact_match"]
    assert "| eval loss | exact match |" in (output / "results.md").read_text()
