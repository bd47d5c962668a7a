"""Checkpointing some, all or no decoder layers (training.gradient_checkpointing) learns
the same in a real run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from loratool.cli import app


def test_checkpointing_some_all_or_no_layers_learns_the_same(tmp_path, tiny_model_factory, smoke_data):
    """With LoRA dropout on: the recomputed layers must draw the same masks as the first pass."""
    base = tiny_model_factory(num_layers=4)
    runs = {}
    for value, layers in ((False, 0), (2, 2), (3, 2), (True, 4)):
        out = tmp_path / f"run-{value}"
        recipe = smoke_recipe(
            base,
            smoke_data,
            out,
            lora={"lora_dropout": 0.1},
            training={"max_steps": 3, "logging_steps": 1, "gradient_checkpointing": value},
        )
        result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / f"{value}.yaml", recipe))])
        assert result.exit_code == 0, result.output
        record = json.loads((out / "run.json").read_text())
        assert record["train"]["checkpointed_layers"] == layers
        lines = (out / "metrics.jsonl").read_text().splitlines()
        runs[value] = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(runs[False]) == 3
    for value in (2, 3, True):
        assert runs[value] == pytest.approx(runs[False], abs=1e-6)
