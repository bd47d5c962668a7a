"""Training beside another process: how much slower each side trains when other work shares the cores.

On CI runners and shared boxes other processes use the cores. torch starts a thread per core whose waits
spin; a descheduled thread then holds up every barrier, and training slows far more than the share of the
machine it lost. loratool chooses its threads at start-up from how busy the cores are
(loratool/model/threads.py). This script measures, on one job (scripts/bench_train.py's shapes), each side
with the cores free and beside a competitor, interleaved over rounds:

  baseline          the hand-written TRL SFTTrainer job (bench_train's baseline), torch's default threads
  loratool_fixed    `loratool train` with OMP_NUM_THREADS set to every core (loratool before it chose)
  loratool          `loratool train` as it runs by default (it chooses its threads itself)

The competitor is `--competitors` processes that each keep one core busy (a pure-Python loop: no OpenMP
of its own), started before a run and stopped after it. Printed per side: real tokens/s free and busy,
busy / free (a process that loses k of n > k cores "degrades proportionally" at (n - k) / n; with
k >= n, at the time share n / (n + k)), the threads
and OpenMP wait policy the run used, and each side against the baseline under the same load.

    python scripts/bench_contention.py [--shape a] [--rounds 3] [--steps 10] [--competitors 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the sibling script: jobs, sides, one process per run)

SIDES = ("baseline", "loratool_fixed", "loratool")


def competitors(count: int) -> list[subprocess.Popen]:
    """`count` processes that each keep a core busy until killed."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    time.sleep(1.0)  # on the run queue before the measured process samples the load
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def run_side(side: str, job: dict, work: Path, cores: int, round_: int) -> dict:
    """bench_train's baseline or default side, with the threads this side stands for."""
    threads = cores if side == "loratool_fixed" else None  # None: no setting, each side's own default
    return bench_train.run_one("baseline" if side == "baseline" else "default", job, work, threads, round_)


def spread(values: list[float], fmt: str) -> str:
    return bench_train.summary(values, fmt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="a", help="a bench_train shape: a, b or smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--competitors", type=int, default=1, help="processes keeping one core busy each")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    job = bench_train.prepare(args.shape, work, args.steps)
    results: dict[tuple[str, str], list[dict]] = {(s, load): [] for s in SIDES for load in ("free", "busy")}
    for round_ in range(args.rounds):
        order = SIDES if round_ % 2 == 0 else SIDES[::-1]
        for side in order:
            for load in ("free", "busy") if round_ % 2 == 0 else ("busy", "free"):
                procs = competitors(args.competitors) if load == "busy" else []
                try:
                    r = run_side(side, job, work, cores, round_ * 2 + (load == "busy"))
                finally:
                    stop(procs)
                results[(side, load)].append(r)
                print(
                    f"  round {round_ + 1} {side} {load}: {r['tokens_per_s']:.0f} real tok/s, "
                    f"{r['threads']} threads, wait policy {r['wait_policy']}",
                    flush=True,
                )

    # The share of the machine left: the free cores when the competitors leave some, else a time share.
    k = args.competitors
    left = (cores - k) / cores if cores > k else cores / (cores + k)
    print(
        f"\nshape {args.shape}: {args.steps} steps x {args.rounds} rounds, {cores} cores, "
        f"{k} competitor(s): proportional = {left:.2f}x of free"
    )
    print(
        f"{'side':16} {'free tok/s':>18} {'busy tok/s':>18} {'busy/free':>18} {'threads busy':>12}  policy busy"
    )
    for side in SIDES:
        free, busy = results[(side, "free")], results[(side, "busy")]
        ratio = [b["tokens_per_s"] / f["tokens_per_s"] for b, f in zip(busy, free, strict=True)]
        print(
            f"{side:16} {spread([r['tokens_per_s'] for r in free], '.0f'):>18} "
            f"{spread([r['tokens_per_s'] for r in busy], '.0f'):>18} {spread(ratio, '.2f') + 'x':>18} "
            f"{statistics.median(r['threads'] for r in busy):>12.0f}  {busy[0]['wait_policy']}"
        )
    for load in ("free", "busy"):
        base = results[("baseline", load)]
        for side in SIDES[1:]:
            ratio = [
                o["tokens_per_s"] / b["tokens_per_s"]
                for o, b in zip(results[(side, load)], base, strict=True)
            ]
            print(f"{side} / baseline, cores {load}: real tokens/s {spread(ratio, '.2f')}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
