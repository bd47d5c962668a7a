"""Generation speed with an adapter against the base: the adapter through PEFT's LoRA layers (unfolded) and
folded into the base weights (what `loratool generate`, `chat` and `eval` do: loratool/generate/fold.py).

One process, one loaded model, interleaved: every round answers each prompt as the base, with the adapter
unfolded and folded, back to back (in alternating order), and each side's time is divided by the base's of
that same round, so that a slower or faster stretch of a shared machine moves all three together. Printed:
new tokens/s per side and the ratio to the base, median [min-max] over the rounds, from wall time and from
the thread's CPU time (with --threads 1 that is all of the work, and another job on the same core does not
count in it); the time a fold and an unfold take; and
whether the folded adapter generated the same tokens as the unfolded one (greedy) and the base after
unfolding the same as before. Every answer is exactly `--max-new-tokens` long (the end of turn does not stop
it), so that the sides decode the same number of steps.

    python scripts/bench_generate.py                                      # the tiny random Llama
    python scripts/bench_generate.py --base .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --threads 1
    python scripts/bench_generate.py --run runs/my-run                    # a run's own adapter

Default model: the tiny random Llama of scripts/make_tiny_model.py (written to a temporary directory); the
adapter: a fresh LoRA (`--rank`, every linear layer) with random non-zero B matrices. `--base` takes a
model directory or a .gguf file (its cached conversion, loratool.model.gguf_base); `--run` a finished run
directory, whose adapter and base are used instead. On a shared machine, pin it: `taskset -c 1 ... --threads 1`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`

PROMPTS = [
    "Spell the word backwards: falcon",
    "Name three colours.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
]
ADAPTER = "bench"
SIDES = ("base", "unfolded", "folded")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--base", type=Path, help="model directory or .gguf file (default: the tiny random Llama)"
    )
    where.add_argument("--run", type=Path, help="a finished run directory: its base and its adapter")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per side and round (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per answer (default: 48)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of base, unfolded, folded (default: 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the fresh adapter (default: 8)")
    parser.add_argument(
        "--scale", type=float, default=0.02, help="size of its random B entries (default: 0.02)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts: 1 to {len(PROMPTS)}")
    return args


def fresh_adapter(base_dir: Path, out: Path, rank: int, scale: float) -> Path:
    """A LoRA adapter on every linear layer whose B matrices are random: it changes every answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(scale * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def load(args: argparse.Namespace, workdir: Path) -> tuple[Any, str, str]:
    """(the loaded Adapters, the adapter's name, what the model is, in words)."""
    from loratool.generate.run import load_adapters
    from loratool.generate.target import resolve_target
    from loratool.model.gguf_base import resolve_base_model

    quiet = lambda _: None  # noqa: E731
    if args.run is not None:
        target = resolve_target(args.run)
        adapters = load_adapters(target, [], quiet)
        return adapters, adapters.names[0], f"{target.base_id} + the adapter of {args.run}"
    if args.base is None:
        from loratool.model.tiny import build_tiny_model

        base = build_tiny_model(workdir / "tiny-llama", arch="llama")
        described = "tiny random Llama (scripts/make_tiny_model.py defaults)"
    else:
        base = args.base.expanduser().resolve()
        described = base.name
    checkpoint = Path(resolve_base_model(str(base), log=quiet))
    adapter = fresh_adapter(checkpoint, workdir / ADAPTER, args.rank, args.scale)
    adapters = load_adapters(resolve_target(base), [f"{ADAPTER}={adapter}"], quiet)
    return adapters, ADAPTER, f"{described} + a fresh LoRA (r={args.rank}, every linear layer)"


def put(adapters: Any, folding: Any, name: str, side: str) -> tuple[float | None, float | None]:
    """Make `side` the model that answers: the base, the adapter unfolded, or folded (`Adapters.use`, as
    `loratool generate` switches). Returns the ms that unfolding and folding took (None: not done)."""
    from loratool.generate.run import BASE

    adapters.folding = folding
    was_folded = folding.folded is not None
    started = time.perf_counter()
    adapters.use(BASE)  # unfolds what is folded
    unfold_ms = 1000 * (time.perf_counter() - started) if was_folded else None
    if side == "base":
        return unfold_ms, None
    adapters.folding = folding if side == "folded" else None
    started = time.perf_counter()
    adapters.use(name)
    fold_ms = 1000 * (time.perf_counter() - started) if side == "folded" else None
    adapters.folding = folding  # the next switch unfolds it
    return unfold_ms, fold_ms


def generate(adapters: Any, ids: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """One prompt alone (batch 1, as `loratool generate` answers), greedy: the answer, the wall seconds and
    this thread's CPU seconds (with --threads 1 all of the work; another job on the core does not count)."""
    from loratool.generate.run import Sampling

    wall, cpu = time.perf_counter(), time.thread_time()
    answer = adapters.generate([ids], Sampling(max_new_tokens=new_tokens))[0]
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert len(answer) == new_tokens, "an answer stopped early: min_new_tokens is not set"
    return answer, wall, cpu


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import peft
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    from loratool.generate.fold import Folding, refusal
    from loratool.generate.run import Sampling, render_for

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        adapters, name, described = load(args, Path(tmp))
        model = adapters.model
        reason = refusal(model, name, quantized=adapters.loaded.quantized)
        folding = Folding(model, adapters.loaded.quantized, log=lambda line: print(line, flush=True))
        user = [[{"role": "user", "content": text}] for text in PROMPTS[: args.prompts]]
        prompts = [render_for(adapters, name, turns, None, None) for turns in user]
        sides = [s for s in SIDES if s != "folded" or reason is None]
        for side in sides:  # warm-up: the first generate of each path pays for kernels and memory set-up
            put(adapters, folding, name, side)
            adapters.generate(prompts[:1], Sampling(max_new_tokens=2))
        # Every answer exactly --max-new-tokens long: transformers reads this from the generation config.
        model.get_base_model().generation_config.min_new_tokens = args.max_new_tokens
        wall: dict[str, list[float]] = {s: [] for s in sides}  # per round: seconds over all prompts
        cpu: dict[str, list[float]] = {s: [] for s in sides}
        answers: dict[str, list[list[int]]] = {s: [] for s in sides}
        switches: dict[str, list[float]] = {"unfold": [], "fold": []}
        for round_ in range(args.rounds):
            spent = {s: [0.0, 0.0] for s in sides}
            for i, ids in enumerate(prompts):
                # Each prompt on all sides back to back, in alternating order: a busy stretch of a shared
                # core falls on every side alike.
                for side in sides if (round_ + i) % 2 == 0 else sides[::-1]:
                    for kind, ms in zip(("unfold", "fold"), put(adapters, folding, name, side), strict=True):
                        if ms is not None:
                            switches[kind].append(ms)
                    answer, seconds, cpu_seconds = generate(adapters, ids, args.max_new_tokens)
                    spent[side][0] += seconds
                    spent[side][1] += cpu_seconds
                    answers[side].append(answer)
            for side in sides:
                wall[side].append(spent[side][0])
                cpu[side].append(spent[side][1])
        put(adapters, folding, name, "base")
        base_after = [generate(adapters, ids, args.max_new_tokens)[0] for ids in prompts]
        device, dtype = adapters.loaded.device, adapters.loaded.dtype

    tokens = len(prompts) * args.max_new_tokens  # per side and round
    print()
    print(f"model: {described}; {len(prompts)} prompts x {args.max_new_tokens} new tokens (greedy, batch 1), "
          f"{args.rounds} rounds; torch threads: {torch.get_num_threads()}; {device}, {dtype}")  # fmt: skip
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print()
    print("| side | new tokens/s | vs base, same round | vs base, CPU time |")
    print("|---|---|---|---|")
    labels = {
        "base": "base",
        "unfolded": "adapter, unfolded (PEFT's LoRA layers)",
        "folded": "adapter, folded",
    }
    for side in sides:
        rates = [tokens / seconds for seconds in wall[side]]
        ratio = [b / w for b, w in zip(wall["base"], wall[side], strict=True)]
        cpu_ratio = [b / c for b, c in zip(cpu["base"], cpu[side], strict=True)]
        shown = ("1", "1") if side == "base" else (spread(ratio, 2), spread(cpu_ratio, 2))
        print(f"| {labels[side]} | {spread(rates, 1)} | {shown[0]} | {shown[1]} |")
    print()
    if reason is not None:
        print(f"not folded: {reason}")
        return 0
    same = sum(f == u for f, u in zip(answers["folded"], answers["unfolded"], strict=True))
    print(
        f"fold {spread(switches['fold'], 0)} ms, unfold {spread(switches['unfold'], 0)} ms (median [min-max])"
    )
    print(f"folded answers equal to unfolded ones: {same}/{len(answers['folded'])}; base after "
          f"{len(switches['unfold'])} unfolds equal to its first answers: {base_after == answers['base'][: len(prompts)]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
