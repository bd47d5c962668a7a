"""What follows an online-RL run: `train --smoke` of a GRPO recipe trains, merges (verified on built-in
prompts, since its rows have no answers) and exports; `eval` of the run without --data says why it needs
one instead of failing."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from loratool.cli import app

REPO = Path(__file__).resolve().parents[3]


def test_a_grpo_recipe_smoke_runs_end_to_end_and_eval_asks_for_answers(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "grpo"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(REPO / "recipes" / "tiny-grpo.yaml"),
            "--smoke",
            "--set",
            f"training.output_dir={out}",
            "--set",
            f"base_model={tiny_llama}",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    assert "grpo.num_generations" in result.output  # the smoke run says what it shrank
    assert "verifying on built-in" in result.output or "built-in conversations" in result.output
    assert (Path(f"{out}-smoke-merged") / "config.json").is_file()

    evaluated = CliRunner().invoke(app, ["eval", f"{out}-smoke"])
    assert evaluated.exit_code == 1, evaluated.output
    assert "prompts without answers" in evaluated.output and "--data" in evaluated.output
    assert "probably a loratool bug" not in evaluated.output
