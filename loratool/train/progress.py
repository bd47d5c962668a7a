"""Per-step metrics: a JSONL log written as training goes, and the loss curve drawn from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from loratool.progress import Heartbeat


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
        parts = [f"{k} {_fmt(logs[k])}" for k in self.SHOWN if k in logs] + online_rl_parts(logs)
        if not parts:
            return
        line = f"step {state.global_step}/{state.max_steps} · " + " · ".join(parts)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)


def online_rl_parts(logs: dict[str, Any]) -> list[str]:
    """What a GRPO / RLOO log adds to the line: the weighted reward with each reward's mean (trl logs
    rewards/<name>/mean; an evaluation, eval_rewards/...), the KL to the reference and the mean completion
    length in tokens."""
    prefix = "eval_" if "eval_reward" in logs else ""
    if f"{prefix}reward" not in logs:
        return []
    start, end = f"{prefix}rewards/", "/mean"
    means = [
        f"{key.removeprefix(start).removesuffix(end)} {_fmt(value)}"
        for key, value in logs.items()
        if key.startswith(start) and key.endswith(end) and value is not None
    ]
    parts = [f"{prefix}reward {_fmt(logs[f'{prefix}reward'])}" + (f" ({', '.join(means)})" if means else "")]
    if logs.get(f"{prefix}kl") is not None:
        parts.append(f"kl {_fmt(logs[f'{prefix}kl'])}")
    if logs.get(f"{prefix}completions/mean_length") is not None:
        parts.append(f"completion {logs[f'{prefix}completions/mean_length']:.1f} tokens")
    return parts


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4f}"
