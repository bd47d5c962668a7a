"""Merging: `loratool merge` (streaming, shard by shard) against PEFT's merge_and_unload, on a ~1 GB model.

The baseline is what people write by hand: AutoModelForCausalLM.from_pretrained(base) +
PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out), which holds the whole
model in memory. loratool streams the checkpoint tensor by tensor (verification off: it is what loads
whole models, and the baseline does none).

Model: a random Llama in float32 (hidden 2048, 4 layers, intermediate 6400, vocab 8000: ~257M parameters,
~1.03 GB), saved in ~250 MB shards; adapter: LoRA r=16 on every linear layer, random non-zero B.

Each side runs in its own process so that its peak RSS (ru_maxrss) is its own; so does a baseline process
that only imports torch + safetensors (the floor any merge pays), and one that also imports transformers
+ peft (which both sides import). The model and adapter are built in a process of their own too: Linux
children inherit the parent's ru_maxrss at fork, so the parent must stay small. Printed: merge time
(after imports, which both sides pay alike) and process wall time, peak RSS, the ratios, loratool's peak
above the torch baseline relative to (largest shard + adapter) — the goal is <= 1.5x — and the largest
difference between the two merged checkpoints.

    python scripts/bench_merge.py [--hidden-size 2048] [--layers 4] [--intermediate-size 6400]
                                  [--vocab-size 8000] [--shard-size 250MB] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_imports_torch(**_: str) -> dict:
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    return {"peak_rss_bytes": peak_rss_bytes()}


def run_imports_libraries(**_: str) -> dict:
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return {"peak_rss_bytes": peak_rss_bytes()}


def run_peft(base: str, adapter: str, out: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()  # after the imports: they cost both sides the same
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    return {"wall_s": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes()}


def run_loratool(base: str, adapter: str, out: str) -> dict:
    import peft  # noqa: F401  (imported by run_merge anyway; imported first so that timing is comparable)
    import transformers  # noqa: F401

    from loratool.merge import run_merge

    started = time.perf_counter()
    run_merge(adapter, base=base, output=out, verify=False, log=lambda _: None)
    return {"wall_s": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes()}


def run_build(base: str, adapter: str, out: str, **sizes: int) -> dict:
    build_base(Path(base), **sizes)
    build_adapter(Path(base), Path(adapter))
    return {}


SIDES = {
    "build": run_build,
    "imports-torch": run_imports_torch,
    "imports-libraries": run_imports_libraries,
    "peft": run_peft,
    "loratool": run_loratool,
}


def build_base(
    folder: Path, hidden_size: int, layers: int, intermediate_size: int, vocab_size: int, shard_size: str
) -> None:
    """A random Llama with a real tokenizer and chat template (tiny_model style), in several shards."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loratool.model.tiny import CHATML_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(vocab_size)
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 128,  # head dim 128, as in Llama
        num_key_value_heads=hidden_size // 128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size=shard_size)
    tokenizer.save_pretrained(folder)


def build_adapter(base: Path, folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(folder)


def max_difference(a: Path, b: Path) -> float:
    """Largest |difference| between two checkpoints, one tensor at a time."""
    from safetensors import safe_open

    def locations(folder: Path) -> dict[str, Path]:
        return {
            name: path
            for path in folder.glob("*.safetensors")
            for name in safe_open(str(path), framework="pt").keys()
        }

    left, right = locations(a), locations(b)
    assert left.keys() == right.keys(), left.keys() ^ right.keys()
    worst = 0.0
    for name, path in left.items():
        with safe_open(str(path), framework="pt") as f, safe_open(str(right[name]), framework="pt") as g:
            worst = max(worst, (f.get_tensor(name).float() - g.get_tensor(name).float()).abs().max().item())
    return worst


def run_side(role: str, base: Path, adapter: Path, out: Path, *extra: str) -> dict:
    command = [sys.executable, __file__, "--role", role, "--base", str(base), "--adapter", str(adapter)]
    started = time.perf_counter()
    proc = subprocess.run([*command, "--out", str(out), *extra], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{role} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(line.removeprefix("RESULT ")), "process_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate-size", type=int, default=6400)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--shard-size", default="250MB")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of each side, alternating; best time kept"
    )
    parser.add_argument("--workdir", help="where to build the model (default: a new temporary directory)")
    parser.add_argument("--role", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sizes = {
        "hidden_size": args.hidden_size,
        "layers": args.layers,
        "intermediate_size": args.intermediate_size,
        "vocab_size": args.vocab_size,
        "shard_size": args.shard_size,
    }

    if args.role:  # one side of the comparison, in its own process
        extra = sizes if args.role == "build" else {}
        result = SIDES[args.role](base=args.base, adapter=args.adapter, out=args.out, **extra)
        print("RESULT " + json.dumps(result))
        return

    from loratool.model.tiny import count_parameters

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    base, adapter = work / "base", work / "adapter"
    started = time.perf_counter()
    if not (adapter / "adapter_config.json").is_file():
        size_args = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
        run_side("build", base, adapter, work / "unused", *size_args)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    mib = 2**20
    print(
        f"model: random Llama, {count_parameters(base) / 1e6:.0f}M parameters, float32, "
        f"{sum(p.stat().st_size for p in shards) / mib:.0f} MiB in {len(shards)} shards "
        f"(largest {largest / mib:.0f} MiB) · adapter: r=16 all-linear, {adapter_bytes / mib:.1f} MiB "
        f"· built in {time.perf_counter() - started:.0f}s"
    )

    results: dict[str, dict] = {}
    roles = ["imports-torch", "imports-libraries"] + ["peft", "loratool"] * args.repeat
    for role in roles:
        out = work / f"merged-{role}"
        shutil.rmtree(out, ignore_errors=True)
        result = run_side(role, base, adapter, out)
        best = results.get(role)
        if best is None or result.get("wall_s", 0) < best["wall_s"]:
            results[role] = {**result, "wall_s": result.get("wall_s", 0)}

    floor = results["imports-torch"]["peak_rss_bytes"]
    libraries = results["imports-libraries"]["peak_rss_bytes"]
    print(
        f"baseline peak RSS: import torch + safetensors {floor / mib:.0f} MiB; "
        f"+ transformers + peft {libraries / mib:.0f} MiB"
    )
    print(f"{'':9} {'merge s':>8} {'process s':>10} {'peak RSS MiB':>13} {'above torch baseline MiB':>25}")
    for role in ("loratool", "peft"):
        r = results[role]
        above = (r["peak_rss_bytes"] - floor) / mib
        rss = r["peak_rss_bytes"] / mib
        print(f"{role:9} {r['wall_s']:>8.1f} {r['process_s']:>10.1f} {rss:>13.0f} {above:>25.0f}")
    ours, theirs = results["loratool"], results["peft"]
    budget = largest + adapter_bytes
    print(
        f"speed (peft time / loratool time): {theirs['wall_s'] / ours['wall_s']:.2f}x merge, "
        f"{theirs['process_s'] / ours['process_s']:.2f}x process"
    )
    print(f"peak RSS ratio (loratool / peft): {ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x")
    print(
        f"loratool peak above the torch baseline / (largest shard + adapter = {budget / mib:.0f} MiB): "
        f"{(ours['peak_rss_bytes'] - floor) / budget:.2f}x (goal <= 1.5x); above the transformers + peft "
        f"baseline: {(ours['peak_rss_bytes'] - libraries) / budget:.2f}x"
    )
    difference = max_difference(work / "merged-loratool", work / "merged-peft")
    print(f"max |difference| between the two merged checkpoints: {difference:.2e}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
