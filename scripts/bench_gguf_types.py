"""How far each GGUF outtype moves a model's logits: the numbers `THRESHOLDS` in loratool/export/verify.py is set from.

    python scripts/bench_gguf_types.py MODEL_DIR [--types f16,q8_0,q4_0] [--recipe RECIPE]

For each type: write the GGUF of MODEL_DIR (a Hugging Face checkpoint), load it back through transformers
(`gguf_file=`) and compare it with MODEL_DIR on the same probe rows `loratool export` verifies with
(built-in chat conversations, or the recipe's data): max |Δlogit|, mean KL and greedy agreement, plus the
file size. Float32 throughout; one model in memory per side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--types", default="f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0")
    parser.add_argument("--recipe", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratool.export.gguf import write_gguf
    from loratool.merge.verify import Thresholds, build_probes, compare, probe_logits
    from loratool.model.gguf_base import quiet_gguf_reader

    quiet = lambda _: None  # noqa: E731
    recipe = None
    if args.recipe:
        from loratool.recipe import load_recipe

        recipe = load_recipe(args.recipe)
    quiet_gguf_reader()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    probes, source = build_probes(tokenizer, recipe, quiet)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    reference = probe_logits(model, probes, "", quiet)
    del model
    anything = Thresholds(max_abs_logit_diff=None, max_mean_kl=float("inf"), min_greedy_agreement=None)
    print(f"{args.model_dir.name}, probes: {source}")
    print(f"{'type':6} {'MB':>8} {'max |Δlogit|':>13} {'mean KL':>10} {'greedy':>7} {'s':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.types.split(","):
            started = time.time()
            out = write_gguf(args.model_dir, Path(tmp) / f"m.{outtype}.gguf", outtype, log=quiet)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                out.parent, gguf_file=out.name, dtype=torch.float32
            ).eval()
            result = compare(reference, probe_logits(gguf_model, probes, "", quiet), anything)
            del gguf_model
            print(
                f"{outtype:6} {out.stat().st_size / 1e6:8.1f} {result['max_abs_logit_diff']:13.3g} "
                f"{result['mean_kl']:10.3g} {100 * result['greedy_agreement']:6.1f}% {time.time() - started:5.0f}"
            )
            out.unlink()


if __name__ == "__main__":
    main()
