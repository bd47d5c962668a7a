"""Several processes, one run: accelerate's process state, and steps the main process takes first.

Under `accelerate launch` or `torchrun` every process runs `train`; only the main one prints, holds the
output's lock and writes the run directory (the trainer saves checkpoints from it only). The others wait
for its steps through the store, watching its heartbeat (heartbeat.py), not in a collective that would
give up after the timeout."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError
from loratool.rundir.outputs import command_line, lock_holder, lock_path, output_lock
from loratool.rundir.signals import terminate_as_interrupt
from loratool.train import heartbeat
from loratool.train.elastic import join_group


def processes(wait_s: int | None = None) -> Any:
    """accelerate's process state, set up before anything else runs: one process, or one of several
    started by `accelerate launch` or `torchrun`.

    On a machine without CUDA, accelerate joins the processes into one (gloo) group only when told to
    use the CPU: `accelerate launch --cpu` says so through ACCELERATE_USE_CPU, `torchrun` does not, and
    each of its processes would then train a run of its own. Setting the same variable here makes both
    launchers give one run; transformers' TrainingArguments reads it too when it rebuilds the state.

    The process group gives up on a collective after `wait_s` seconds (None: heartbeat.wait_limit's
    default, 60 on CPU and 600 on CUDA), not transformers' 30 minutes: the group is created here, before
    TrainingArguments could pass its own ddp_timeout."""
    import os

    import torch
    from accelerate import PartialState

    check_launch(os.environ)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"
    timeout = timedelta(seconds=heartbeat.wait_limit(wait_s, cuda=torch.cuda.is_available()))
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if several and cpu:
        # Under torchrun, each attempt of a --max-restarts launch joins through keys of its own (elastic.py).
        # Only the CPU (gloo) group is started here, where it was tested; on CUDA accelerate starts its own.
        join_group("gloo", timeout)
    return PartialState(cpu=cpu, timeout=timeout)


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
    fails, the main process raises its error and every other process raises StoppedWithMainProcess (on
    another machine, whose terminal did not show the error: an error naming the main process and why).
    With share, the others receive the main process's result (it must pickle); else they get
    `then_others()`, or None. With then_others, the main process returns only once every other one has
    run it: a process that cannot (a data file missing on its machine) is named before anything is written.

    The waits go through the store and last as long as the waited-for process keeps beating: the main
    process's step may take minutes (tokenizing a large dataset)."""
    if state.num_processes == 1:
        return step()
    beat = heartbeat.running()
    assert beat is not None, "several processes run on_main_first inside heartbeat.watching"
    key = beat.next_key("main-first")
    if state.is_main_process:
        try:
            result = step()
        except BaseException as exc:  # KeyboardInterrupt too: the others must not wait for a dead process
            beat.post(key, pickle.dumps((heartbeat.one_line(exc), None)))
            raise
        beat.post(key, pickle.dumps((None, result if share else None)))
        if then_others is not None:
            beat.wait_for_others(f"{key}/others")
        return result
    why, shared = pickle.loads(beat.wait_for(key))
    if why is not None:
        if beat.same_machine(0):
            raise StoppedWithMainProcess()
        raise heartbeat.failed(beat.peer(0), why)
    if share:
        return shared
    value = then_others() if then_others is not None else None
    if then_others is not None:
        beat.post(f"{key}/others/{beat.rank}")
    return value


def quiet(message: str) -> None:
    """The log of the other processes in a multi-process run: the main process reports for all."""


@contextmanager
def main_holds_output(state: Any, output: Path, log: Callable[[str], None]) -> Iterator[None]:
    """The main process holds the output's lock for the whole run and turns SIGTERM into Ctrl-C; the others
    wait until it holds the lock, and stop with it if it cannot."""
    with ExitStack() as held:

        def hold() -> dict[str, Any] | None:
            held.enter_context(output_lock(output, command_line(), log))
            return lock_holder(output)

        holder = on_main_first(state, hold, share=True)
        if state.num_processes > 1:  # every process must write where the main one does: one directory
            on_main_first(state, lambda: None, then_others=lambda: check_same_output(output, holder))
        if state.is_main_process:
            held.enter_context(terminate_as_interrupt())
        yield


def check_same_output(output: Path, main: dict[str, Any] | None) -> None:
    """Refuse to train where the main process's output directory is not this process's: on another machine
    the path must lead to the same shared directory. The main process's lock file beside it is the marker:
    this process must find it, naming the main process."""
    import os
    import socket

    seen = lock_holder(output)
    if (
        main is not None
        and seen is not None
        and {k: seen.get(k) for k in ("pid", "host")} == {k: main.get(k) for k in ("pid", "host")}
    ):
        return
    where = f"rank {os.environ.get('RANK', '?')} on {socket.gethostname()}"
    found = (
        f"its lock file {lock_path(output)} is missing here"
        if seen is None
        else f"{lock_path(output)} here names pid {seen.get('pid')} on {seen.get('host')}"
    )
    raise LoratoolError(
        f"{where} does not see the output directory the main process writes: the main process (pid "
        f"{(main or {}).get('pid')} on {(main or {}).get('host')}) holds the lock on {output}, and {found}",
        hint="put training.output_dir on storage every machine mounts at the same path (a shared file system "
        "or a mounted bucket), and give it as an absolute path or start every machine in the same directory",
    )
