"""TRL's fused LM head on CPU at a given vocabulary: time and memory of one forward + backward, by vocabulary
tile width and number of scored positions.

What loratool's CPU vocabulary tiles (loratool/train/memory/loss_positions.py) and scoring only the loss
positions do to a model's head, isolated from the rest of a training step. The defaults are Gemma-3-270m's
head (262,144 x 640, tied and frozen under LoRA) and the fields SFTTrainer asks the head for (log-probs,
entropy, top-1), at TRL's tile (32,768 columns) and loratool's (4,096).

Times: for each number of positions, one process runs forward + backward with every tile width in turn,
`--repeats` times (the order alternating), after one warm-up each, so that load from other jobs hits the
widths alike; printed: median CPU and wall seconds, and the median ratio of each width to the first.
Memory: one process per (positions, width), one call after a warm-up; printed: the peak RSS the calls added
on top of the weights. On cores other jobs share, prefer `--threads 1`: with two threads every tile is a
parallel region whose barrier waits for a descheduled thread, which penalises small tiles.

    python scripts/bench_lm_head.py [--vocab 262144] [--hidden 640] [--positions 256,752]
                                    [--tiles 4096,32768] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer's fused head computes (trl sft_trainer.py)


def head(vocab: int, hidden: int, positions: int):
    """One forward + backward of the fused head, as a function of the tile width."""
    import torch
    from trl.trainer.utils import _ChunkedLogProbFunction

    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden).mul_(0.02)  # frozen: no weight gradient, as under LoRA
    x = torch.randn(positions, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,))

    def step(tile: int) -> None:
        log_probs, *_ = _ChunkedLogProbFunction.apply(x, weight, None, targets, 1.0, tile, None, 1.0, OUTPUTS)
        (-log_probs.sum()).backward()
        x.grad = None

    return step


def times(vocab: int, hidden: int, positions: int, tiles: list[int], repeats: int) -> dict:
    import time

    step = head(vocab, hidden, positions)
    for tile in tiles:
        step(tile)  # warm-up
    measured: dict[int, list[tuple[float, float]]] = {tile: [] for tile in tiles}
    for i in range(repeats):
        for tile in tiles if i % 2 == 0 else tiles[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            step(tile)
            measured[tile].append((time.perf_counter() - wall, time.process_time() - cpu))
    first = tiles[0]
    return {
        str(tile): {
            "wall_s": statistics.median(w for w, _ in runs),
            "cpu_s": statistics.median(c for _, c in runs),
            "cpu_vs_first": statistics.median(
                c / m[1] for (_, c), m in zip(runs, measured[first], strict=True)
            ),
        }
        for tile, runs in measured.items()
    }


def added_rss(vocab: int, hidden: int, positions: int, tile: int) -> float:
    import resource

    step = head(vocab, hidden, positions)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(tile)
    step(tile)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def child(args: argparse.Namespace, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    command += ["--tiles", args.tiles, "--repeats", str(args.repeats), *extra]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(line.removeprefix("RESULT "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--positions", default="256,752", help="comma-separated scored positions")
    parser.add_argument("--tiles", default="4096,32768", help="comma-separated vocabulary tile widths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--times", type=int, help=argparse.SUPPRESS)  # positions: the timing process
    parser.add_argument("--rss", help=argparse.SUPPRESS)  # positions,tile: one memory process
    args = parser.parse_args()
    tiles = [int(t) for t in args.tiles.split(",")]
    if args.times:
        result = times(args.vocab, args.hidden, args.times, tiles, args.repeats)
        print("RESULT " + json.dumps(result))
        return 0
    if args.rss:
        positions, tile = (int(v) for v in args.rss.split(","))
        print("RESULT " + json.dumps(added_rss(args.vocab, args.hidden, positions, tile)))
        return 0

    print(f"head {args.vocab:,} x {args.hidden}, outputs {', '.join(OUTPUTS)}, {args.threads} thread(s)")
    print(
        f"{'positions':>9} {'tile':>6} {'CPU s':>7} {'wall s':>7} {'CPU vs first':>13} {'added RSS MiB':>14}"
    )
    for positions in (int(p) for p in args.positions.split(",")):
        timed = child(args, "--times", str(positions))
        for tile in tiles:
            rss = child(args, "--rss", f"{positions},{tile}")
            t = timed[str(tile)]
            print(
                f"{positions:>9} {tile:>6} {t['cpu_s']:>7.2f} {t['wall_s']:>7.2f} {t['cpu_vs_first']:>12.2f}x "
                f"{rss:>14.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
