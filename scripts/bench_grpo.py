"""GRPO step time on SmolLM2-135M-Instruct, against an SFT step on the same number of sequences, same run.

Both sides are real `loratool train` runs, each in a fresh process, on the demo's order-to-ticket task
(recipes/data/orders-*.jsonl), with the same LoRA (r=16, all linear layers) and the same sequences per
optimizer step: GRPO takes `--prompts` prompts x `--generations` completions of up to `--completion-tokens`
tokens (sampled at temperature 0.7, exact-match reward), SFT trains on prompts x generations rows of the
same task. A GRPO step generates those completions token by token (most of its time), scores them, and
trains on them; an SFT step only trains. GRPO's first step (kernel and allocator warm-up) is left out of
its per-step time; SFT's per-step time is the trainer's time over all its steps, first included, which
if anything favours GRPO in the ratio.

    python scripts/bench_grpo.py [--steps 5] [--prompts 4] [--generations 4] [--completion-tokens 36]

Prints each side's seconds per step (median over steps 2..N; GRPO's own `step_time` metric, and for SFT
the trainer's wall time over the steps), the GRPO / SFT ratio, the generation share and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = REPO / "recipes" / "data"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def prompt_rows(count: int) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "orders-train.jsonl").read_text().splitlines()][:count]
    return [
        {
            "prompt": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
            "answer": r["output"],
        }
        for r in rows
    ]


def train(recipe: dict, folder: Path, name: str) -> tuple[Path, float]:
    """`loratool train` in a fresh process; (its run directory, its wall time in seconds)."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "loratool", "train", str(path)], env=env, cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return Path(recipe["training"]["output_dir"]), time.perf_counter() - started


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion-tokens", type=int, default=36)
    args = parser.parse_args()
    if not SMOLLM2.is_file():
        sys.exit(f"{SMOLLM2} is missing: run `python scripts/fetch_smollm2.py` first")
    sequences = args.prompts * args.generations
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        folder = Path(tmp)
        training = {"max_steps": args.steps, "per_device_train_batch_size": sequences,
                    "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "warmup_steps": 0,
                    "logging_steps": 1, "save_steps": args.steps, "seed": 0}  # fmt: skip
        sft = {
            "base_model": str(SMOLLM2),
            "lora": LORA,
            "data": {
                "train": [{"path": str(DATA / "orders-train.jsonl"), "format": "alpaca"}],
                "max_length": 128,
            },
            "training": {**training, "output_dir": str(folder / "sft")},
        }
        prompts = folder / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(args.prompts * args.steps)))
        grpo = {
            "base_model": str(SMOLLM2),
            "lora": LORA,
            "data": {"train": [{"path": str(prompts)}], "max_length": 128},
            "grpo": {
                "num_generations": args.generations,
                "max_completion_length": args.completion_tokens,
                "temperature": 0.7,
                "rewards": [{"exact_match": "answer"}],
            },  # fmt: skip
            "training": {**training, "output_dir": str(folder / "grpo")},
        }
        sft_run, sft_wall = train(sft, folder, "sft")
        grpo_run, grpo_wall = train(grpo, folder, "grpo")
        sft_record = json.loads((sft_run / "run.json").read_text())
        sft_seconds = sft_record["train"]["train_seconds"] / sft_record["train"]["global_step"]
        logged = [r for r in metrics(grpo_run) if "step_time" in r]
        grpo_steps = [r["step_time"] for r in logged][1:] or [r["step_time"] for r in logged]
        grpo_seconds = statistics.median(grpo_steps)
        lengths = [r.get("completions/mean_length") for r in logged if r.get("completions/mean_length")]
    print(f"SmolLM2-135M-Instruct, LoRA r=16 all-linear, {sequences} sequences per step "
          f"({args.prompts} prompts x {args.generations} completions of up to {args.completion_tokens} tokens), "
          f"{args.steps} steps; {os.cpu_count()} CPUs; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")  # fmt: skip
    print("| side | s / step | ratio to SFT | process wall time s |")
    print("|---|---|---|---|")
    print(
        f"| SFT ({sequences} rows of the task, trainer time / steps) | {sft_seconds:.2f} | 1.00x | {sft_wall:.0f} |"
    )
    print(f"| GRPO (median step_time, steps 2..{args.steps}) | {grpo_seconds:.2f} | {grpo_seconds / sft_seconds:.2f}x | "
          f"{grpo_wall:.0f} |")  # fmt: skip
    if lengths:
        print(
            f"GRPO completions: mean length {statistics.mean(lengths):.1f} tokens; per-step times {grpo_steps}"
        )


if __name__ == "__main__":
    main()
