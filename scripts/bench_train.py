"""Training throughput: the hand-written baseline against `loratool train` (default, and packing), interleaved.

The baseline is what people write by hand from the TRL/PEFT docs: AutoModelForCausalLM + LoraConfig
(r=16, alpha 32, all-linear) + SFTTrainer with TRL's defaults, batches padded to their longest row,
bf16=False (a CPU has no bf16 autocast the trainer accepts). loratool runs the same job from a recipe through
its real entry point (`python -m loratool train`): same model, data, masks, hyperparameters, seed and, for
the default (padding-free) mode, the same examples in the same steps. `packing` packs the same data.

Shapes (all fp32; the CPU threads are set by --threads):
  a        random Llama, hidden 256, MLP 688, 4 layers, 8 heads / 4 KV heads, vocab 2,000; 2,000 alpaca rows
           (Alpaca prompt template) of 65-450 tokens, mean ~185; max_length 512, micro-batch 8, 30 steps
  b        the same data on a wider random Llama: hidden 1024, MLP 2752, 8 layers
  smollm2  SmolLM2-135M-Instruct on the demo task (recipes/smollm2-demo.yaml: 480 orders, chat template,
           micro-batch 8, 24 steps); `python scripts/fetch_smollm2.py` first

Every run is its own process (peak RSS is its own; launch-to-first-step counts the interpreter and
imports), and rounds interleave the sides so that load from other jobs hits them alike. Printed per shape
and side: real (non-padding) tokens per second of the training loop, loop time, launch to first step,
peak RSS, mean loss per loss-carrying token; medians with [min-max] over rounds, and the ratios.

loratool's default checkpoints every other decoder layer (`training.gradient_checkpointing: 2`); the
baseline, with TRL's default, every layer. `--sides ...,checkpointing` adds loratool with every layer
checkpointed (`true`), `--sides ...,no_checkpointing` with none (`false`); `--sides ...,baseline_malloc` adds the baseline with glibc's mmap threshold fixed at 128 KiB
(MALLOC_MMAP_THRESHOLD_): what returning every freed activation to the system costs and saves.
`baseline_no_checkpointing` is the baseline with `gradient_checkpointing=False`, as a user turns TRL's
default off; `without_SAVER` (SAVER one of SAVERS) is loratool's default with that memory saver off and
the others as loratool chooses them (loratool/train/memory/__init__.py). scripts/bench_arch.py runs these
sides on every architecture.

    python scripts/bench_train.py [--shapes a,b,smollm2] [--rounds 3] [--sides baseline,default,packing]
                                  [--steps N] [--threads 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = ("baseline", "default", "packing")
# Optional: the baseline with glibc's mmap threshold fixed at 128 KiB (freed activations go back to the
# system at once): what that setting does to peak RSS and speed; loratool with every decoder layer
# checkpointed, and with none.
# The memory savers loratool chooses per model (the switches of loratool.train.memory.MemorySavers; not
# imported here, so that the harness's own process stays light).
SAVERS = ("mask_dropout", "loss_positions", "cpu_vocab_tiles", "cheap_recompute")
EXTRA_SIDES = (
    "baseline_malloc",
    "baseline_no_checkpointing",
    "checkpointing",
    "no_checkpointing",
    *(f"without_{saver}" for saver in SAVERS),
)
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
CHECKPOINTING = {"checkpointing": True, "no_checkpointing": False}  # the others: the recipe's default
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
SMOLLM2_GGUF = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_RECIPE = REPO / "recipes" / "smollm2-demo.yaml"

RANDOM_MODELS = {
    "a": {"hidden_size": 256, "intermediate_size": 688, "num_layers": 4},
    "b": {"hidden_size": 1024, "intermediate_size": 2752, "num_layers": 8},
}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
WORDS = (
    "the model learns to answer questions about data training loss adapter rank layer token batch memory "
    "speed river mountain city history science music language number letter word sentence story explain "
    "describe list compare summarize write translate classify why how what when where which"
).split()


# ---------------------------------------------------------------------------------------------- the jobs


def make_alpaca_rows(tokenizer, rows: int, seed: int) -> list[dict]:
    """Alpaca rows whose prompt (template included) is 60-150 tokens (mean ~76) and whose output is 5-30
    tokens (30%), 30-150 (40%) or 150-300 (30%): templated examples of ~65-450 tokens, mean ~185."""
    rng = random.Random(seed)
    template_tokens = len(tokenizer(ALPACA_PROMPT.format(instruction="", input=""))["input_ids"])

    def text(tokens: int) -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(tokens * 2))
        return tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][: max(1, tokens)])

    out = []
    for _ in range(rows):
        prompt = min(150, 60 + int(rng.expovariate(1 / 16)))
        kind = rng.random()
        output = (
            rng.randint(5, 30)
            if kind < 0.3
            else rng.randint(30, 150)
            if kind < 0.7
            else rng.randint(150, 300)
        )
        free = max(4, prompt - template_tokens)
        instruction_tokens = rng.randint(2, max(2, free // 2))
        out.append(
            {
                "instruction": text(instruction_tokens).strip().capitalize() + ".",
                "input": text(free - instruction_tokens).strip(),
                "output": text(output - 1).strip().capitalize() + ".",
            }
        )
    return out


def prepare(shape: str, work: Path, steps: int | None) -> dict:
    """Model directory, data files and the job's settings for one shape (built once, shared by all runs)."""
    if shape in RANDOM_MODELS:
        from transformers import AutoTokenizer

        from loratool.model.tiny import build_tiny_model, count_parameters

        model_dir = work / f"model-{shape}"
        build_tiny_model(
            model_dir, arch="llama", num_heads=8, num_kv_heads=4, vocab_size=2000, **RANDOM_MODELS[shape]
        )
        data_file = work / "alpaca.jsonl"
        if not data_file.exists():
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            rows = make_alpaca_rows(tokenizer, 2000, seed=0)
            data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
            # The same rows as prompt / completion text, for loratool (the baseline builds it in memory).
            (work / "prompt-completion.jsonl").write_text(
                "".join(
                    json.dumps({"prompt": ALPACA_PROMPT.format(**r), "completion": r["output"]}) + "\n"
                    for r in rows
                )
            )
        return {
            "shape": shape,
            "model": str(model_dir),
            "parameters": count_parameters(model_dir),
            "data": str(data_file),
            "format": "alpaca_prompt",  # rendered with ALPACA_PROMPT into prompt / completion text
            "max_length": 512,
            "batch_size": 8,
            "steps": steps or 30,
            "learning_rate": 2e-4,
            "warmup_steps": 0,
            "lora_dropout": 0.05,
        }
    if shape == "smollm2":
        import yaml

        from loratool.model.gguf_base import resolve_base_model

        if not SMOLLM2_GGUF.is_file():
            raise SystemExit(f"{SMOLLM2_GGUF} is missing: run `python scripts/fetch_smollm2.py` first")
        demo = yaml.safe_load(DEMO_RECIPE.read_text())
        return {
            "shape": shape,
            "model": str(resolve_base_model(str(SMOLLM2_GGUF), print)),  # the cached HF conversion
            "parameters": None,
            "data": str((DEMO_RECIPE.parent / demo["data"]["train"][0]["path"]).resolve()),
            "format": "alpaca_chat",  # rendered with the model's chat template
            "max_length": demo["data"]["max_length"],
            "batch_size": demo["training"]["per_device_train_batch_size"],
            "steps": steps or demo["training"]["max_steps"],
            "learning_rate": demo["training"]["learning_rate"],
            "warmup_steps": demo["training"]["warmup_steps"],
            "lora_dropout": demo["lora"]["lora_dropout"],
        }
    raise SystemExit(f"unknown shape {shape!r}: choose from a, b, smollm2")


