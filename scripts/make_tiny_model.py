"""Write a tiny random causal LM (plus a trained BPE tokenizer) for tests, CI smoke runs and benchmarks.

Nothing is downloaded: the tokenizer is trained on a corpus embedded in loratool/model/tiny.py and the
weights are random (seeded), so the output directory is the same on every machine.

    python scripts/make_tiny_model.py /tmp/tiny-llama
    python scripts/make_tiny_model.py /tmp/bench --arch qwen2 --hidden-size 512 --layers 8 \\
        --intermediate-size 1376 --vocab-size 8000

With --real-structure the model has the structure of one real checkpoint of the architecture
(loratool.model.tiny.REAL_CONFIGS: its vocabulary size, tied head, norms, MLP activation, sliding window) at
tiny width and 2 layers; --real-shape keeps the real widths too (and the real depth unless --layers):

    python scripts/make_tiny_model.py /tmp/gemma3-tiny --arch gemma3_text --real-structure
    python scripts/make_tiny_model.py /tmp/gemma3-wide --arch gemma3_text --real-shape --layers 6
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loratool.errors import LoratoolError  # noqa: E402
from loratool.model.tiny import (  # noqa: E402
    ARCHITECTURES,
    EXPORT_ARCHITECTURES,
    REAL_STRUCTURE_ARCHITECTURES,
    build_real_structure_model,
    build_tiny_model,
    count_parameters,
)

# The width options that --real-structure / --real-shape take from the real config instead.
WIDTH_OPTIONS = ("hidden_size", "heads", "kv_heads", "intermediate_size", "max_positions")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--arch", choices=sorted({*ARCHITECTURES, *EXPORT_ARCHITECTURES}), default="llama")
    parser.add_argument("--hidden-size", type=int, help="model width (default: 64)")
    parser.add_argument(
        "--layers", type=int, help="decoder layers (default: 2; with --real-shape the real depth)"
    )
    parser.add_argument("--heads", type=int, help="attention heads (default: 4)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: 2)")
    parser.add_argument("--intermediate-size", type=int, help="MLP width (default: 128)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="tokenizer vocabulary, special tokens included; an upper bound (default: %(default)s). With "
        "--real-structure the model's embedding keeps the real checkpoint's size",
    )
    parser.add_argument("--max-positions", type=int, help="max sequence length in tokens (default: 2048)")
    parser.add_argument(
        "--seed", type=int, default=0, help="weight initialisation seed (default: %(default)s)"
    )
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="write a 'base model' tokenizer without a chat template",
    )
    parser.add_argument(
        "--real-structure",
        action="store_true",
        help="the structure of the architecture's real checkpoint (vocabulary, tied head, norms, MLP, "
        "sliding window) at tiny width; for " + ", ".join(REAL_STRUCTURE_ARCHITECTURES),
    )
    parser.add_argument(
        "--real-shape", action="store_true", help="as --real-structure, at the real widths (for benchmarks)"
    )
    args = parser.parse_args(argv)
    real = args.real_structure or args.real_shape
    if real and (given := [o for o in WIDTH_OPTIONS if getattr(args, o) is not None]):
        parser.error(f"--{given[0].replace('_', '-')}: the width comes from the real config here")
    if real and args.arch not in REAL_STRUCTURE_ARCHITECTURES:
        parser.error(
            f"--arch {args.arch}: no real structure recorded (choose from {REAL_STRUCTURE_ARCHITECTURES})"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    try:
        if args.real_structure or args.real_shape:
            path = build_real_structure_model(
                args.output_dir,
                args.arch,
                real_shape=args.real_shape,
                num_layers=args.layers,
                vocab_size=args.vocab_size,
                seed=args.seed,
                chat_template=not args.no_chat_template,
            )
        else:
            path = build_tiny_model(
                args.output_dir,
                args.arch,
                hidden_size=args.hidden_size or 64,
                num_layers=args.layers or 2,
                num_heads=args.heads or 4,
                num_kv_heads=args.kv_heads or 2,
                intermediate_size=args.intermediate_size or 128,
                vocab_size=args.vocab_size,
                max_position_embeddings=args.max_positions or 2048,
                seed=args.seed,
                chat_template=not args.no_chat_template,
            )
    except LoratoolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.arch} model to {path}")
    print(f"parameters: {count_parameters(path):,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
