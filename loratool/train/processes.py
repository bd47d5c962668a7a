"""Several processes, one run: accelerate's process state, and steps the main process takes first.

Under `accelerate launch` or `torchrun` every process runs `train`; only the main one prints, holds the
output's lock and writes the run directory (the trainer saves checkpoints from it only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError
from loratool.rundir.outputs import command_line, output_lock
from loratool.rundir.signals import terminate_as_interrupt


def processes() -> Any:
    """accelerate's process state, set up before anything else runs: one process, or one of several
    started by `accelerate launch` or `torchrun`.

    On a machine without CUDA, accelerate joins the processes into one (gloo) group only when told to
    use the CPU: `accelerate launch --cpu` says so through ACCELERATE_USE_CPU, `torchrun` does not, and
    each of its processes would then train a run of its own. Setting the same variable here makes both
    launchers give one run; transformers' TrainingArguments reads it too when it rebuilds the state."""
    import os

    import torch
    from accelerate import PartialState

    check_launch(os.environ)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))


def check_launch(env: Mapping[str, str]) -> None:
    """Refuse a launch that asked for several processes but started one: `accelerate launch --cpu
    --num_processes 2` without a config runs a single process (accelerate's simple launcher), which would
    train alone with part of the global batch the user asked for. Its trace: accelerate's CPU flag and the
    rendezvous address it sets for several processes, but no WORLD_SIZE, which every real multi-process
    launcher sets."""
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        raise LoratoolError(
            "accelerate launch started ONE process although several were asked for (MASTER_ADDR is set, "
            "WORLD_SIZE is not): without a config, `accelerate launch --cpu --num_processes N` runs a single "
            "process, which would train with 1/N of the global batch",
            hint="launch with the config for several processes: `accelerate launch --config_file "
            "configs/accelerate/ddp.yaml --num_processes N -m loratool train RECIPE`, or `torchrun "
            "--nproc_per_node N -m loratool train RECIPE`; for one process, unset MASTER_ADDR and MASTER_PORT",
        )


class StoppedWithMainProcess(SystemExit):
    """Raised on the other processes when the main one stopped with an error: it printed the error; these
    leave quietly (exit code 1) rather than wait for it at the next collective until a timeout."""

    def __init__(self) -> None:
        super().__init__(1)


def on_main_first(
    state: Any,
    step: Callable[[], Any],
    *,
    then_others: Callable[[], Any] | None = None,
    share: bool = False,
) -> Any:
    """Run `step` on the main process while the others wait, then `then_others` on the others. If `step`
    fails, the main process raises its error and every other process raises StoppedWithMainProcess.
    With share, the others receive the main process's result (it must pickle); else they get
    `then_others()`, or None."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if state.is_main_process:
        try:
            result = step()
        except BaseException as exc:  # KeyboardInterrupt too: the others must not wait for a dead process
            error = exc
    if state.num_processes > 1:
        message = [error is not None, result if share and error is None else None]
        failed, shared = broadcast_object_list(message, from_process=0)
    else:
        failed, shared = error is not None, result
    if error is not None:
        raise error
    if failed:
        raise StoppedWithMainProcess()
    if state.is_main_process:
        return result
    if share:
        return shared
    return then_others() if then_others is not None else None


def quiet(message: str) -> None:
    """The log of the other processes in a multi-process run: the main process reports for all."""


@contextmanager
def main_holds_output(state: Any, output: Path, log: Callable[[str], None]) -> Iterator[None]:
    """The main process holds the output's lock for the whole run and turns SIGTERM into Ctrl-C; the others
    wait until it holds the lock, and stop with it if it cannot."""
    with ExitStack() as held:
        on_main_first(state, lambda: held.enter_context(output_lock(output, command_line(), log)))
        if state.is_main_process:
            held.enter_context(terminate_as_interrupt())
        yield
