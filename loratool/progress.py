"""Progress of a long step, for a terminal or a log file: a line with the rate and the time left.

At the bottom of the flow: loading, converting, merging, exporting, evaluating and training all report
through it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


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
            line += f" · ETA {clock((self.total - done) / rate)}"
        return line


@contextmanager
def still_running(
    what: str, write: Callable[[str], None], every: float = 15.0
) -> Iterator[Callable[[str], None]]:
    """For one long library call that reports nothing itself (loading a model): a line from a side thread
    saying that it is still running and for how long, whenever `every` seconds pass with no other line.
    Yields the writer to report through inside (its lines count as signs of life)."""
    done = threading.Event()
    started = time.monotonic()
    last = [started]

    def written(line: str) -> None:
        last[0] = time.monotonic()
        write(line)

    def beat() -> None:
        while not done.wait(max(0.0, last[0] + every - time.monotonic())):
            if time.monotonic() - last[0] >= every:
                written(f"{what}: still running, {clock(time.monotonic() - started)} so far")

    thread = threading.Thread(target=beat, name="loratool-still-running", daemon=True)
    thread.start()
    try:
        yield written
    finally:
        done.set()
        thread.join()


def _singular(unit: str) -> str:
    """ "batches" -> "batch", "rows" -> "row" (units are English plurals)."""
    if unit.endswith(("ches", "shes", "sses", "xes")):
        return unit[:-2]
    return unit[:-1] if unit.endswith("s") else unit


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
