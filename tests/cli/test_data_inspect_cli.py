"""`loratool data` through the CLI: the HTML report, the histogram and --strict."""

from __future__ import annotations

from typer.testing import CliRunner

from conftest import write_recipe
from helpers.data import write_jsonl
from helpers.data_inspect import GOOD_ROWS
from loratool.cli import app


def test_cli_data_writes_html_and_histogram(tmp_path, tiny_llama):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "base_model": str(tiny_llama),
            "data": {"train": [{"path": str(write_jsonl(tmp_path / "d.jsonl", GOOD_ROWS * 2))}]},
            "training": {"output_dir": str(tmp_path / "out")},
        },
    )
    html, png = tmp_path / "d.html", tmp_path / "h.png"
    result = CliRunner().invoke(
        app, ["data", str(recipe), "--rows", "1", "--html", str(html), "--histogram", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert "data: train 12 rows" in result.output and "duplicates" not in result.output
    assert "repeat an earlier row exactly" in result.output  # GOOD_ROWS twice
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and html.read_text().startswith("<!doctype html>")
    strict = CliRunner().invoke(app, ["data", str(recipe), "--strict", "--rows", "0"])
    assert strict.exit_code == 1
    assert not (tmp_path / "out").exists()
