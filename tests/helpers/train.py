"""What the `loratool train` tests of several tiers share: the CLI call."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from loratool.cli import app


def train_cli(recipe_path: Path, *extra: str):
    result = CliRunner().invoke(app, ["train", str(recipe_path), *extra])
    return result
