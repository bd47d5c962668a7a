"""What a failed training says: a user-fixable error for what the user can fix (memory, disk, a file that
cannot be written), naming the file; else an internal error pointing to the traceback the run keeps."""

from __future__ import annotations

from loratool.errors import InternalError, LoratoolError
from loratool.rundir.records import TRACEBACK, RunDir, is_disk_full, is_file_too_large


def as_training_error(exc: BaseException, run: RunDir) -> BaseException:
    """The error to show for a failed training: a user-fixable one for what the user can fix (memory,
    disk, a file that cannot be written), naming the file; else an internal error that points to the
    traceback the run directory keeps."""
    import torch

    where = f"run state saved in {run.path / 'run.json'}"
    if isinstance(exc, (LoratoolError, KeyboardInterrupt, SystemExit)):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):
        return LoratoolError(
            f"out of GPU memory while training ({where})",
            hint="lower training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
            "effective batch), lower data.max_length, set training.gradient_checkpointing: true, or load "
            "the base in 4 bits (quantization.load_in_4bit: true)",
        )
    if is_disk_full(exc) or is_file_too_large(exc):
        latest, _ = run.latest_checkpoint()
        resume = f"then continue from {latest.name} with --resume" if latest else "then train again"
        written = getattr(exc, "filename", None) or (
            f"{run.checkpoints / run.removed_incomplete[0]} (incomplete, removed)"
            if run.removed_incomplete
            else run.path
        )
        if is_file_too_large(exc):
            return LoratoolError(
                f"a file-size limit stopped the writing of {written} ({where})",
                hint=f"raise the limit (`ulimit -f unlimited`) or write to a file system that takes larger files, "
                f"{resume}",
            )
        return LoratoolError(
            f"no space left on the device while writing {written} ({where})",
            hint=f"free disk space on that device, {resume}",
        )
    if isinstance(exc, OSError) and exc.filename:
        return LoratoolError(
            f"could not access {exc.filename}: {exc.strerror} ({where})",
            hint="check that the path exists, is writable and is on a working disk, then resume with --resume",
        )
    return InternalError(
        f"training failed: {type(exc).__name__}: {exc}",
        hint=f"the full traceback is in {run.path / TRACEBACK}; please report it with that file",
    )
