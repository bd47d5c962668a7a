"""Damaged adapter files are one clean error in `loratool merge` and `loratool generate`."""

from __future__ import annotations

import shutil

import pytest

from helpers.recipe_traps import DAMAGES, damage

# a fixture, imported for pytest to find in this module
from helpers.recipe_traps import pristine_adapter as pristine_adapter


@pytest.mark.parametrize("how", ["truncated", "not-json", "not-object", "no-peft-type"])
@pytest.mark.parametrize("command", ["merge", "generate"])
def test_damaged_adapter_is_one_clean_error_in_merge_and_generate(
    pristine_adapter, tiny_llama, tmp_path, command, how
):
    from typer.testing import CliRunner

    from loratool.cli import app

    adapter = shutil.copytree(pristine_adapter, tmp_path / "adapter")
    damage(adapter, how)
    if command == "merge":
        args = [
            "merge",
            "--adapter",
            str(adapter),
            "--base",
            str(tiny_llama),
            "--output",
            str(tmp_path / "m"),
        ]
    else:
        args = ["generate", str(tiny_llama), "--adapter", f"x={adapter}", "--prompt", "hi"]
    result = CliRunner().invoke(app, args)
    name, expected = DAMAGES[how]
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {adapter / name}: ") and expected in result.output
    assert "\nhint: " in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()
