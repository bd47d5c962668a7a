"""metrics.jsonl, one JSON line per logged step, and the loss curve drawn from it (loss_curve.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    rewards = [(r["step"], r["reward"]) for r in rows if _finite(r.get("reward"))]
    if rewards:  # online RL (grpo, rloo): the mean weighted reward of the completions, on its own axis
        right = ax.twinx()
        right.plot(*zip(*rewards, strict=True), label="mean reward", color="tab:green")
        right.set_ylabel("mean reward (weighted sum)")
        right.legend(loc="upper right")
    if train or evals:
        ax.legend(loc="upper left" if rewards else "best")
    else:
        ax.text(0.5, 0.5, "no loss was logged (raise max_steps or lower logging_steps)", ha="center")
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
