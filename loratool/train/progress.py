"""Per-step metrics: a JSONL log written as training goes, and the loss curve drawn from it."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
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


class Heartbeat:
    """Progress of a long step without a terminal (CI logs, `| tee`, a busy machine): a line with the rate
    and the time left at least every `every` seconds, whatever the logging settings. `tick(done)` is cheap
    to call often; nothing is printed for steps shorter than `every`."""

    def __init__(
        self, what: str, total: int | None, *, every: float = 15.0, write: Callable[[str], None] | None = None
    ):
        self.what, self.total, self.every = what, total, every
        self.write = write or (lambda line: print(line, flush=True))
        self.started = self.last = time.monotonic()

    def tick(self, done: int, unit: str = "steps") -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        self.write(self.line(done, now - self.started, unit))

    def line(self, done: int, seconds: float, unit: str = "steps") -> str:
        rate = done / seconds if seconds > 0 else 0.0
        pace = (
            f"{rate:.2f} {unit}/s"
            if rate >= 1
            else f"{1 / rate:.1f} s per {_singular(unit)}"
            if rate
            else "-"
        )
        line = f"{self.what}: {done}" + (f"/{self.total}" if self.total else "") + f" {unit} · {pace}"
        if self.total and rate:
            line += f" · ETA {_clock((self.total - done) / rate)}"
        return line


def _singular(unit: str) -> str:
    """ "batches" -> "batch", "rows" -> "row" (units are English plurals)."""
    if unit.endswith(("ches", "shes", "sses", "xes")):
        return unit[:-2]
    return unit[:-1] if unit.endswith("s") else unit


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ConciseProgress(ProgressCallback):
    """The trainer's progress bar, with one short line per log instead of a dump of every metric. Without a
    terminal (CI logs, `| tee`), a line with the rate and ETA at least every 15 s, independent of
    logging_steps, for training steps and for each validation pass."""

    SHOWN = ("loss", "eval_loss", "learning_rate", "grad_norm")
    EVERY = 15.0  # seconds between progress lines without a terminal

    def __init__(self, every: float | None = None):
        super().__init__()
        self.every = self.EVERY if every is None else every
        self.steps: Heartbeat | None = None
        self.evaluation: Heartbeat | None = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if sys.stderr.isatty():
            super().on_train_begin(args, state, control, **kwargs)
        elif state.is_world_process_zero:
            self.first_step = state.global_step  # a resumed run: the rate counts this session's steps
            self.steps = Heartbeat("training", state.max_steps, every=self.every)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)
        elif self.steps is not None:
            done = state.global_step - self.first_step
            self.steps.total = state.max_steps - self.first_step
            self.steps.what = f"training (step {state.global_step}/{state.max_steps})"
            self.steps.tick(done)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return None
        if self.training_bar is not None:
            return super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if self.evaluation is None:
            total = (
                len(eval_dataloader)
                if eval_dataloader is not None and hasattr(eval_dataloader, "__len__")
                else None
            )
            self.evaluation = Heartbeat("validation", total, every=self.every)
            self.evaluation.done = 0  # type: ignore[attr-defined]
        self.evaluation.done += 1  # type: ignore[attr-defined]
        self.evaluation.tick(self.evaluation.done, unit="batches")  # type: ignore[attr-defined]
        return None

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluation = None
        if self.training_bar is not None:
            return super().on_evaluate(args, state, control, **kwargs)
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
    losses = [loss for _, loss in train + evals]
    if losses:
        # From 0 up: a flat curve then looks flat, instead of auto-scaling magnifying noise into a cliff.
        ax.set_ylim(0, max(losses) * 1.08 if max(losses) > 0 else 1)
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
