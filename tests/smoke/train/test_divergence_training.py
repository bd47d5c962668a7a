"""A diverging run stops at the step it diverges, fails, and leaves no adapter; a NaN adapter is
never written."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import trl
from typer.testing import CliRunner

from conftest import smoke_recipe, write_recipe
from loratool.cli import app
from loratool.train.divergence import COLLAPSE_PATIENCE, DivergenceGuard


def train_cli(recipe_path: Path):
    return CliRunner().invoke(app, ["train", str(recipe_path)])


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))


def logged_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def assert_failed_without_adapter(run: Path) -> dict:
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("TrainingDiverged: ")
    assert not (run / "adapter_model.safetensors").exists() and not (run / "adapter_config.json").exists()
    return manifest


@pytest.mark.quick
def test_absurd_learning_rate_stops_at_the_collapse(tmp_path, tiny_llama, smoke_data):
    """The reported case: at learning_rate 1000 the loss sits at ln(vocab) with a zero gradient."""
    out = tmp_path / "run"
    recipe = smoke_recipe(
        tiny_llama,
        smoke_data,
        out,
        training={"learning_rate": 1000, "max_steps": 30, "logging_steps": 1, "save_steps": 1},
    )
    result = train_cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1, result.output
    found = re.search(
        r"error: training diverged at step (\d+)/30: .*since step (\d+) the loss", result.output
    )
    assert found, result.output
    stopped, since = int(found[1]), int(found[2])
    assert stopped == since + COLLAPSE_PATIENCE - 1 < 30
    assert "equally likely" in result.output and f"{math.log(512):.4f}" in result.output
    assert "hint: lower training.learning_rate (it is 1000" in result.output
    for advice in ("warm-up", "max_grad_norm", "check the data"):
        assert advice in result.output

    assert_failed_without_adapter(out)
    # The step that tripped the guard is never logged (the optimizer did not take it) ...
    assert max(logged_steps(out)) == stopped - 1
    # ... and no checkpoint of the collapsed state exists to resume from, while earlier ones are kept.
    assert checkpoint_steps(out) and max(checkpoint_steps(out)) < since, checkpoint_steps(out)


class NaNAtStep(trl.SFTTrainer):
    """The real SFTTrainer, with a NaN loss (`part = "loss"`) or one NaN gradient (`part = "grad"`) at
    optimizer step `step`; remembered so a test can look at the model in memory."""

    step = 5
    part = "loss"
    instances: list[trl.SFTTrainer] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        NaNAtStep.instances.append(self)

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        if self.part == "loss" and self.state.global_step + 1 == self.step:
            loss = loss * float("nan")
        return loss

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.part == "grad" and self.state.global_step + 1 == self.step:
            param = next(p for p in self.model.parameters() if p.requires_grad)
            param.grad.view(-1)[0] = float("inf")
        return loss


@pytest.fixture()
def nan_trainer(monkeypatch):
    NaNAtStep.instances = []
    monkeypatch.setattr(trl, "SFTTrainer", NaNAtStep)
    return NaNAtStep


@pytest.mark.parametrize("part", ["loss", "grad"])
def test_a_nan_stops_training_at_that_step(tmp_path, tiny_llama, smoke_data, nan_trainer, part, monkeypatch):
    monkeypatch.setattr(nan_trainer, "part", part)
    out = tmp_path / "run"
    recipe = smoke_recipe(tiny_llama, smoke_data, out, training={"logging_steps": 1, "save_steps": 2})
    result = train_cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1, result.output
    seen = "the loss is nan" if part == "loss" else "the gradient norm is nan"  # clipping turns inf to NaN
    assert f"error: training diverged at step 5/12: {seen}" in result.output, result.output
    assert "before the optimizer step" in result.output

    assert_failed_without_adapter(out)
    assert logged_steps(out) == [1, 2, 3, 4]
    assert checkpoint_steps(out) == [2, 4]  # earlier checkpoints are kept
    # The guard ran before the optimizer: the NaN never reached the adapter weights.
    trained = nan_trainer.instances[0].model
    assert all(torch.isfinite(p).all() for p in trained.parameters() if p.requires_grad)


def test_a_nan_adapter_is_never_written(tmp_path, tiny_llama, smoke_data, nan_trainer, monkeypatch):
    """The last line of defence, should a NaN reach the weights unseen (here: the guard is switched off)."""

    class Unguarded(DivergenceGuard):
        def on_pre_optimizer_step(self, *args, **kwargs):
            pass

    monkeypatch.setattr("loratool.train.trainer.DivergenceGuard", Unguarded)
    out = tmp_path / "run"
    recipe = smoke_recipe(tiny_llama, smoke_data, out, training={"max_steps": 6, "save_steps": 2})
    result = train_cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1, result.output
    assert "error: the trained adapter holds NaN or inf values" in result.output
    assert "it was not written" in result.output
    assert_failed_without_adapter(out)
    assert not (out / ".finishing").exists()
