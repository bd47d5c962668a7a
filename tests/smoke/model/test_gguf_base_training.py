"""A local .gguf file as base_model: dry run, training and merge on it like any other base.

Fast tests write tiny GGUF files (float32, so the round trip is exact) with loratool's own exporter from
a tiny random Llama; the slow test converts the real SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe

# fixtures, imported for pytest to find in this module
from helpers.gguf_base import private_cache as private_cache
from helpers.gguf_base import tiny_gguf as tiny_gguf
from helpers.gguf_base import tiny_source as tiny_source
from loratool.cli import app
from loratool.model.fingerprint import file_sha256, weights_fingerprint
from loratool.model.gguf_base import gguf_record


def test_train_dry_run_train_and_merge_on_a_gguf_base(tiny_gguf, private_cache, tmp_path):
    data = REPO / "recipes" / "data" / "smoke.jsonl"
    run = tmp_path / "run"
    recipe = smoke_recipe(tiny_gguf, data, run, training={"max_steps": 4, "save_steps": 4})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    dry = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "converting tiny.gguf" in dry.output and "adapter:" in dry.output and not run.exists()

    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "converting" not in result.output  # the dry run's conversion is reused
    base = json.loads((run / "run.json").read_text())["base_model"]
    converted = private_cache / "gguf" / file_sha256(tiny_gguf)[:16]
    assert base["id"] == str(tiny_gguf) and base["resolved_path"] == str(converted)
    assert base["gguf"] == gguf_record(tiny_gguf)
    assert base["gguf"]["sha256"] == file_sha256(tiny_gguf)
    assert base["gguf"]["converted_dir"] == str(converted)
    assert base["fingerprint"] == weights_fingerprint(converted)

    # The cache was cleared since training: merge finds the GGUF in run.json and converts it again, to
    # the same weights (the fingerprint check passes).
    shutil.rmtree(converted)
    merged = CliRunner().invoke(app, ["merge", "--adapter", str(run)])
    assert merged.exit_code == 0, merged.output
    assert "converting tiny.gguf" in merged.output
    record = json.loads((run / "merged" / "merge.json").read_text())
    assert record["base_model"]["fingerprint_check"] == "match"
    assert record["verification"]["passed"] is True
