"""How the processes of one run keep track of each other, so that one that hangs or fails does not leave
the others waiting: every process beats in the launcher's store every few seconds, and says there why it
failed, or that it left. A process whose beat stops (SIGSTOP, a hung machine) or that failed is named by
the others within `training.ddp_timeout` seconds, instead of transformers' 30-minute default.

The store is the one the launch set up for the default process group. torchrun's agent holds it (so it
answers while a worker is stopped), and every machine of the run reaches it. Each process notes, by its own
clock, when it last saw another's beat counter change: no clock is compared across machines.

Waiting through the store also lets the others wait for the main process's long work alone (tokenizing,
writing a checkpoint) as long as it keeps beating, where a collective would give up after the timeout.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from loratool.errors import LoratoolError

# How long a process waits for the others, unless training.ddp_timeout says otherwise. On CPU (gloo) a
# step of a model that trains on CPU takes seconds, so a minute of silence is a hang. On CUDA (NCCL) the
# first step compiles kernels and a big base's checkpoint may take minutes to write, so 10 minutes: still
# far below the 30 minutes transformers would wait.
CPU_WAIT_S = 60
CUDA_WAIT_S = 600
POLL_S = 0.2  # how often a waiting process looks for what it waits for: a store read costs ~0.1 ms
RESUME_HINT = (
    "the run keeps its checkpoints and is not marked complete: once every machine is healthy, start the same "
    "command again with --resume on every machine to continue from the last checkpoint"
)


def wait_limit(setting: int | None, *, cuda: bool) -> int:
    """Seconds a process waits for the others: the recipe's training.ddp_timeout, else the default for
    the device (CPU_WAIT_S, CUDA_WAIT_S)."""
    if setting is not None:
        return setting
    return CUDA_WAIT_S if cuda else CPU_WAIT_S


def wait_limit_here(setting: int | None) -> int:
    """wait_limit for this machine's device."""
    import torch  # deferred: torch

    return wait_limit(setting, cuda=torch.cuda.is_available())


def beat_every(limit_s: float) -> float:
    """Seconds between two beats: several beats within the limit, so that one late beat (a busy machine)
    is not taken for a hang; at most 5 s, at least 0.5 s (a store write each)."""
    return max(0.5, min(5.0, limit_s / 6))


@dataclass(frozen=True)
class Peer:
    """One process of the run, as the others name it."""

    rank: int
    host: str
    pid: int
    machine: str  # torchrun's node rank (GROUP_RANK), or the host name: where its terminal is

    def __str__(self) -> str:
        return f"rank {self.rank} (host {self.host}, pid {self.pid})"


def stopped_answering(quiet: list[tuple[Peer, float]], limit_s: float) -> LoratoolError:
    """The error for processes whose beat stopped: each named with how long ago it was last heard."""
    named = ", ".join(f"{peer} stopped answering {seconds:.0f} s ago" for peer, seconds in quiet)
    return LoratoolError(
        f"{named} (no heartbeat); stopping this rank too",
        hint=f"find out why it stopped (killed, suspended with SIGSTOP or Ctrl-Z, a hung machine or GPU, "
        f"swapping); a process is given training.ddp_timeout = {limit_s:g} s; {RESUME_HINT}",
    )


def failed(peer: Peer, why: str) -> LoratoolError:
    """The error for a process that stopped with an error of its own."""
    return LoratoolError(
        f"{peer} failed: {why}; stopping this rank too",
        hint=f"fix what it reported (its terminal shows the whole error); {RESUME_HINT} (or without "
        "--resume if it had not started training)",
    )


def one_line(exc: BaseException) -> str:
    """Why a process stopped, in one line for the others' messages."""
    if isinstance(exc, LoratoolError):
        text = "; ".join(line.strip(" -") for line in exc.message.splitlines() if line.strip(" -"))
    elif isinstance(exc, KeyboardInterrupt):
        text = str(exc) if str(exc).startswith("terminated") else "interrupted"
    elif isinstance(exc, SystemExit):
        text = "stopped with the main process"
    else:
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return text[:500]


