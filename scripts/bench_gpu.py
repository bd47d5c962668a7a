"""The GPU check, one command: loratool against the hand-written QLoRA recipe on 7B/8B shapes, in one run.

On one CUDA GPU, with no hub access, this builds random-weight models of Llama-2-7B's and Llama-3.1-8B's
shapes itself (bf16 safetensors; a small trained BPE tokenizer, so token ids stay below its size while
the embedding has the real vocabulary's rows), makes prompt/completion rows of ~max_length tokens, and
measures, for loratool and for the baseline (AutoModelForCausalLM + BitsAndBytesConfig + LoraConfig r=16
all-linear + SFTTrainer, padded batches), each side in its own process:

- QLoRA: nf4 + double quantization, bf16 compute, max_length 2048, batch 1 and the largest batch that
  fits (tried 2, 4, 8, ... until out of memory);
- bf16 LoRA (no quantization), batch 1.

Printed and written (--out, default out/bench-gpu/): real (non-padding) tokens per second of the
training loop, peak allocated CUDA memory, and the loratool / baseline ratios, as `bench_gpu.json` and
`bench_gpu.md` (paste the table into docs/benchmarks.md with the GPU's name). Goals (a benchmark, not a
test): QLoRA 7B at 2048 tokens <= 6.0 GB peak allocated, and >= 1.5x the baseline's real tokens/s.

How to run, on a machine with one H100/H200 (about 6-8 minutes; 64 GB of free disk for the two models):

    make install TORCH=torch            # the CUDA build of torch; bitsandbytes' wheels carry CUDA kernels
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_gpu.py [--models llama2-7b,llama3.1-8b] [--steps 6]

Wheels the machine needs (no hub, no compiler): torch (CUDA build), transformers, trl, peft,
bitsandbytes, accelerate, datasets and loratool's other dependencies, i.e. what `pip install -e .` pulls;
flash-attn is optional (the gpu tests skip its case without it). To carry them to an offline machine:
`pip download -d wheels torch --index-url https://download.pytorch.org/whl/cu128 && pip download -d
wheels -e .`, then `pip install --no-index --find-links wheels -e .` there.

`--cpu-smoke` runs the same code on tiny shapes on the CPU (a few seconds per side, fp32, no 4-bit
largest-batch search) so the script is known to work end to end before a GPU is at hand; a test runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                      vocab_size=32000, rope_theta=10000.0),
    "llama3.1-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                        vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vocab_size=512, rope_theta=10000.0),
}  # fmt: skip
WORDS = "the model learns to answer questions about data training loss adapter rank layer token batch".split()


def build_model(out: Path, shape: str, device: str) -> Path:
    """A random-weight Llama of `shape` written as bf16 (fp32 for the CPU smoke) safetensors, with the
    small trained tokenizer of loratool.model.tiny."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loratool.model.tiny import build_tiny_model

    s = SHAPES[shape]
    tokenizer_dir = build_tiny_model(out.parent / f"{out.name}-tokenizer", arch="llama")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=s["hidden_size"],
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"],
        intermediate_size=s["intermediate_size"],
        vocab_size=max(s["vocab_size"], len(tokenizer)),
        max_position_embeddings=4096,
        rope_theta=s["rope_theta"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # initialised on the GPU: seconds, not minutes
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def make_rows(path: Path, rows: int, words: int, seed: int = 0) -> None:
    """Prompt/completion rows of about `words` words each (the tokenizer makes ~1.3 tokens of a word)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 32))) + "?\n"
            completion = " ".join(rng.choice(WORDS) for _ in range(max(4, words - 32)))
            fh.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def run_side(role: str, job: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this process: `role` is baseline or loratool."""
    import torch

    cuda = torch.cuda.is_available() and not job["cpu"]
    started = time.perf_counter()
    if role == "baseline":
        trained = _baseline(job, cuda)
    else:
        trained = _loratool(job)
    return {
        **trained,
        "tokens_per_s": trained["real_tokens"] / trained["train_runtime_s"],
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _baseline(job: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The hand-written recipe from the TRL / PEFT docs: padded batches, no packing."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if cuda else torch.float32
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if job["qlora"]
        else None
    )
    model = AutoModelForCausalLM.from_pretrained(
        job["model"], dtype=dtype, quantization_config=quantization, device_map={"": 0 if cuda else "cpu"}
    )
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    dataset = load_dataset("json", data_files=job["data"], split="train")
    args = SFTConfig(
        output_dir=job["out"],
        per_device_train_batch_size=job["batch_size"],
        max_steps=job["steps"],
        learning_rate=2e-4,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=job["max_length"],
        bf16=cuda,
        use_cpu=not cuda,
        disable_tqdm=True,
        seed=0,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    result = trainer.train()
    rows = job["steps"] * job["batch_size"]
    real = sum(min(len(ids), job["max_length"]) for ids in trainer.train_dataset["input_ids"][:rows])
    return {
        "train_runtime_s": result.metrics["train_runtime"],
        "real_tokens": real,
        "loss": result.training_loss,
    }


def _loratool(job: dict[str, Any]) -> dict[str, Any]:
    """The same job as a recipe, through loratool's CLI."""
    from typer.testing import CliRunner

    from loratool.cli import app

    recipe: dict[str, Any] = {
        "base_model": job["model"],
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "data": {
            "train": [{"path": job["data"], "format": "prompt_completion"}],
            "max_length": job["max_length"],
        },
        "training": {
            "output_dir": job["out"],
            "per_device_train_batch_size": job["batch_size"],
            "gradient_accumulation_steps": 1,
            "max_steps": job["steps"],
            "learning_rate": 2e-4,
            "optim": "adamw_torch" if job["cpu"] else "paged_adamw_8bit",
            "gradient_checkpointing": True,
            "logging_steps": 1,
            "save_steps": 10_000,
            "seed": 0,
            "disable_tqdm": True,
        },
    }
    if job["qlora"]:
        recipe["quantization"] = {"load_in_4bit": True, "bnb_4bit_use_double_quant": True}
    path = Path(job["out"] + ".yaml")
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path), "--overwrite"])
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    rows = [json.loads(line) for line in (Path(job["out"]) / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((Path(job["out"]) / "run.json").read_text())
    runtime = next(r["train_runtime"] for r in rows if "train_runtime" in r)
    return {
        "train_runtime_s": float(runtime),
        "real_tokens": manifest["train"]["tokens_trained"],
        "loss": manifest["train"]["train_loss"],
    }


def measure(role: str, job: dict[str, Any]) -> dict[str, Any] | None:
    """Run one side in a fresh process (its own peak memory); None when it ran out of memory."""
    command = [sys.executable, __file__, "--role", role, "--job", json.dumps(job)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode == 0 and line is not None:
        return json.loads(line.removeprefix("RESULT "))
    if "out of memory" in (proc.stdout + proc.stderr).lower():
        return None
    raise SystemExit(f"{role} failed on {job}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | setup | batch | side | real tokens/s | peak allocated GB | speed ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for side in ("baseline", "loratool"):
            m = r[side]
            if m is None:
                lines.append(f"| {r['model']} | {r['setup']} | {r['batch']} | {side} | out of memory | | | |")
                continue
            peak = f"{m['peak_allocated_bytes'] / 1e9:.2f}" if m["peak_allocated_bytes"] else "-"
            ratios = ["", ""]
            if side == "loratool" and r["baseline"] is not None:
                ratios[0] = f"{m['tokens_per_s'] / r['baseline']['tokens_per_s']:.2f}x"
                if m["peak_allocated_bytes"] and r["baseline"]["peak_allocated_bytes"]:
                    ratios[1] = f"{m['peak_allocated_bytes'] / r['baseline']['peak_allocated_bytes']:.2f}x"
            lines.append(
                f"| {r['model']} | {r['setup']} | {r['batch']} | {side} | {m['tokens_per_s']:.0f} | {peak} "
                f"| {ratios[0]} | {ratios[1]} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="llama2-7b,llama3.1-8b", help="comma-separated: " + ", ".join(SHAPES)
    )
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per measurement")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--largest-batch-up-to", type=int, default=16, help="QLoRA batch search stops here")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-gpu")
    parser.add_argument(
        "--work", type=Path, default=None, help="where models are written (default: a temp dir)"
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script only"
    )
    parser.add_argument("--role", choices=["baseline", "loratool"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in SHAPES]
    if unknown:
        parser.error(f"unknown model shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.role:  # one side of one measurement, in its own process
        print("RESULT " + json.dumps(run_side(args.role, json.loads(args.job))), flush=True)
        return

    import torch

    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --cpu-smoke to check the script on the CPU")
    models = ["tiny"] if cpu else args.models.split(",")
    max_length, steps = (64, 2) if cpu else (args.max_length, args.steps)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if cpu else torch.cuda.get_device_name(0)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name in models:
        model_dir = build_model(work / name, name, "cpu" if cpu else "cuda")
        data = work / f"{name}.jsonl"
        make_rows(data, rows=steps * max(args.largest_batch_up_to, 1), words=int(max_length / 1.4))
        print(f"{name}: model written in {time.perf_counter() - started:.0f}s", flush=True)
        setups = [("qlora", True, 1), ("lora-bf16", False, 1)]
        if not cpu:
            batch = 2
            while batch <= args.largest_batch_up_to:
                setups.append(("qlora", True, batch))
                batch *= 2
        for setup, qlora, batch in setups:
            job = {"model": str(model_dir), "data": str(data), "batch_size": batch, "steps": steps,
                   "max_length": max_length, "qlora": qlora, "cpu": cpu}  # fmt: skip
            row: dict[str, Any] = {"model": name, "setup": setup, "batch": batch}
            for side in ("baseline", "loratool"):
                row[side] = measure(side, {**job, "out": str(work / f"{name}-{setup}-{batch}-{side}")})
            results.append(row)
            print(table([row]).splitlines()[-2:], flush=True)
            if batch > 1 and row["loratool"] is None and row["baseline"] is None:
                break  # neither side fits a larger batch
        if not cpu:
            for leftover in work.glob(f"{name}*"):
                subprocess.run(["rm", "-rf", str(leftover)], check=False)  # free the disk for the next model
    report = {"device": device, "max_length": max_length, "steps": steps, "results": results,
              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    (args.out / "bench_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = f"Device: {device} · max_length {max_length} · {steps} steps per row\n\n{table(results)}\n"
    (args.out / "bench_gpu.md").write_text(markdown)
    print(markdown)
    print(f"written: {args.out / 'bench_gpu.json'}, {args.out / 'bench_gpu.md'} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
