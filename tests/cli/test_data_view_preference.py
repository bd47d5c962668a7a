"""`loratool data` on preference data (a recipe with a dpo section): the pairs as DPO training encodes them,
their summary and checks, the HTML page; pairs that all lack signal end in one error, exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from conftest import REPO, write_recipe
from loratool.cli import app

SHIPPED_DPO = REPO / "recipes" / "tiny-dpo.yaml"


def test_the_shipped_dpo_recipe_shows_prompt_chosen_and_rejected(tmp_path, tiny_llama):
    html = tmp_path / "pairs.html"
    result = CliRunner().invoke(
        app,
        ["data", str(SHIPPED_DPO), "--set", f"base_model={tiny_llama}", "--rows", "2", "--html", str(html)],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "data: train 144 rows (1 source) · validation 16 rows" in out
    assert "per pair on average (prompt twice + chosen + rejected)" in out
    assert "longest sequence (prompt + one answer)" in out
    assert "lengths (tokens per pair, prompt + its longer answer" in out
    assert "smoke-preferences.jsonl:1 (train) · prompt " in out
    assert "\nprompt: <|begin_of_text|><|im_start|>user" in out
    assert "\nchosen: [[guitar has 6 letters.<|im_end|>" in out
    assert "\nrejected: [[guitar has 6 letters. Feel free to ask me more.<|im_end|>" in out
    assert "checks: no problem found" in out and "KeyError" not in out
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and page.count("class='row'") == 2
    assert "<span class='part'>chosen</span>" in page and "<span class='part'>rejected</span>" in page
    assert "Feel free to ask me more." in page


def pairs_recipe(tmp_path: Path, model: Path, rows: list[dict]) -> Path:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return write_recipe(
        tmp_path / "dpo.yaml",
        {
            "base_model": str(model),
            "data": {"train": [{"path": str(data), "format": "preference"}], "max_length": 64},
            "dpo": {},
            "training": {"output_dir": str(tmp_path / "out")},
        },
    )


def pair(chosen: str, rejected: str) -> dict:
    return {"prompt": "Say something.", "chosen": " " + chosen, "rejected": " " + rejected}


def test_pairs_without_signal_warn_and_fail_strict(tmp_path, tiny_llama):
    recipe = pairs_recipe(tmp_path, tiny_llama, [pair("yes", "no"), pair("same", "same"), pair("ok", "bad")])
    result = CliRunner().invoke(app, ["data", str(recipe), "--rows", "0"])
    assert result.exit_code == 0, result.output
    assert "1 without signal" in result.output
    assert "train: 1 of 3 pairs carry no preference signal" in result.output
    assert f"e.g. {tmp_path / 'pairs.jsonl'}:2: chosen and rejected are the same answer" in result.output
    strict = CliRunner().invoke(app, ["data", str(recipe), "--rows", "0", "--strict"])
    assert strict.exit_code == 1


def test_pairs_that_all_lack_signal_are_one_error_in_data_and_dry_run(tmp_path, tiny_llama):
    recipe = pairs_recipe(tmp_path, tiny_llama, [pair("same", "same"), pair("same too", "same too")])
    for command in (["data", str(recipe)], ["train", str(recipe), "--dry-run"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert len(errors) == 1 and lines[errors[0] + 1].startswith("hint: "), result.output
        assert lines[errors[0]].startswith("error: data.train: no preference pair carries signal: in all 2")
        assert str(tmp_path / "pairs.jsonl") in lines[errors[0]]
        assert not (tmp_path / "out").exists()
    assert lines[-1].startswith("hint: ") and "data: train" not in result.output  # nothing half-printed
