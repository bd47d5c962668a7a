"""What the sweep tests of several tiers share: a tiny recipe and the sweep call."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from loratool.cli import app


def tiny_recipe(folder: Path, model: Path, data: Path, **sections) -> Path:
    recipe = smoke_recipe(
        model,
        data,
        folder / "out" / "tiny",
        data={
            "train": [{"path": str(data), "format": "alpaca", "max_rows": 40}],
            "validation": 0.2,
            "max_length": 64,
        },
        training={"max_steps": 2, "logging_steps": 1, "save_steps": 2, "per_device_train_batch_size": 4},
        **sections,
    )
    return write_recipe(folder / "tiny.yaml", recipe)


def sweep(*args: str):
    return CliRunner().invoke(app, ["sweep", *args])
