"""A short training run on a real file in ../shared/data lowers the held-out loss.

Every row is accounted for (an example, or a rejection naming its file and row with the reason), loss masks
cover exactly the assistant turns (plus their end-of-turn marker) and nothing of the prompts, and a short
training run on a real file lowers the held-out loss. The expected counts below are what these files hold,
each explained where it is not "all rows used".

The tokenizer is the tiny models' 512-token byte-level BPE (a real trained tokenizer, ~1 token per 1.5
characters on English) with loratool's built-in ChatML template (tools preamble, <tool_call> syntax).
The first tests (no shared data needed) pin the pipeline fixes these files called for.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import smoke_recipe, write_recipe
from helpers.real_data import REAL_FILES

# a fixture, imported for pytest to find in this module
from helpers.real_data import shared as shared

# --- a short training run on a real file ------------------------------------------------------------------


@pytest.mark.slow
def test_training_on_a_real_file_lowers_the_held_out_loss(shared, tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from loratool.cli import app

    out = tmp_path / "run"
    data = shared / REAL_FILES["identity"][0]
    recipe = smoke_recipe(
        tiny_llama,
        data,
        out,
        data={
            "train": [{"path": str(data), "format": "alpaca"}],
            "validation": 0.2,
            "max_length": 256,
            "chat_template": "chatml",
        },
        # eval_on_start: the validation loss of the untrained adapter is recorded at step 0.
        training={
            "max_steps": 24,
            "eval_steps": 12,
            "save_steps": 12,
            "learning_rate": 1e-2,
            "eval_on_start": True,
        },
    )
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [step for step, _ in evals] == [0, 12, 24], evals
    before, after = evals[0][1], evals[-1][1]
    # Seen: 6.53 -> 5.23 -> 4.93. Below uniform guessing over the 512-token vocabulary (ln 512 = 6.24 nats)
    # means the adapter learned the answers' text, not just that the untrained one started badly.
    assert evals[1][1] < before and after < evals[1][1] and after < before - 1.0, evals
    assert after < math.log(512), evals
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["train"]["final_eval_loss"] == pytest.approx(after, rel=1e-4)
    (source_summary,) = manifest["data"]["train"]["sources"]
    assert source_summary["rows_read"] == 91
    assert manifest["data"]["validation"]["rows"] == 18  # 20% of 91, rounded
