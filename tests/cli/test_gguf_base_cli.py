"""A local .gguf file as base_model: a missing file and a wrong magic are clean CLI errors.

Fast tests write tiny GGUF files (float32, so the round trip is exact) with loratool's own exporter from
a tiny random Llama; the slow test converts the real SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from loratool.cli import app


def test_missing_file_and_wrong_magic_are_clean_cli_errors(tmp_path):
    data = REPO / "recipes" / "data" / "smoke.jsonl"
    missing = tmp_path / "nope.gguf"
    recipe = write_recipe(tmp_path / "a.yaml", smoke_recipe(missing, data, tmp_path / "out"))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[0] == f"error: base model not found: {missing} is not a file"
    assert result.output.splitlines()[1].startswith("hint: set base_model to an existing .gguf file")

    wheel = tmp_path / "model.gguf"
    wheel.write_bytes(b"PK\x03\x04" + bytes(100))
    recipe = write_recipe(tmp_path / "b.yaml", smoke_recipe(wheel, data, tmp_path / "out"))
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 1
    first = result.output.splitlines()[0]
    assert first == f"error: {wheel} is not a GGUF file: it starts with b'PK\\x03\\x04', not b'GGUF'"
    assert not (tmp_path / "out").exists()
