"""Write a tiny random causal LM (plus a trained BPE tokenizer) for tests, CI smoke runs and benchmarks.

Nothing is downloaded: the tokenizer is trained on a corpus embedded in loratool/model/tiny.py and the
weights are random (seeded), so the output directory is the same on every machine.

    python scripts/make_tiny_model.py /tmp/tiny-llama
    python scripts/make_tiny_model.py /tmp/bench --arch qwen2 --hidden-size 512 --layers 8 \\
        --intermediate-size 1376 --vocab-size 8000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loratool.errors import LoratoolError  # noqa: E402
from loratool.model.tiny import ARCHITECTURES, build_tiny_model, count_parameters  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    parser.add_argument("--intermediate-size", type=int, default=128, help="MLP width (default: %(default)s)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="tokenizer vocabulary, special tokens included; an upper bound (default: %(default)s)",
    )
    parser.add_argument(
        "--max-positions", type=int, default=2048, help="max sequence length in tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="weight initialisation seed (default: %(default)s)"
    )
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="write a 'base model' tokenizer without a chat template",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    try:
        path = build_tiny_model(
            args.output_dir,
            args.arch,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate_size,
            vocab_size=args.vocab_size,
            max_position_embeddings=args.max_positions,
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
