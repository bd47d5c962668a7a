"""`loratool eval`: one clean error per mistake that needs no trained run."""

from __future__ import annotations

import pytest

from helpers.eval import eval_cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare-base"], "is a base model already"),
        ([], "so there is no validation data to evaluate on"),
        (["--data", "/nonexistent/x.jsonl"], "--data: file not found: /nonexistent/x.jsonl"),
    ],
)
def test_base_model_mistakes(tiny_llama, args, message):
    result = eval_cli(tiny_llama, *args)
    assert result.exit_code == 1 and "error: " in result.output
    assert message in result.output


def test_not_a_target(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    result = eval_cli(tmp_path)
    assert result.exit_code == 1
    assert (
        "is not a run directory, a merged checkpoint or a model directory (it has: notes.txt)"
        in result.output
    )
