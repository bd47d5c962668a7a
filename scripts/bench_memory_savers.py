"""What LoRA dropout with masks (loratool/lora_dropout.py) saves, against PEFT's own dropout, in one process.

1. Mask drawing on CPU: torch's Bernoulli sampler (what PEFT's nn.Dropout uses) against `keep_mask`,
   on activation shapes of bench_train's shape b and of SmolLM2; median of 7 draws each.
2. Bytes kept for the backward pass by one forward of a random Llama with SmolLM2-135M's layer shapes
   (hidden 576, MLP 1536, 9 heads / 3 KV heads, 30 layers; vocabulary 2,000) with LoRA r=16 on all
   linear layers, dropout 0.05, on one flattened row of 8 examples of 94 tokens: PEFT's dropout against
   `keep_masks_not_copies`, and dropout 0 for reference. Every storage is counted once; weights are not.

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


def draw_times(shapes: list[tuple[int, int]], p: float = 0.05) -> None:
    import torch

    from loratool.lora_dropout import keep_mask

    print("mask draws (ms, median of 7):")
    for shape in shapes:
        x = torch.empty(shape)

        def timed(draw) -> float:
            draw()
            runs = []
            for _ in range(7):
                start = time.perf_counter()
                draw()
                runs.append(time.perf_counter() - start)
            return 1000 * statistics.median(runs)

        torch_ms = timed(lambda x=x: torch.empty_like(x).bernoulli_(1 - p).bool())
        ours_ms = timed(lambda x=x: keep_mask(x, p))
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


def kept_for_backward(folder: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loratool import attention
    from loratool.lora_dropout import keep_masks_not_copies
    from loratool.tiny_model import build_tiny_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    draw_times([(1480, 1024), (1480, 2752), (752, 576), (752, 1536)])
    with tempfile.TemporaryDirectory(prefix="bench-savers-") as folder:
        kept_for_backward(Path(folder))


if __name__ == "__main__":
    main()
