"""Start-up of `loratool train`: launch to the first training step, and where the time before it goes.

Each run is a fresh `python -m loratool train RECIPE --overwrite` (a few steps, output in a temporary
directory). The parent stamps every line the command prints against its launch time, and a wrapper stamps
the start of the first training step (it patches `Trainer.training_step` when transformers.trainer is
imported, importing nothing itself). Printed: the timeline of the first run, then launch to first line and
to first step, median [min-max] over the runs; CPU seconds of the process until the first step as well,
which another job on the same cores disturbs less than wall time.

    python scripts/bench_startup.py [RECIPE] [--runs 3] [--importtime] [--keep-bitsandbytes] [--compare]

RECIPE defaults to recipes/tiny-smoke.yaml (its tiny model: `python scripts/make_tiny_model.py
.cache/tiny-llama --arch llama --hidden-size 256 --layers 4`). `--importtime` adds one run under
`python -X importtime` and lists the slowest imports (cumulative). `--compare` interleaves the command as
it is, the command keeping bitsandbytes (below) and the hand-written baseline of scripts/bench_train.py on
the recipe's model and data, and prints launch to first step for each. `--keep-bitsandbytes` imports
bitsandbytes before the command starts, as every run did before `loratool train` learned to skip it when
the recipe cannot use it (`skip_bitsandbytes_unless_used`, loratool/cli/application.py): what its import
costs a run that does not need it.
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "tiny-smoke.yaml"
STAMP = "STARTUP-STAMP"

# Run in the child before loratool: stamps the first training step (and the CPU time spent until then).
WRAPPER = f"""
import importlib.abc, importlib.util, runpy, sys, time

class _StampFirstStep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            step = module.Trainer.training_step

            def training_step(self, *args, **kwargs):
                if not getattr(training_step, "stamped", False):
                    training_step.stamped = True
                    bnb = sys.modules.get("bitsandbytes") is not None
                    print("{STAMP}", time.time(), time.process_time(), bnb, file=sys.stderr, flush=True)
                return step(self, *args, **kwargs)

            module.Trainer.training_step = training_step

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _StampFirstStep())
if sys.argv[1] == "keep-bitsandbytes":
    import bitsandbytes  # noqa: F401  (imported: `loratool train` then leaves it, as before it skipped it)
