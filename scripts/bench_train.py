"""Training throughput: `loratool train` against the hand-written recipe, on the same job, in one run.

The baseline is what people write by hand from the TRL/PEFT docs: AutoModelForCausalLM + LoraConfig
(r=16, all-linear) + SFTTrainer on a prompt/completion dataset, no packing, batches padded to their
longest row. loratool runs the same job from a recipe: same model, data, masks (loss on completions +
EOS), hyperparameters, seed and example order — only how batches are laid out differs.

Each side runs in its own process so that peak memory (max RSS) is its own. Printed: real tokens
(non-padding) per second of training loop, peak RSS, final training loss, and the ratios.

    python scripts/bench_train.py [--rows 128] [--batch-size 8] [--hidden-size 512] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the model learns to answer questions about data training loss adapter rank layer token batch "
    "memory speed river mountain city history science music language number letter word sentence story "
    "explain describe list compare summarize write translate classify why how what when where which"
).split()


def make_dataset(path: Path, rows: int, seed: int) -> None:
    """Alpaca-like prompt/completion rows: short prompts, completions from a few to a few hundred tokens
    with a long tail (log-normal, median ~60 words), like instruction-tuning data."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(rows):
            prompt_words = rng.randint(4, 40)
            completion_words = min(350, max(2, int(rng.lognormvariate(math.log(60), 0.9))))
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words)).capitalize() + "?\n"
            completion = " ".join(rng.choice(WORDS) for _ in range(completion_words)).capitalize() + "."
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def run_baseline(model_dir: str, data: str, out: str, batch_size: int, max_length: int) -> dict:
    """The canonical hand-written recipe."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=data, split="train")
    peft_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        max_length=max_length,
        seed=0,
        disable_tqdm=True,
        bf16=False,  # SFTConfig defaults to bf16, which the trainer refuses on a machine without a GPU
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    result = trainer.train()
    real_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    return {
        "train_runtime_s": result.metrics["train_runtime"],
        "real_tokens": real_tokens,
        "train_loss": result.training_loss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_loratool(model_dir: str, data: str, out: str, batch_size: int, max_length: int) -> dict:
    """The same job as a recipe, through the real CLI entry point."""
    recipe = {
        "base_model": model_dir,
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": [{"path": data, "format": "prompt_completion"}], "max_length": max_length},
        "training": {
            "output_dir": out,
            "per_device_train_batch_size": batch_size,
            "gradient_accumulation_steps": 1,
            "num_train_epochs": 1,
            "learning_rate": 2e-4,
            "lr_scheduler_type": "linear",
            "warmup_steps": 0,
            "optim": "adamw_torch",
            "logging_steps": 10,
            "seed": 0,
            "disable_tqdm": True,
        },
    }
    recipe_path = Path(out).with_suffix(".yaml")
    recipe_path.write_text(yaml.safe_dump(recipe))
    from typer.testing import CliRunner

    from loratool.cli import app

    result = CliRunner().invoke(app, ["train", str(recipe_path)])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    manifest = json.loads((Path(out) / "run.json").read_text())
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    return {
        "train_runtime_s": float(runtime),
        "real_tokens": manifest["data"]["train"]["tokens"],
        "train_loss": manifest["train"]["train_loss"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=1376)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--role", choices=["baseline", "loratool"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    if args.role:  # one side of the comparison, in its own process
        side = run_baseline if args.role == "baseline" else run_loratool
        print("RESULT " + json.dumps(side(args.model, args.data, args.out, args.batch_size, args.max_length)))
        return

    from loratool.tiny_model import build_tiny_model, count_parameters

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_dir = build_tiny_model(
        work / "model",
        arch="llama",
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
    )
    data = work / "train.jsonl"
    make_dataset(data, args.rows, seed=0)
    print(
        f"model: random Llama, {count_parameters(model_dir) / 1e6:.1f}M parameters · data: {args.rows} rows"
    )
    results = {}
    for role in ("baseline", "loratool"):
        command = [
            sys.executable, __file__, "--role", role, "--model", str(model_dir), "--data", str(data),
            "--out", str(work / role), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        ]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{role} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[role] = json.loads(line.removeprefix("RESULT "))

    print(
        f"{'':10} {'real tokens':>12} {'train loop s':>13} {'tokens/s':>10} {'peak RSS MiB':>13} {'train loss':>11}"
    )
    for role, r in results.items():
        r["tokens_per_s"] = r["real_tokens"] / r["train_runtime_s"]
        print(
            f"{role:10} {r['real_tokens']:>12,} {r['train_runtime_s']:>13.1f} {r['tokens_per_s']:>10.0f} "
            f"{r['peak_rss_bytes'] / 2**20:>13.0f} {r['train_loss']:>11.4f}"
        )
    base, ours = results["baseline"], results["loratool"]
    print(
        f"speed ratio (loratool / baseline, real tokens per second): {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x"
    )
    print(f"peak memory ratio (loratool / baseline): {ours['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x")
    print(f"train loss difference: {abs(ours['train_loss'] - base['train_loss']):.4f}")


if __name__ == "__main__":
    main()
