"""How many CPU threads a loratool process computes with, chosen at start-up from how busy the cores are.

torch starts one OpenMP thread per core and, between parallel regions, lets each spin while it waits for
the others. On cores that other processes also use (CI runners, shared boxes) a thread that the kernel
has descheduled holds up every barrier while the others burn their time slices spinning: a tiny model
then took ~100 s per step instead of ~10 s, and Gemma made no step in 40 minutes (docs/benchmarks.md,
"Training beside another process"). So when other processes keep cores busy at start-up, loratool asks
for one thread per core that is free and lets waiting threads sleep (OMP_WAIT_POLICY=PASSIVE); on a
quiet machine it changes nothing. Both must be set before torch is imported: OpenMP reads them once.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

# Below this many busy cores the machine counts as quiet: a shell, an editor or a log shipper.
QUIET_BELOW = 0.5
SAMPLE_SECONDS = 0.1
USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class CpuThreads:
    """The choice: `threads` None leaves torch's own default (a thread per core)."""

    threads: int | None
    cores: int  # the cores this process may run on (its CPU affinity)
    busy: float | None  # cores other processes kept busy while sampled; None: not measurable here
    why: str

    @property
    def contended(self) -> bool:
        return self.threads is not None and self.why.startswith("other processes")

    def describe(self) -> str:
        """The start-up line."""
        if self.threads is None:
            return f"CPU threads: {self.cores} ({self.why})"
        return f"CPU threads: {self.threads} of {self.cores} cores ({self.why})"

    def record(self) -> dict[str, object]:
        """For run.json's hardware record and `plan`."""
        busy = None if self.busy is None else round(self.busy, 2)
        return {
            "threads": self.threads or self.cores,
            "cores": self.cores,
            "busy_cores": busy,
            "why": self.why,
        }


def process_cores() -> int:
    """The cores this process may run on (taskset and cgroup cpusets narrow it), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(sample_s: float = SAMPLE_SECONDS) -> float | None:
    """How many of this process's cores other processes keep busy, from two readings of /proc/stat
    `sample_s` apart (this process sleeps in between, so the time is theirs); None off Linux."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    def read() -> dict[int, tuple[int, int]] | None:
        try:
            lines = open("/proc/stat", encoding="ascii").read().splitlines()  # noqa: SIM115
        except OSError:
            return None
        times = {}
        for line in lines:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                idle = ticks[3] + ticks[4]
                times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
        return times

    before = read()
    if not before:
        return None
    time.sleep(sample_s)
    after = read() or {}
    busy = 0.0
    for cpu in cpus if cpus is not None else sorted(before):
        if cpu in before and cpu in after:
            used, total = (a - b for a, b in zip(after[cpu], before[cpu], strict=True))
            busy += used / total if total > 0 else 0.0
    return busy


def choose(
    env: MutableMapping[str, str] | None = None,
    *,
    cores: int | None = None,
    measure: Callable[[], float | None] = busy_cores,
) -> CpuThreads:
    """The thread count for this process: the user's OMP_NUM_THREADS when set (torchrun sets it to 1 for
    several processes per machine), else one per free core when other processes keep some busy, else the
    libraries' default."""
    env = os.environ if env is None else env
    cores = cores or process_cores()
    for name in USER_SETTINGS:
        if env.get(name, "").strip():
            value = env[name].strip()
            threads = int(value) if value.isdigit() and int(value) > 0 else None
            return CpuThreads(threads, cores, None, f"{name}={value} set in the environment")
    busy = measure()
    if busy is None:
        return CpuThreads(None, cores, None, "core load not measurable here")
    if busy < QUIET_BELOW:
        return CpuThreads(None, cores, busy, "the cores are free")
    # A core that is more than a quarter busy is given to the other process: a thread there would be
    # descheduled often enough to hold up every barrier.
    free = max(1, cores - math.ceil(busy - 0.25))
    why = f"other processes keep {busy:.1f} busy; waiting threads sleep instead of spinning"
    return CpuThreads(free, cores, busy, why)


def apply(choice: CpuThreads, env: MutableMapping[str, str] | None = None) -> None:
    """Set the choice for this process's OpenMP and MKL, before torch is imported. A user's setting is
    left as it is."""
    env = os.environ if env is None else env
    if not choice.contended:
        return
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(choice.threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