sys.argv = ["loratool", *sys.argv[2:]]
runpy.run_module("loratool", run_name="__main__")
"""


def run_once(recipe: Path, out: Path, keep: bool, importtime: bool = False) -> dict:
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", WRAPPER]
    command += ["keep-bitsandbytes" if keep else "-", "train", str(recipe), "--overwrite"]
    command += ["--set", f"training.output_dir={out}", "--set", "training.max_steps=2"]
    command += ["--set", "training.eval_on_start=false", "--set", "training.save_steps=1000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    launched = time.time()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    timeline: list[tuple[float, str]] = []
    imports: list[str] = []
    first_step = cpu = bitsandbytes = None
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.time() - launched
        if line.startswith(STAMP):
            _, at, cpu_s, bnb = line.split()
            first_step, cpu, bitsandbytes = float(at) - launched, float(cpu_s), bnb == "True"
        elif line.startswith("import time:"):
            imports.append(line)
        else:
            timeline.append((now, line.rstrip()))
    if proc.wait() != 0 or first_step is None:
        tail = "\n".join(text for _, text in timeline[-30:])
        raise SystemExit(f"the command failed (exit {proc.returncode}):\n{tail}")
    return {
        "first_line_s": timeline[0][0] if timeline else None,
        "first_step_s": first_step,
        "cpu_to_first_step_s": cpu,
        "bitsandbytes": bitsandbytes,
        "timeline": timeline,
        "imports": imports,
    }


def slowest_imports(lines: list[str], count: int = 25) -> list[str]:
    """`-X importtime` lines ("import time: SELF_US | CUMULATIVE_US | NAME"), slowest cumulative first."""
    rows = []
    for line in lines:
        self_us, cumulative_us, name = (p.strip() for p in line.removeprefix("import time:").split("|"))
        if self_us.isdigit():  # not the header
            rows.append((int(cumulative_us), int(self_us), name))
    rows.sort(reverse=True)
    return [f"{c / 1e6:7.2f} s cumulative  {s / 1e6:6.2f} s self  {n}" for c, s, n in rows[:count]]


def summary(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) == 1 else f"{med:.2f} [{min(values):.2f}-{max(values):.2f}]"


def baseline_job(recipe_path: Path, work: Path) -> dict:
    """bench_train's job for the hand-written baseline on the recipe's model and (alpaca) data, 2 steps."""
    from loratool.recipe import load_recipe

    recipe = load_recipe(recipe_path, [])
    source = recipe.data.train[0]
    if source.format != "alpaca":
        raise SystemExit(f"--compare: the baseline reads alpaca rows; {recipe_path} has {source.format}")
    return {
        "shape": "startup",
        "model": str(recipe.base_model),
        "data": str(source.path),
        "format": "alpaca_chat",  # rendered with the model's chat template, as loratool does
        "max_length": recipe.data.max_length,
        "batch_size": recipe.training.per_device_train_batch_size,
        "steps": 2,
        "learning_rate": recipe.training.learning_rate,
        "warmup_steps": 0,
        "lora_dropout": recipe.lora.lora_dropout,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--importtime", action="store_true", help="one more run under -X importtime")
    parser.add_argument(
        "--keep-bitsandbytes",
        action="store_true",
        help="import bitsandbytes first, as runs did before train skipped it (see above)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="interleave the command as it is, the command keeping bitsandbytes and the hand-written "
        "baseline (scripts/bench_train.py's) on the recipe's model and data",
    )
    args = parser.parse_args()
    recipe = args.recipe.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    if args.compare:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_train

        job = baseline_job(recipe, work)
        figures: dict[str, list[float]] = {
            "loratool": [],
            "loratool keeping bitsandbytes": [],
            "baseline": [],
        }
        for i in range(args.runs):
            figures["loratool"].append(run_once(recipe, work / f"as-is-{i}", False)["first_step_s"])
            figures["loratool keeping bitsandbytes"].append(
                run_once(recipe, work / f"keep-{i}", True)["first_step_s"]
            )
            result = bench_train.run_one("baseline", job, work, threads=os.cpu_count() or 2, round_=i)
            figures["baseline"].append(result["launch_to_first_step_s"])
        print(f"launch to first training step, {args.runs} interleaved runs each, {args.recipe}:")
        for name, values in figures.items():
            print(f"  {name:32} {summary(values)} s")
        return 0
    runs = [run_once(recipe, work / f"run-{i}", args.keep_bitsandbytes) for i in range(args.runs)]
    print(f"timeline of the first run (seconds since launch), {args.recipe}:")
    for at, text in runs[0]["timeline"]:
        print(f"  {at:6.2f}  {text[:150]}")
    print(f"  {runs[0]['first_step_s']:6.2f}  <first training step starts>")
    print(f"\n{len(runs)} runs{' keeping bitsandbytes' if args.keep_bitsandbytes else ''}:")
    print(f"  launch to first line: {summary([r['first_line_s'] for r in runs])} s")
    print(f"  launch to first step: {summary([r['first_step_s'] for r in runs])} s")
    print(f"  CPU time to first step: {summary([r['cpu_to_first_step_s'] for r in runs])} s")
    print(f"  bitsandbytes imported: {', '.join(str(r['bitsandbytes']) for r in runs)}")
    if args.importtime:
        traced = run_once(recipe, work / "importtime", args.keep_bitsandbytes, importtime=True)
        print("\nslowest imports (one run under -X importtime, which slows it):")
        for line in slowest_imports(traced["imports"]):
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
