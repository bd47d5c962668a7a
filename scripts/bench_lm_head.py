"""TRL's fused LM head on CPU at a given vocabulary: time and memory of one forward + backward, by vocabulary
tile width and number of scored positions; each configuration in its own process.

What loratool's CPU vocabulary tiles (loratool/train/memory/loss_positions.py) and scoring only the loss
positions do to a model's head, isolated from the rest of a training step. The defaults are Gemma-3-270m's
head (262,144 x 640, tied and frozen under LoRA) and the fields SFTTrainer asks the head for (log-probs,
entropy, top-1), at TRL's tile (32,768 columns) and loratool's (4,096). Printed per configuration: median
wall and CPU seconds of forward + backward (after one warm-up), and the peak RSS the calls added on top of
the weights.

    python scripts/bench_lm_head.py [--vocab 262144] [--hidden 640] [--positions 260,752,1600]
                                    [--tiles 4096,32768] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer's fused head computes (trl sft_trainer.py)


def one(vocab: int, hidden: int, positions: int, tile: int, repeats: int) -> dict:
    import resource
    import time

    import torch
    from trl.trainer.utils import _ChunkedLogProbFunction

    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden).mul_(0.02)  # frozen: no weight gradient, as under LoRA
    x = torch.randn(positions, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        log_probs, *_ = _ChunkedLogProbFunction.apply(x, weight, None, targets, 1.0, tile, None, 1.0, OUTPUTS)
        (-log_probs.sum()).backward()
        x.grad = None
        return time.perf_counter() - wall, time.process_time() - cpu

    step()  # warm-up
    times = [step() for _ in range(repeats)]
    return {
        "wall_s": statistics.median(t[0] for t in times),
        "cpu_s": statistics.median(t[1] for t in times),
        "added_rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--positions", default="260,752,1600", help="comma-separated scored positions")
    parser.add_argument("--tiles", default="4096,32768", help="comma-separated vocabulary tile widths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # positions,tile: run in this process
    args = parser.parse_args()
    if args.one:
        positions, tile = (int(v) for v in args.one.split(","))
        print("RESULT " + json.dumps(one(args.vocab, args.hidden, positions, tile, args.repeats)))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"head {args.vocab:,} x {args.hidden}, outputs {', '.join(OUTPUTS)}, {args.threads} threads")
    print(f"{'positions':>9} {'tile':>6} {'wall s':>7} {'CPU s':>7} {'added RSS MiB':>14}")
    for positions in (int(p) for p in args.positions.split(",")):
        for tile in (int(t) for t in args.tiles.split(",")):
            command = [sys.executable, __file__, "--one", f"{positions},{tile}"]
            command += [
                "--vocab",
                str(args.vocab),
                "--hidden",
                str(args.hidden),
                "--repeats",
                str(args.repeats),
            ]
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(line.removeprefix("RESULT "))
            print(
                f"{positions:>9} {tile:>6} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} {r['added_rss_mib']:>14.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
