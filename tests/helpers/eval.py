"""What the `loratool eval` tests of several tiers share: the smoke data, the CLI call, the metrics."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import REPO
from loratool.cli import app

SMOKE = REPO / "recipes" / "data" / "smoke.jsonl"


def eval_cli(*args: str | Path):
    return CliRunner().invoke(app, ["eval", *map(str, args), "--max-new-tokens", "8"])


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())
