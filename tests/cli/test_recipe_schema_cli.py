"""`loratool recipe-schema`, and the origin of every value (`train --explain`)."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from helpers.recipe_schema import MINIMAL, write
from loratool.cli import app


def test_cli_prints_the_schema():
    result = CliRunner().invoke(app, ["recipe-schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_train_explain_shows_origins(tmp_path):
    recipe = write(tmp_path / "r.yaml", yaml.safe_dump(MINIMAL, sort_keys=False))
    result = CliRunner().invoke(app, ["train", str(recipe), "--explain", "--set", "lora.r=4"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert next(x for x in lines if "  r: 4" in x).endswith("# --set lora.r=4")
    assert next(x for x in lines if x.startswith("base_model:")).endswith(f"# {recipe}:1")
    assert next(x for x in lines if "lora_dropout" in x).endswith("# default")
    assert not (tmp_path / "out").exists()
