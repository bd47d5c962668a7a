"""Training throughput per architecture: the baseline against loratool, and each memory saver's share.

For every architecture loratool ships, one process per side, interleaved over rounds (the harness of
scripts/bench_train.py, whose sides and measurements these are):
  baseline                   AutoModelForCausalLM + LoraConfig + TRL's SFTTrainer as a user writes it (TRL's
                             defaults, gradient checkpointing of every layer included)
  baseline_no_checkpointing  the same with gradient_checkpointing=False
  default                    `loratool train` with loratool's defaults (memory savers as chosen for the model)
  no_checkpointing           loratool with training.gradient_checkpointing: false
  without_SAVER              loratool's default with that one memory saver off (one per saver)

Models (--only picks some):
  a, b          bench_train's random Llamas (hidden 256 x 4 layers, 1024 x 8), vocabulary 2,000
  smollm2       SmolLM2-135M-Instruct, real (`python scripts/fetch_smollm2.py` first), the demo task
  gemma3        Gemma-3-270m, real (`python scripts/fetch_gemma3.py` first; the first run converts the GGUF
                file once, which is slow); only when --only names it
  llama, mistral, qwen2, qwen3, phi3, gemma3_text
                random models with the structure of a real checkpoint of the architecture
                (loratool/model/tiny.py REAL_CONFIGS: vocabulary, tied head, norms, MLP, sliding window) at
                tiny width and 2 layers; --real-shape keeps the real widths (--layers sets the depth)
All but smollm2 train on bench_train's alpaca rows (65-450 tokens, micro-batch 8, max_length 512, LoRA r=16
on all linear layers, dropout 0.05), tokenized by each model's own tokenizer.

Printed per model and side: real (non-padding) tokens/s, peak RSS, loss per loss-carrying token, CPU
seconds per forward+backward (on cores other jobs share, run with --threads 1: two threads then spend
their time waiting at barriers, which inflates wall and CPU time alike), and every ratio with the side it
is against: each side against `baseline`, no_checkpointing against baseline_no_checkpointing, and each
without_SAVER against `default` (below 1.00x tokens/s: the saver makes the model faster; above 1.00x RSS:
it saves memory).

`--quick` (`make bench-quick`) is the guard to run before submitting a change: every model but gemma3 and b,
baseline and default only, 1 round of 3 steps, each ratio printed next to the last recorded one (the table
"Per-architecture training throughput" in docs/benchmarks.md) and flagged when it fell by more than the
recorded run-to-run spread. It is no timed test: a flag on a busy machine means "rerun on a quiet one".
`--markdown` prints the rows of that table from this run, to record them.

    python scripts/bench_arch.py [--only qwen3,gemma3_text] [--rounds 3] [--steps 10] [--sides ...]
                                 [--real-shape] [--layers N] [--quick] [--markdown] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the sibling script: sides, jobs, one process per run)

REPO = bench_train.REPO
BENCHMARKS_DOC = REPO / "docs" / "benchmarks.md"
TABLE_HEADING = "## Per-architecture training throughput"
REAL_MODELS = ("a", "b", "smollm2", "gemma3")
TINY_STRUCTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")  # tiny.REAL_CONFIGS
MODELS = REAL_MODELS + TINY_STRUCTURES
GEMMA3_GGUF = REPO / ".cache" / "gemma3" / "gemma-3-270m-q4_k_m.gguf"
SIDES = (
    "baseline",
    "baseline_no_checkpointing",
    "default",
    "no_checkpointing",
    *(f"without_{saver}" for saver in bench_train.SAVERS),
)
QUICK_SIDES = ("baseline", "default")
# A ratio "fell" when it is below the recorded median by more than the recorded range (max - min), or by
# more than this share of the median when the record has a single value.
SINGLE_VALUE_SPREAD = 0.10


# ------------------------------------------------------------------------------------------------ jobs


def against(side: str) -> str | None:
    """The side a side's ratios are against."""
    if side == "baseline":
        return None
    if side == "no_checkpointing":
        return "baseline_no_checkpointing"
    if side.startswith("without_"):
        return "default"
    return "baseline"


def alpaca_job(name: str, model_dir: Path, work: Path, steps: int | None) -> dict:
    """bench_train's alpaca job (rows, lengths, hyperparameters) on `model_dir`, tokenized by its tokenizer."""
    from transformers import AutoTokenizer

    from loratool.model.tiny import count_parameters

    folder = work / f"data-{name}"  # bench_train finds the prompt/completion file next to the rows
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "alpaca.jsonl"
    rows = bench_train.make_alpaca_rows(AutoTokenizer.from_pretrained(model_dir), 2000, seed=0)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "prompt-completion.jsonl").write_text(
        "".join(
            json.dumps({"prompt": bench_train.ALPACA_PROMPT.format(**r), "completion": r["output"]}) + "\n"
            for r in rows
        )
    )
    return {
        "shape": name,
        "model": str(model_dir),
        "parameters": count_parameters(model_dir),
        "data": str(data_file),
        "format": "alpaca_prompt",
        "max_length": 512,
        "batch_size": 8,
        "steps": steps or 10,
        "learning_rate": 2e-4,
        "warmup_steps": 0,
        "lora_dropout": 0.05,
    }


