"""Per-step metrics: a JSONL log written as training goes, and the loss curve drawn from it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class MetricsLog(TrainerCallback):
    """Appends every trainer log (loss, learning rate, grad norm, eval loss...) to metrics.jsonl, and makes
    the trainer save a checkpoint at the very last step so that a finished run can be resumed and extended."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control


def trim_metrics(path: Path, last_step: int) -> int:
    """Keep only the lines logged up to `last_step` (a resume retrains the steps after its checkpoint,
    which log again); returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            dropped += 1  # a line cut short by a kill
            continue
        if isinstance(step, int) and step > last_step:
            dropped += 1
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


class ConciseProgress(ProgressCallback):
    """The trainer's progress bar, with one short line per log instead of a dump of every metric, and
    no second bar for each evaluation. Without a terminal (CI logs, `| tee`), only the lines."""

    SHOWN = ("loss", "eval_loss", "learning_rate", "grad_norm")

    def on_train_begin(self, args, state, control, **kwargs):
        if sys.stderr.isatty():
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return None

    def on_evaluate(self, args, state, control, **kwargs):
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        parts = [f"{k} {_fmt(logs[k])}" for k in self.SHOWN if k in logs]
        if not parts:
            return
        line = f"step {state.global_step}/{state.max_steps} · " + " · ".join(parts)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4f}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(rows: list[dict[str, Any]], output: Path, title: str) -> None:
    """Training loss (and validation loss, when evaluated) against optimizer steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if _finite(r.get("eval_loss"))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="validation loss", color="tab:orange", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per loss token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss was logged (raise max_steps or lower logging_steps)", ha="center")
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
