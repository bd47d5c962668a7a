"""`loratool train --smoke`: the recipe end to end on a small random model of the base's
architecture."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from loratool.cli import app
from loratool.rundir.records import read_run
from loratool.smoke import SMOKE_SIZES, SMOKE_STEPS


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORATOOL_CACHE", str(cache))
    return cache


def weightless(model_dir: Path, dest: Path) -> Path:
    """The model's config and tokenizer without its weights: what --smoke may read."""
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def test_smoke_trains_merges_exports_without_the_weights(tmp_path, tiny_llama, smoke_data, private_cache):
    base = weightless(tiny_llama, tmp_path / "base")
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        smoke_recipe(base, smoke_data, out, quantization={"load_in_4bit": True}, data={"validation": 0.1}),
    )
    result = CliRunner().invoke(app, ["train", str(recipe), "--smoke"])
    assert result.exit_code == 0, result.output
    run = Path(f"{out}-smoke")
    assert not out.exists() and not list(base.glob("*.safetensors"))
    record = read_run(run)
    assert record.status == "complete" and record.raw["smoke"]["of_base_model"] == str(base)
    assert record.raw["train"]["global_step"] == SMOKE_STEPS
    assert "SMOKE RUN" in (run / "README.md").read_text()
    assert (Path(f"{run}-merged") / "model.safetensors").is_file()
    assert list(Path(f"{run}-gguf").glob("*.gguf"))
    assert "merged model written" in result.output and "-> ok" in result.output
    assert re.search(r"smoke run passed in \d+s", result.output)
    # The small base has the base's architecture and tokenizer, random weights, SMOKE_SIZES.
    smoke_base = Path(record.base_model.resolved_path)
    config = json.loads((smoke_base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == SMOKE_SIZES["hidden_size"]
    assert (smoke_base / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