def prepare(name: str, work: Path, args: argparse.Namespace) -> dict | None:
    """The job for one model, or None (with a note) when its files are missing."""
    if name in ("a", "b"):
        return bench_train.prepare(name, work, args.steps)
    if name == "smollm2":
        if not bench_train.SMOLLM2_GGUF.is_file():
            print(
                f"smollm2: skipped, {bench_train.SMOLLM2_GGUF} is missing (python scripts/fetch_smollm2.py)"
            )
            return None
        return bench_train.prepare("smollm2", work, args.steps)
    if name == "gemma3":
        if not GEMMA3_GGUF.is_file():
            print(f"gemma3: skipped, {GEMMA3_GGUF} is missing (python scripts/fetch_gemma3.py)")
            return None
        from loratool.model.gguf_base import resolve_base_model

        return alpaca_job(name, Path(resolve_base_model(str(GEMMA3_GGUF), print)), work, args.steps)
    from loratool.model.tiny import REAL_CONFIGS, build_real_structure_model

    model_dir = build_real_structure_model(
        work / f"model-{name}", name, real_shape=args.real_shape, num_layers=args.layers
    )
    job = alpaca_job(name, model_dir, work, args.steps)
    job["structure_of"] = REAL_CONFIGS[name][0]
    return job


# --------------------------------------------------------------------------------------------- figures


def ratios(results: dict[str, list[dict]]) -> list[dict]:
    """Every side's ratios against the side it is against, per round, then median and range."""
    out = []
    for side, runs in results.items():
        other = against(side)
        if other is None or other not in results:
            continue
        base = results[other]
        speed = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, base, strict=True)]
        rss = [r["peak_rss_bytes"] / b["peak_rss_bytes"] for r, b in zip(runs, base, strict=True)]
        cpu = [r["step_cpu_s"] / b["step_cpu_s"] for r, b in zip(runs, base, strict=True)]
        out.append({"side": side, "against": other, "tokens_per_s": speed, "peak_rss": rss, "step_cpu": cpu})
    return out


def report(name: str, job: dict, results: dict[str, list[dict]]) -> list[dict]:
    summary = bench_train.summary
    rounds = len(next(iter(results.values())))
    what = f", structure of {job['structure_of']}" if "structure_of" in job else ""
    params = f", {job['parameters'] / 1e6:.1f}M parameters" if job.get("parameters") else ""
    print(f"\n{name}{what}{params}: {job['steps']} steps x {rounds} round(s)")
    print(
        f"{'side':28} {'real tok/s':>20} {'peak RSS MiB':>20} {'loss/token':>10} {'CPU s/step':>16} "
        f"{'ckpt':>4}"
    )
    for side, runs in results.items():
        print(
            f"{side:28} {summary([r['tokens_per_s'] for r in runs], '.0f'):>20} "
            f"{summary([r['peak_rss_bytes'] / 2**20 for r in runs], '.0f'):>20} "
            f"{statistics.median(r['loss_per_token'] for r in runs):>10.4f} "
            f"{summary([r['step_cpu_s'] for r in runs], '.2f'):>16} {runs[0]['checkpointed_layers']:>4}"
        )
    if "default" in results and results["default"][0].get("savers"):
        savers = results["default"][0]["savers"]
        off = savers.get("off", {})
        print(
            "loratool's memory savers here: "
            + ", ".join(
                f"{k} {'on' if v else 'off (' + off.get(k, '') + ')'}"
                for k, v in savers.items()
                if k != "off"
            )
        )
    found = ratios(results)
    for r in found:
        print(
            f"{name}: {r['side']} / {r['against']}: real tokens/s {summary(r['tokens_per_s'], '.2f')}x, "
            f"peak RSS {summary(r['peak_rss'], '.2f')}x, CPU per step {summary(r['step_cpu'], '.2f')}x"
        )
    return found


# ------------------------------------------------------------------------------- the recorded table


