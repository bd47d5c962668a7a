"""`loratool plan` and the plan line of `train --dry-run`, through the CLI."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from loratool.cli import app


def test_cli_plan_json_and_text(tmp_path, tiny_llama, smoke_data):
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, smoke_data, tmp_path / "out"))
    result = CliRunner().invoke(app, ["plan", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["peak_memory_bytes"] == sum(plan["components"].values()) or plan["assumptions"]
    assert plan["trainable_parameters"] > 0 and plan["steps"] == 12
    text = CliRunner().invoke(app, ["plan", str(recipe), "--gpu", "t4"])
    assert text.exit_code == 0 and "on T4 · fits 16.00 GiB" in text.output
    assert "activations" in text.output and "tokens/s" in text.output
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_the_plan_line(tmp_path, tiny_llama, smoke_data):
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, smoke_data, tmp_path / "out"))
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "plan: peak memory ~" in result.output and "loratool plan RECIPE" in result.output


def test_plan_for_several_machines(tmp_path, tiny_llama, smoke_data):
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, smoke_data, tmp_path / "out"))
    runner = CliRunner()
    result = runner.invoke(
        app, ["plan", str(recipe), "--gpu", "H100", "--nodes", "2", "--gpus-per-node", "8"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "on 2 node(s) x 8 H100 = 16 devices (NVLink within a node, InfiniBand between nodes" in result.output
    )
    assert "ZeRO-3 / FSDP" in result.output and "fits on fewer devices: DDP on 1" in result.output
    as_json = runner.invoke(app, ["plan", str(recipe), "--gpu", "H100", "--gpus-per-node", "4", "--json"])
    devices = json.loads(as_json.stdout)["devices"]
    assert [s["strategy"] for s in devices["spreads"]] == ["DDP", "ZeRO-2", "ZeRO-3 / FSDP"]
    assert devices["between_nodes"] is None and devices["nodes"] == 1
