"""Checkpoints a run can be resumed from exactly, and the run's totals across resumes.

The trainer writes a checkpoint's files one after the other; a crash or a full disk in between leaves a
checkpoint that looks usable but is not. `CheckpointSeal` writes `loratool-checkpoint.json` into each
checkpoint once the trainer has saved everything else (on_save runs after the save), so a checkpoint
without it is incomplete, and one whose files no longer match the seal's list is damaged: `--resume`
skips both and says so (rundir.RunDir.latest_checkpoint).

The seal also carries what the trainer does not keep across a resume: the sum of per-step training losses
and the seconds spent training up to that step. A resumed run starts from those, so run.json's train_loss
and wall time cover the whole run, not only the part after the resume.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loratool.rundir.records import CHECKPOINT_SEAL, checkpoint_files, read_checkpoint_seal


class CheckpointSeal(TrainerCallback):
    """Seals each checkpoint and keeps the run's totals (loss sum, training seconds) across resumes."""

    def __init__(self, resumed_from: Path | None = None, base_fingerprint: str | None = None):
        seal = read_checkpoint_seal(resumed_from) if resumed_from is not None else {}
        self.base_fingerprint = base_fingerprint  # so a checkpoint used as an adapter names its base
        self.loss_sum_before = float(seal.get("loss_sum", 0.0))  # per-step losses summed, before this part
        self.seconds_before = float(seal.get("train_seconds", 0.0))
        self.trainer: Any = None  # set by train.py: the loss accumulators live on the trainer
        self._started = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.monotonic()

    def train_seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self._started

    def loss_sum(self) -> float:
        """Sum of the per-step training losses so far (the trainer's own accumulators, as it uses them for
        train_loss: logged steps drained into _total_loss_scalar, the rest still in _tr_loss)."""
        trainer = self.trainer
        total = float(getattr(trainer, "_total_loss_scalar", 0.0) or 0.0)
        pending = getattr(trainer, "_tr_loss", None)
        if pending is not None:
            total += float(pending.item() if hasattr(pending, "item") else pending)
        return self.loss_sum_before + total

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        seal = {
            "global_step": state.global_step,
            "loss_sum": self.loss_sum(),
            "train_seconds": round(self.train_seconds(), 3),
            "tokens_seen": int(state.num_input_tokens_seen or 0),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_fingerprint": self.base_fingerprint,
            # Each file with its size (and the hash of the small ones): a file damaged or removed later makes
            # --resume skip this checkpoint (rundir.records.checkpoint_problem).
            "files": checkpoint_files(folder),
        }
        tmp = folder / f".{CHECKPOINT_SEAL}.tmp"
        with tmp.open("w") as fh:
            fh.write(json.dumps(seal) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / CHECKPOINT_SEAL)

    def whole_run_train_loss(self, resumed_part_loss: float, global_step: int, first_step: int) -> float:
        """Mean per-step training loss over the whole run, from the trainer's mean over the resumed part."""
        steps_now = max(global_step - first_step, 0)
        if global_step <= 0:
            return resumed_part_loss
        return (self.loss_sum_before + resumed_part_loss * steps_now) / global_step
