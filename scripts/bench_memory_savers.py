"""What loratool's memory savers save: LoRA dropout with masks (lora_dropout.py), the LM head's CPU tiles
(loss_positions.py) and cheap activations recomputed (cheap_recompute.py); in one process.

1. Mask drawing on CPU: torch's Bernoulli sampler (what PEFT's nn.Dropout uses) against `keep_mask`,
   on activation shapes of bench_train's shape b and of SmolLM2; median of 7 draws each.
2. Bytes kept for the backward pass by one forward of a random Llama with SmolLM2-135M's layer shapes
   (hidden 576, MLP 1536, 9 heads / 3 KV heads, 30 layers; vocabulary 2,000) with LoRA r=16 on all
   linear layers, dropout 0.05, on one flattened row of 8 examples of 94 tokens: PEFT's dropout against
   `keep_masks_not_copies`, and dropout 0 for reference. Every storage is counted once; weights are not.
   Then, dropout 0, the same model with and without `recompute_cheap_activations`, counted from the
   allocator's records (what one forward pass leaves allocated), since that works through saved-tensor hooks.
3. TRL's fused LM head on SmolLM2-135M's head (576 x 49,152 vocabulary), forward + backward on 260 and 752
   positions, with TRL's vocabulary tile (32,768) and loratool's CPU tile: time and peak allocation.

    python scripts/bench_memory_savers.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def median_ms(run, repeats: int) -> float:
    """Median wall time of `run()` in milliseconds, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def draw_times(shapes: list[tuple[int, int]], p: float = 0.05) -> None:
    import torch

    from loratool.train.memory.lora_dropout import keep_mask

    print("mask draws (ms, median of 7):")
    for shape in shapes:
        x = torch.empty(shape)
        torch_ms = median_ms(lambda x=x: torch.empty_like(x).bernoulli_(1 - p).bool(), 7)
        ours_ms = median_ms(lambda x=x: keep_mask(x, p), 7)
        print(
            f"  {shape}: torch bernoulli_ {torch_ms:.1f}, keep_mask {ours_ms:.1f} -> {torch_ms / ours_ms:.1f}x"
        )


def saved_bytes(model, *args, **kwargs) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `model(*args, **kwargs)`."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args, **kwargs)
    return sum(kept.values())


def graph_bytes(model, *args, **kwargs) -> int:
    """Bytes that one forward pass of `model` leaves allocated for the backward pass (its output included),
    from torch's own allocation records. Unlike `saved_bytes`, this counts what saved-tensor hooks keep in
    place of a tensor (cheap_recompute.py works through such hooks), and nothing that numpy allocates."""
    import torch

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        out = model(*args, **kwargs)
    kept = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    del out
    return kept


def kept_for_backward(folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loratool.model import attention
    from loratool.model.tiny import build_tiny_model
    from loratool.train.memory.cheap_recompute import recompute_cheap_activations
    from loratool.train.memory.lora_dropout import keep_masks_not_copies

    path = build_tiny_model(
        folder / "smollm2-shaped",
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        vocab_size=2000,
    )
    attention.register()
    lengths = [94] * 8
    total = sum(lengths)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = {
        "input_ids": torch.randint(0, 1900, (1, total)),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "use_cache": False,
    }
    print(f"kept for backward, one row of {total} tokens (MiB):")
    for label, dropout, ours in (
        ("dropout 0", 0.0, False),
        ("dropout 0.05, PEFT", 0.05, False),
        ("dropout 0.05, loratool", 0.05, True),
    ):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_per_example")
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
        )
        if ours:
            keep_masks_not_copies(model)
        model.train()
        print(f"  {label:24} {saved_bytes(model, **inputs) / 2**20:8.0f}")

    # Saved-tensor hooks of the counter above would switch cheap_recompute off: count allocations instead.
    print(f"left allocated by one forward pass (allocator records, output included), {total} tokens (MiB):")
    for label, recompute in (("stock", False), ("cheap_recompute", True)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa_per_example")
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        )
        if recompute:
            recompute_cheap_activations(model)
        model.train()
        print(f"  {label:24} {graph_bytes(model, **inputs) / 2**20:8.0f}")


def head_tiles(rows_list: list[int], threads: int) -> None:
    """TRL's fused LM head (forward + backward) on SmolLM2-135M's head shape (576 x 49,152), with TRL's
    vocabulary tile and with loratool's CPU tile: time, and the peak of what the pass allocates."""
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from loratool.train.memory.loss_positions import CPU_VOCAB_TILE

    print("LM head, forward + backward (median of 3 ms; peak MiB allocated during the pass):")
    torch.manual_seed(0)
    weight = torch.randn(49152, 576) * 0.02
    for rows in rows_list:
        hidden = torch.randn(rows, 576, requires_grad=True)
        targets = torch.randint(0, 49152, (rows,))
        line = []
        for tile in (32768, CPU_VOCAB_TILE):

            def run(tile=tile, hidden=hidden, targets=targets) -> None:
                log_probs, *_ = ChunkedLogProbFunction.apply(
                    hidden, weight, None, targets, 1.0, tile, None, 1.0, ("entropy", "is_top1")
                )
                log_probs.sum().backward()

            ms = median_ms(run, 3)
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as p:
                run()
            live = peak = 0
            events = [e for e in p.profiler.kineto_results.events() if e.name() == "[memory]"]
            for event in sorted(events, key=lambda e: e.start_ns()):
                live += event.nbytes()
                peak = max(peak, live)
            line.append(f"tile {tile}: {ms:.0f} ms, {peak / 2**20:.0f} MiB")
        print(f"  {rows} positions: " + "; ".join(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    draw_times([(1480, 1024), (1480, 2752), (752, 576), (752, 1536)])
    head_tiles([260, 752], args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-savers-") as folder:
        kept_for_backward(Path(folder))


if __name__ == "__main__":
    main()
