"""What the `lora.method` tests of several tiers share: the smoke data, the methods, the CLI call."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from conftest import REPO
from loratool.cli import app

SMOKE = REPO / "recipes" / "data" / "smoke.jsonl"


# Each method at settings that learn on the tiny model in a few steps.
METHODS = {
    "adalora": {"method": "adalora", "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3},
    "vera": {"method": "vera", "r": 32},
    "lorafa": {"method": "lorafa"},
}


def cli(*args: str | Path):
    return CliRunner().invoke(app, [*map(str, args)])