def parse_figure(cell: str) -> tuple[float, float, float] | None:
    """'2.71 [2.55-2.75]x' -> (median, min, max); '2.71x' -> (2.71, 2.71, 2.71); anything else None."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(?:\[([\d.]+)-([\d.]+)\])?\s*x?\s*", cell)
    if not match:
        return None
    med = float(match.group(1))
    low, high = (float(match.group(2)), float(match.group(3))) if match.group(2) else (med, med)
    return med, low, high


def recorded_table(doc: Path = BENCHMARKS_DOC) -> dict[tuple[str, str, str], dict[str, tuple]]:
    """The table under TABLE_HEADING: (model, side, against) -> {"tokens_per_s": figure, "peak_rss": figure}.
    Its columns: model | side | against | real tokens/s | peak RSS | steps x rounds | date."""
    lines = doc.read_text().splitlines() if doc.is_file() else []
    start = next((i for i, line in enumerate(lines) if line.startswith(TABLE_HEADING)), None)
    table: dict[tuple[str, str, str], dict[str, tuple]] = {}
    if start is None:
        return table
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 5 or cells[0] in ("model", "") or set(cells[0]) <= set("-: "):
            continue
        figures = {"tokens_per_s": parse_figure(cells[3]), "peak_rss": parse_figure(cells[4])}
        table[(cells[0], cells[1], cells[2])] = {k: v for k, v in figures.items() if v is not None}
    return table


def compare(name: str, found: list[dict], table: dict) -> list[str]:
    """Each ratio next to its recorded one; the list of those that fell (tokens/s) or rose (peak RSS) by
    more than the recorded spread."""
    flagged = []
    for r in found:
        recorded = table.get((name, r["side"], r["against"]), {})
        for key, worse in (("tokens_per_s", -1), ("peak_rss", +1)):
            now = statistics.median(r[key])
            label = f"{name} {r['side']} / {r['against']} {key.replace('_', ' ')}"
            if key not in recorded:
                print(f"  {label}: {now:.2f}x (no recorded figure yet)")
                continue
            med, low, high = recorded[key]
            spread = (high - low) or SINGLE_VALUE_SPREAD * med
            moved = (now - med) * worse  # > 0: worse than recorded
            flag = moved > spread
            print(
                f"  {label}: {now:.2f}x, recorded {med:.2f} [{low:.2f}-{high:.2f}]x"
                + (f"  <-- {'FELL' if worse < 0 else 'ROSE'} by more than the spread" if flag else "")
            )
            if flag:
                flagged.append(label)
    return flagged


def markdown_rows(name: str, job: dict, found: list[dict], rounds: int) -> list[str]:
    summary = bench_train.summary
    today = time.strftime("%Y-%m-%d")
    return [
        f"| {name} | {r['side']} | {r['against']} | {summary(r['tokens_per_s'], '.2f')}x | "
        f"{summary(r['peak_rss'], '.2f')}x | {job['steps']} x {rounds} | {today} |"
        for r in found
    ]


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", help=f"comma-separated models (default: all but gemma3): {', '.join(MODELS)}"
    )
    parser.add_argument("--sides", help=f"comma-separated (default: all): {', '.join(SIDES)}")
    parser.add_argument("--rounds", type=int, help="rounds of every side (default: 3; --quick: 1)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 10; smollm2's demo: 24)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads per run (default: 2; --quick: 1, as the recorded table)"
    )
    parser.add_argument("--real-shape", action="store_true", help="the structure models at their real widths")
    parser.add_argument("--layers", type=int, help="decoder layers of the structure models")
    parser.add_argument("--quick", action="store_true", help="the guard: see the module docstring")
    parser.add_argument(
        "--markdown", action="store_true", help="print this run's rows for docs/benchmarks.md"
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (3 if args.quick else None)
    args.threads = args.threads or (1 if args.quick else 2)
    # gemma3 converts a GGUF file on its first run; b is a (slow) wider a: neither is quick.
    skipped = ("gemma3", "b") if args.quick else ("gemma3",)
    names = args.only.split(",") if args.only else [m for m in MODELS if m not in skipped]
    if unknown := [n for n in names if n not in MODELS]:
        parser.error(f"--only {','.join(unknown)}: choose from {', '.join(MODELS)}")
    sides = args.sides.split(",") if args.sides else list(QUICK_SIDES if args.quick else SIDES)
    if unknown := [s for s in sides if s not in SIDES]:
        parser.error(f"--sides {','.join(unknown)}: choose from {', '.join(SIDES)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-arch-"))
    table = recorded_table() if args.quick else {}
    everything, flagged, rows = {}, [], []
    for name in names:
        job = prepare(name, work, args)
        if job is None:
            continue
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:  # alternate who runs first
                r = bench_train.run_one(side, job, work, args.threads, round_)
                results[side].append(r)
                print(
                    f"  {name} round {round_ + 1} {side}: {r['tokens_per_s']:.0f} real tok/s, "
                    f"{r['peak_rss_bytes'] / 2**20:.0f} MiB, {r['step_cpu_s']:.2f} CPU s/step, "
                    f"first step after {r['launch_to_first_step_s']:.1f}s",
                    flush=True,
                )
        found = report(name, job, results)
        if args.quick:
            print(f"against docs/benchmarks.md ({TABLE_HEADING.removeprefix('## ')}):")
            flagged += compare(name, found, table)
        rows += markdown_rows(name, job, found, args.rounds)
        everything[name] = {"job": job, "runs": results}
    if args.markdown:
        print("\n" + "\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    if flagged:
        print(f"\n{len(flagged)} ratio(s) worse than recorded by more than the spread: {'; '.join(flagged)}")
        print("(on a busy machine, rerun on a quiet one with more --steps and --rounds before believing it)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