class Heartbeat:
    """This process's beat in the store, and what it last heard from the others. `beat_once` runs in a
    daemon thread (start/stop); the tests call it themselves, with their own clock."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        limit_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        host: str | None = None,
        pid: int | None = None,
        machine: str | None = None,
    ) -> None:
        self.store, self.rank, self.limit_s, self.clock = store, rank, limit_s, clock
        host = host or socket.gethostname()
        self.me = Peer(rank, host, pid or os.getpid(), machine or os.environ.get("GROUP_RANK", host))
        self.others = [r for r in range(world_size) if r != rank]
        self.every = beat_every(limit_s)
        started = clock()
        self.last_read = started
        self.last_change = dict.fromkeys(self.others, started)  # by this process's clock
        self.last_value: dict[int, int] = {}
        self.failures: dict[int, str] = {}
        self.left: set[int] = set()
        self.lost: str | None = None  # why the store stopped answering this process
        self._news_seen = 0
        self._peers: dict[int, Peer] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the beat --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Say who this process is, beat once, then keep beating in a daemon thread."""
        self.store.set(f"who/{self.rank}", json.dumps(self.me.__dict__))
        self.beat_once()
        self._thread = threading.Thread(target=self._run, name="loratool-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat_once()
                self.lost = None
            except Exception as exc:  # the store did not answer: waits report it if it stays so
                self.lost = one_line(exc)

    def beat_once(self) -> None:
        """Beat, and read every other process's beat counter and the news (failures, departures)."""
        self.store.add(f"beat/{self.rank}", 1)
        values = {r: self.store.add(f"beat/{r}", 0) for r in self.others}  # add 0: read without blocking
        now = self.clock()
        with self._lock:
            for r, value in values.items():
                if value != self.last_value.get(r):
                    self.last_value[r], self.last_change[r] = value, now
            self.last_read = now
        self.read_news()

    def read_news(self) -> None:
        """Which processes failed (and why) or left, read only when the news counter moved."""
        news = self.store.add("news", 0)
        if news == self._news_seen:
            return
        self._news_seen = news
        for r in self.others:
            if r not in self.failures and self.store.check([f"failed/{r}"]):
                why = self.store.get(f"failed/{r}").decode()
                with self._lock:
                    self.failures[r] = why
            if r not in self.left and self.store.check([f"left/{r}"]):
                with self._lock:
                    self.left.add(r)

    # --- what this process says ------------------------------------------------------------------------

    def publish_failure(self, exc: BaseException) -> None:
        """Tell the others why this process stops (before it exits: its connections close after)."""
        self._tell(f"failed/{self.rank}", one_line(exc).encode())

    def leave(self) -> None:
        """Tell the others this process finished: its silence from now on is not a hang."""
        self._tell(f"left/{self.rank}", b"")

    def _tell(self, key: str, value: bytes) -> None:
        try:
            self.store.set(key, value)
            self.store.add("news", 1)
        except Exception:  # the store is gone: nobody is left to tell
            pass

    def post(self, key: str, value: bytes = b"") -> None:
        self.store.set(key, value)

    def next_key(self, what: str) -> str:
        """A key for the n-th such step: every process takes the same steps in the same order."""
        return f"{what}/{next(self._keys)}"

    # --- what this process hears -----------------------------------------------------------------------

    def peer(self, rank: int) -> Peer:
        """Who `rank` is, as it said when it started (or "unknown" if it never did)."""
        if rank not in self._peers:
            try:
                if self.store.check([f"who/{rank}"]):
                    self._peers[rank] = Peer(**json.loads(self.store.get(f"who/{rank}")))
            except Exception:  # the store is gone: the rank is still named
                pass
        return self._peers.get(rank) or Peer(rank, "unknown", 0, "unknown")

    def same_machine(self, rank: int) -> bool:
        """Whether `rank` prints to the same terminal as this process (one torchrun agent)."""
        return self.peer(rank).machine == self.me.machine

    def trouble(self) -> LoratoolError | None:
        """The error naming the processes that failed or stopped answering, or None while all is well."""
        with self._lock:
            lost = self.lost
            failures = sorted(self.failures.items())
            quiet = [
                (r, self.last_read - seen)
                for r, seen in sorted(self.last_change.items())
                if r not in self.left and r not in self.failures and self.last_read - seen > self.limit_s
            ]
        if failures:
            rank, why = failures[0]
            return failed(self.peer(rank), why)
        if quiet:
            return stopped_answering([(self.peer(r), s) for r, s in quiet], self.limit_s)
        if lost is not None:
            return LoratoolError(
                f"the launcher's store (MASTER_ADDR {os.environ.get('MASTER_ADDR', '?')}) stopped answering: "
                f"{lost}; stopping this rank too",
                hint=f"the machine of the first process or its launcher stopped. {RESUME_HINT}",
            )
        return None

    def wait_for(self, key: str) -> bytes:
        """The value at `key`, once some process has posted it; raises trouble() if that comes first."""
        while True:
            try:
                if self.store.check([key]):
                    return self.store.get(key)
                self.read_news()  # a failure is named at once, not at the next beat
            except RuntimeError as exc:  # torch's store errors are RuntimeErrors
                self.lost = one_line(exc)
            if (problem := self.trouble()) is not None:
                raise problem
            time.sleep(POLL_S)

    def wait_for_others(self, prefix: str) -> None:
        """Until every other process has posted `prefix/<its rank>`."""
        for r in self.others:
            self.wait_for(f"{prefix}/{r}")

    def wait_for_trouble(self, seconds: float) -> LoratoolError | KeyboardInterrupt | None:
        """trouble(), waiting for it up to `seconds`: after a collective failed, the process behind it is
        named once its beat has been quiet for the limit. A SIGTERM meanwhile (the launcher stopping this
        process) is returned, so that the run records it."""
        deadline = time.monotonic() + seconds
        try:
            while (problem := self.trouble()) is None and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except KeyboardInterrupt as interrupt:
            return interrupt
        return problem


_running: Heartbeat | None = None  # this process's, while a run with several processes trains


def running() -> Heartbeat | None:
    return _running


@contextmanager
def watching(state: Any, limit_s: int) -> Iterator[Heartbeat | None]:
    """This process beats while the block runs (several processes only). If the block fails, the others
    learn why; if it ends well, that this process left."""
    global _running
    if state.num_processes == 1:
        yield None
        return
    import torch.distributed as dist  # deferred: torch
    from torch.distributed.distributed_c10d import _get_default_store

    # The keys of this attempt only: torchrun keeps one store across the attempts of --max-restarts, and
    # the attempts' counts may differ between machines; so the main process names the attempt, once, while
    # every process has just joined the group.
    attempt = [uuid.uuid4().hex if state.is_main_process else None]
    dist.broadcast_object_list(attempt, src=0)
    # _get_default_store is private, but the only handle on the store every launcher already set up (and
    # every machine reaches) for the default group; a store of our own would need a second address.
    store = dist.PrefixStore(f"loratool/{attempt[0]}/", _get_default_store())
    beat = Heartbeat(store, state.process_index, state.num_processes, limit_s)
    beat.start()
    _running = beat
    try:
        yield beat
    except BaseException as exc:
        beat.publish_failure(exc)
        raise
    else:
        beat.leave()
    finally:
        _running = None
        beat.stop()


def is_collective_error(exc: BaseException) -> bool:
    """A collective that failed: NCCL's errors are DistErrors; gloo's (a timeout, a peer's connection
    reset) are plain RuntimeErrors raised from gloo's sources, which their message names."""
    import torch.distributed as dist  # deferred: torch

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc))


def explain(exc: BaseException) -> BaseException:
    """The error to report for `exc`: when another process failed or stopped answering, the error naming
    it (the cause chained, for the traceback), else `exc`. After a collective failed, the process behind it
    is waited for up to the limit."""
    beat = _running
    if beat is None or isinstance(exc, (LoratoolError, SystemExit, KeyboardInterrupt)):
        return exc
    problem: BaseException | None = beat.trouble()
    if problem is None and is_collective_error(exc):
        problem = beat.wait_for_trouble(beat.limit_s + 2 * beat.every)
    if problem is None:
        return exc
    problem.__cause__ = exc
    return problem


def wait_for_main_saves(trainer: Any) -> None:
    """After each checkpoint, the other processes wait for the main one to have written it, watching its
    beat; else they would wait in the next step's collective, which gives up after the limit however
    alive the main process is."""
    from transformers import TrainerCallback  # deferred: transformers loads torch

    beat = _running
    if beat is None:
        return

    class MainSavesFirst(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            key = f"saved/{state.global_step}"
            if state.is_world_process_zero:
                beat.post(key)
            else:
                beat.wait_for(key)

    trainer.add_callback(MainSavesFirst())