def loratool_order(rows: list[dict], seed: int) -> list[dict]:
    """The rows in the order loratool's data module puts them (it shuffles with training.seed), so that the
    baseline's sampler, seeded alike, puts the same examples in the same steps."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def baseline_dataset(job: dict):
    """The job's rows as TRL prompt-completion data, in loratool's order."""
    from datasets import Dataset

    rows = loratool_order([json.loads(line) for line in Path(job["data"]).read_text().splitlines()], seed=0)
    if job["format"] == "alpaca_prompt":
        records = [{"prompt": ALPACA_PROMPT.format(**r), "completion": r["output"]} for r in rows]
    else:  # conversational: TRL applies the chat template, loss on the assistant turn
        records = [
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""),
                    }
                ],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in rows
        ]
    return Dataset.from_list(records)


# ------------------------------------------------------------------------------------------- the sides


def run_baseline(job: dict, out: Path, checkpointing: bool = True) -> None:
    """The hand-written recipe (`checkpointing=False`: with TRL's default gradient checkpointing turned off)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=job["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=job["steps"],
        learning_rate=job["learning_rate"],
        warmup_steps=job["warmup_steps"],
        lr_scheduler_type="linear",
        optim="adamw_torch",
        save_strategy="no",
        report_to="none",
        max_length=job["max_length"],
        seed=0,
        disable_tqdm=True,
        bf16=False,  # SFTConfig defaults to bf16, which the trainer refuses on a machine without a GPU
        # TRL's default is True; a user turning it off writes the name TRL documents.
        **({} if checkpointing else {"gradient_checkpointing": False}),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=baseline_dataset(job),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()


def run_loratool(
    job: dict, out: Path, packing: bool, checkpointing: bool | None = None, without: str | None = None
) -> dict:
    """The same job as a recipe, through `python -m loratool train` (run in this process), with the memory
    saver `without` off; returns the memory savers the run installed (MemorySavers.record())."""
    import runpy

    import yaml

    from loratool.train import memory

    installed: dict = {}
    apply = memory.apply

    def apply_and_note(model, hw, savers=None):
        if without is not None:
            savers = memory.choose(model.config, hw).without(without, "benchmark ablation")
        chosen = apply(model, hw, savers)
        installed.update(chosen.record())
        return chosen

    memory.apply = apply_and_note  # run.py calls memory.apply(model, hw) through the module

    source = {"path": job["data"], "format": "alpaca"}
    if job["format"] == "alpaca_prompt":  # the same prompt / completion text the baseline reads
        source = {
            "path": str(Path(job["data"]).with_name("prompt-completion.jsonl")),
            "format": "prompt_completion",
        }
    recipe = {
        "base_model": job["model"],
        "model": {"dtype": "float32"},
        "lora": {
            "r": 16,
            "lora_alpha": 32,
            "lora_dropout": job["lora_dropout"],
            "target_modules": "all-linear",
        },
        "data": {"train": [source], "max_length": job["max_length"], "packing": packing},
        "training": {
            "output_dir": str(out),
            "per_device_train_batch_size": job["batch_size"],
            "gradient_accumulation_steps": 1,
            "max_steps": job["steps"],
            "learning_rate": job["learning_rate"],
            "lr_scheduler_type": "linear",
            "warmup_steps": job["warmup_steps"],
            "optim": "adamw_torch",
            "seed": 0,
            "disable_tqdm": True,
            **({} if checkpointing is None else {"gradient_checkpointing": checkpointing}),
        },
    }
    recipe_path = out.with_suffix(".yaml")
    recipe_path.write_text(yaml.safe_dump(recipe))
    sys.argv = ["loratool", "train", str(recipe_path), "--overwrite"]
    try:
        runpy.run_module("loratool", run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
    return installed


def measure(side: str, job: dict, out: Path) -> dict:
    """Run one side with the trainer's training_step wrapped: when the first step starts, each step's real
    tokens, loss tokens and loss. Importing the trainer here costs nothing extra: every side needs it."""
    import torch
    from transformers import Trainer
    from transformers.modeling_layers import GradientCheckpointingLayer

    steps: list[dict] = []
    checkpointing: list[int] = []
    original = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        start, cpu = time.time(), time.process_time()
        labels = inputs["labels"][..., 1:]
        mask = inputs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        loss = original(self, model, inputs, *args, **kwargs)
        steps.append(
            {
                "start": start,
                "real": real,
                "loss_tokens": int((labels != -100).sum()),
                "loss": float(loss),
                # forward + backward only (the optimizer step follows it); CPU seconds of every thread: with one
                # thread (--threads 1) steadier than wall time when other jobs share the cores
                "wall_s": time.time() - start,
                "cpu_s": time.process_time() - cpu,
            }
        )
        # Decoder layers that recompute their activations (not imported from loratool: the baseline runs here too).
        checkpointing.append(
            sum(
                isinstance(m, GradientCheckpointingLayer) and bool(m.gradient_checkpointing)
                for m in model.modules()
            )
        )
        return loss

    Trainer.training_step = training_step
    savers, failed_after_loop = None, None
    try:
        if side.startswith("baseline"):
            run_baseline(job, out, checkpointing=side != "baseline_no_checkpointing")
        else:
            savers = run_loratool(
                job,
                out,
                packing=side == "packing",
                checkpointing=CHECKPOINTING.get(side),
                without=side.removeprefix("without_") if side.startswith("without_") else None,
            )
    except SystemExit as exc:
        # A failure after the last training step (writing the run directory) leaves the loop's figures
        # valid; they are kept, and the harness says the run failed.
        if len(steps) < job["steps"]:
            raise
        failed_after_loop = f"exit {exc.code} after the training loop"
    n = len(steps)
    later = steps[1:] or steps  # the first step also pays for warm-up
    loop_s = (
        (steps[-1]["start"] - steps[0]["start"]) * n / (n - 1)
    )  # without what follows the last step (a save)
    real = sum(s["real"] for s in steps)
    loss_tokens = sum(s["loss_tokens"] for s in steps)
    return {
        "first_step_at": steps[0]["start"],
        "steps": n,
        "loop_s": loop_s,
        "real_tokens": real,
        "loss_tokens": loss_tokens,
        "tokens_per_s": real / loop_s,
        "loss_per_token": sum(s["loss"] * s["loss_tokens"] for s in steps) / loss_tokens,
        "step_tokens": [s["real"] for s in steps],
        "step_losses": [s["loss"] for s in steps],
        "step_wall_s": statistics.median(s["wall_s"] for s in later),
        "step_cpu_s": statistics.median(s["cpu_s"] for s in later),
        "savers": savers,
        "failed_after_loop": failed_after_loop,
        "checkpointed_layers": checkpointing[0],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
    }


# ----------------------------------------------------------------------------------------- the harness


def run_one(side: str, job: dict, work: Path, threads: int | None, round_: int) -> dict:
    """One side in a process of its own. `threads` None: no thread setting in its environment (torch's
    default for the baseline; loratool's own choice, loratool/model/threads.py, for loratool's sides)."""
    inherited = {k: v for k, v in os.environ.items() if threads is not None or k not in THREAD_SETTINGS}
    env = {
        **inherited,
        **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads is not None else {}),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(FIXED_MALLOC if side == "baseline_malloc" else {}),
    }
    out = work / f"{job['shape']}-{side}-{round_}"
    job_file = work / f"{job['shape']}.json"
    job_file.write_text(json.dumps(job))
    command = [sys.executable, __file__, "--role", side, "--job", str(job_file), "--out", str(out)]
    launched = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{job['shape']} {side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(line.removeprefix("RESULT "))
    if result.get("failed_after_loop"):
        print(
            f"  WARNING: {job['shape']} {side} failed ({result['failed_after_loop']}):\n{proc.stderr[-1500:]}"
        )
    result["launch_to_first_step_s"] = result.pop("first_step_at") - launched
    return result


def summary(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def report(shape: str, job: dict, results: dict[str, list[dict]]) -> None:
    params = f", {job['parameters'] / 1e6:.1f}M parameters" if job["parameters"] else ""
    rounds = len(next(iter(results.values())))
    print(
        f"\nshape {shape}{params}: micro-batch {job['batch_size']}, {job['steps']} steps, {rounds} round(s)"
    )
    header = f"{'side':15} {'real tok/s':>22} {'loop s':>20} {'launch->step 1 s':>18} {'peak RSS MiB':>20} {'loss/token':>10} {'ckpt layers':>11}"
    print(header)
    for side, runs in results.items():
        print(
            f"{side:15} {summary([r['tokens_per_s'] for r in runs], '.0f'):>22} "
            f"{summary([r['loop_s'] for r in runs], '.1f'):>20} "
            f"{summary([r['launch_to_first_step_s'] for r in runs], '.1f'):>18} "
            f"{summary([r['peak_rss_bytes'] / 2**20 for r in runs], '.0f'):>20} "
            f"{statistics.median(r['loss_per_token'] for r in runs):>10.4f} "
            f"{runs[0]['checkpointed_layers']:>11}"
        )
    if "baseline" in results:
        base = results["baseline"]
        for side in (s for s in results if s != "baseline"):
            # Ratios per round (the sides of one round ran back to back), then their median and range.
            speed = [o["tokens_per_s"] / b["tokens_per_s"] for o, b in zip(results[side], base, strict=True)]
            rss = [
                o["peak_rss_bytes"] / b["peak_rss_bytes"] for o, b in zip(results[side], base, strict=True)
            ]
            print(
                f"{side} / baseline: real tokens/s {summary(speed, '.2f')}x, peak RSS {summary(rss, '.2f')}x"
            )
        if "default" in results:
            same = all(
                d["step_tokens"] == b["step_tokens"] for d, b in zip(results["default"], base, strict=True)
            )
            gap = max(
                abs(x - y)
                for d, b in zip(results["default"], base, strict=True)
                for x, y in zip(d["step_losses"], b["step_losses"], strict=False)
            )
            print(
                f"default vs baseline: same examples in every step: {'yes' if same else 'NO'}; "
                f"largest per-step loss difference {gap:.2e}"
            )
    if "default" in results and "packing" in results:
        speed = [
            p["tokens_per_s"] / d["tokens_per_s"]
            for p, d in zip(results["packing"], results["default"], strict=True)
        ]
        print(f"packing / default: real tokens/s {summary(speed, '.2f')}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="a,b,smollm2", help="comma-separated: a, b, smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--sides",
        default=",".join(SIDES),
        help="comma-separated: baseline, default, packing; also checkpointing / no_checkpointing (loratool with "
        "every decoder layer checkpointed / none), baseline_malloc (the baseline with glibc's mmap threshold fixed at 128 KiB), "
        "baseline_no_checkpointing, and without_SAVER for SAVER in " + ", ".join(SAVERS),
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 30; 24 for smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--role", choices=SIDES + EXTRA_SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role:  # one side of the comparison, in its own process
        if not args.role.startswith("baseline") and not any(os.environ.get(k) for k in THREAD_SETTINGS):
            # What `loratool train` does before torch loads (cli/application.py start_libraries); here, since
            # this process imports torch before it runs the command.
            from loratool.model import threads

            threads.apply(threads.choose())
        result = measure(args.role, json.loads(args.job.read_text()), args.out)
        print("RESULT " + json.dumps(result))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    everything = {}
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        job = prepare(shape, work, args.steps)
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            order = sides if round_ % 2 == 0 else sides[::-1]  # alternate who runs first
            for side in order:
                results[side].append(run_one(side, job, work, args.threads, round_))
                r = results[side][-1]
                print(
                    f"  {shape} round {round_ + 1} {side}: {r['tokens_per_s']:.0f} real tok/s, loop {r['loop_s']:.1f}s, "
                    f"first step after {r['launch_to_first_step_s']:.1f}s, {r['peak_rss_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
        report(shape, job, results)
        everything[shape] = {"job": job, "runs": results}
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
