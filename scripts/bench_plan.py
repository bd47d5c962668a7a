"""How close `loratool plan` gets to the peak memory `loratool train` then records, on this CPU.

For each shape (a random Llama-style model of 30M-500M parameters, a batch size, a row length), the
script builds the model, writes rows long enough to fill max_length, asks the plan for its prediction
(the same make_plan the CLI uses, from the config alone) and trains 2 steps with `loratool train` in a
fresh process, then compares the plan's peak with run.json's peak_memory_bytes.process_rss (the
process's maximum resident set). Prints a Markdown table for docs/benchmarks.md.

    python scripts/bench_plan.py [--quick]        # --quick: the three smallest shapes
    python scripts/bench_plan.py --only 8,9       # only these shapes (positions in SHAPES)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, hidden, layers, heads, kv heads, intermediate, batch, max_length, gradient checkpointing:
# false, true, or n for every n-th layer)
SHAPES = [
    ("30M", 576, 8, 8, 4, 1536, 1, 128, False),
    ("30M", 576, 8, 8, 4, 1536, 4, 512, False),
    ("100M", 768, 12, 12, 4, 2048, 2, 256, False),
    ("100M", 768, 12, 12, 4, 2048, 8, 512, False),
    ("100M", 768, 12, 12, 4, 2048, 8, 512, True),
    ("250M", 1024, 16, 16, 4, 2816, 2, 512, False),
    ("500M", 1536, 16, 16, 4, 4096, 1, 256, False),
    ("500M", 1536, 16, 16, 4, 4096, 4, 256, True),
    ("100M", 768, 12, 12, 4, 2048, 8, 512, 2),
    ("500M", 1536, 16, 16, 4, 4096, 4, 256, 2),
]


def long_rows(path: Path, count: int = 64) -> None:
    """Text rows of ~1,500 tokens each: every row fills max_length."""
    words = "the model learns to answer questions about data training loss adapter rank layer".split()
    with path.open("w") as out:
        for i in range(count):
            text = " ".join(words[(i + k) % len(words)] for k in range(1500))
            out.write(json.dumps({"text": text}) + "\n")


def run_shape(shape: tuple, folder: Path) -> dict:
    from loratool.model.tiny import build_tiny_model, count_parameters
    from loratool.recipe import validate_recipe
    from loratool.train.plan import make_plan, model_shape

    name, hidden, layers, heads, kv, inter, batch, length, checkpointing = shape
    model_dir = folder / f"model-{name}"
    if not model_dir.exists():
        build_tiny_model(
            model_dir,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            intermediate_size=inter,
            max_position_embeddings=2048,
        )
    data = folder / "rows.jsonl"
    if not data.exists():
        long_rows(data)
    raw = {
        "base_model": str(model_dir),
        "lora": {"r": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
        "data": {"train": [{"path": str(data), "format": "text"}], "max_length": length},
        "training": {
            "output_dir": str(folder / f"run-{name}-{batch}-{length}-{checkpointing}"),
            "max_steps": 2,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": checkpointing,
            "logging_steps": 1,
            "save_steps": 2,
        },
    }
    recipe = validate_recipe(raw)
    from transformers import AutoConfig

    plan = make_plan(recipe, model_shape(recipe, AutoConfig.from_pretrained(model_dir)), device="cpu")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    started = time.time()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "loratool", "train", str(path), "--overwrite"],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    record = json.loads((Path(raw["training"]["output_dir"]) / "run.json").read_text())
    measured = record["peak_memory_bytes"]["process_rss"]
    return {
        "shape": name,
        "parameters": count_parameters(model_dir),
        "batch": batch,
        "max_length": length,
        "checkpointing": checkpointing,
        "predicted": plan.peak_memory_bytes,
        "measured": measured,
        "error": plan.peak_memory_bytes / measured - 1,
        "components": plan.components,
        "seconds": round(time.time() - started),
    }


def repredict(results: list[dict]) -> list[dict]:
    """The plan's prediction again for recorded measurements (after a change of the formula), from
    configs alone: no model is built and nothing trains."""
    from loratool.model.tiny import _make_config, build_tokenizer
    from loratool.recipe import validate_recipe
    from loratool.train.plan import make_plan, model_shape

    vocab = len(build_tokenizer(512))
    by_key = {(s[0], s[6], s[7], s[8]): s for s in SHAPES}
    for r in results:
        name, hidden, layers, heads, kv, inter, batch, length, checkpointing = by_key[
            (r["shape"], r["batch"], r["max_length"], r["checkpointing"])
        ]
        config = _make_config(
            "llama",
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            tie_word_embeddings=False,
        )
        recipe = validate_recipe(
            {
                "base_model": "m",
                "lora": {"r": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
                "data": {"train": [{"path": "rows.jsonl", "format": "text"}], "max_length": length},
                "training": {
                    "output_dir": "out",
                    "per_device_train_batch_size": batch,
                    "gradient_accumulation_steps": 1,
                    "gradient_checkpointing": checkpointing,
                },
            }
        )
        plan = make_plan(recipe, model_shape(recipe, config), device="cpu")
        r["predicted"] = plan.peak_memory_bytes
        r["error"] = plan.peak_memory_bytes / r["measured"] - 1
    return results


def checkpointing_label(value: bool | int) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"1 layer in {value}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="only the three smallest shapes")
    parser.add_argument("--only", help="comma-separated positions in the shape list (from 0), e.g. 8,9")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--repredict",
        type=Path,
        help="a --json file of earlier measurements: predict them again, train nothing",
    )
    args = parser.parse_args()
    shapes = SHAPES[:3] if args.quick else SHAPES
    if args.only:
        shapes = [SHAPES[int(i)] for i in args.only.split(",")]
    results = []
    if args.repredict:
        results = repredict(json.loads(args.repredict.read_text()))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-plan-") as folder:
            for shape in shapes:
                result = run_shape(shape, Path(folder))
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "components"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    gib = 1024**3
    print("\n| model | parameters | batch x max_length | checkpointing | predicted | measured | error |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['shape']} | {r['parameters'] / 1e6:.0f}M | {r['batch']} x {r['max_length']} | "
            f"{checkpointing_label(r['checkpointing'])} | {r['predicted'] / gib:.2f} GiB | "
            f"{r['measured'] / gib:.2f} GiB | {r['error']:+.1%} |"
        )
    worst = max(abs(r["error"]) for r in results)
    print(f"\nworst error {worst:.1%} over {len(results)} shapes")


if __name__ == "__main__":
    main()
