"""Check a GGUF export by running it: load it back with transformers and compare with its source.

Two checks, both against the HF checkpoint the GGUF was written from:

- Logits: the GGUF is loaded with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` (transformers
  dequantizes it to float32 and undoes llama.cpp's Q/K row permutation), both models run the probe rows
  (merge/compare.py build_probes: the run's own data when there is a recipe, else built-in conversations in
  the chat template) and merge/compare.py compare reports max |Δlogit|, mean KL and greedy agreement. How close
  they must be depends on how the tensors were stored (THRESHOLDS below).
- Tokenizer: the tokenizer transformers rebuilds from the GGUF metadata must encode a few strings (prose,
  code, digits, unicode, whitespace runs, and a conversation rendered with the chat template, so its special
  tokens are included) to the same ids as the model's own tokenizer, with and without special tokens.

This exercises the file through an independent reader (gguf-py's GGUFReader inside transformers), not
llama.cpp itself: a wrong metadata key that only llama.cpp reads would not be caught here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from loratool.merge.compare import Thresholds, build_probes, compare, probe_logits
from loratool.model.gguf_base import gguf_reader_progress

# Per outtype. f32 stores the weights exactly: only identical arithmetic is compared (measured max
# |Δlogit| 0 on the tiny models and SmolLM2-135M). f16/bf16 round each weight to 11/8 significant bits;
# q8_0 keeps 8 bits per weight plus one scale per 32. Measured on SmolLM2-135M-Instruct (one chat, 67
# positions): f16 max |Δlogit| 0.045, mean KL 2.7e-6; bf16 0.28, 9.4e-5; q8_0 1.3, 2.0e-3, greedy agreement
# 97%. The KL limits leave ~10x headroom over those. Greedy agreement is required only where rounding is too
# small to flip a near-tie (f32, f16); a random test model is full of near-ties.
# 4/5-bit (scripts/bench_gguf_types.py, SmolLM2-135M, 5 chats; docs/benchmarks.md): q5_0 mean KL 0.16
# (greedy 88.5%), q4_0 0.67 (64%). A 135M model is the worst case (larger models lose far less); the limits
# leave ~3x over those and still fail what a broken export does (mean KL of several nats). q4_1 / q5_1 add
# a per-block minimum and are at most as far off as q4_0 / q5_0.
THRESHOLDS = {
    "f32": Thresholds(max_abs_logit_diff=1e-3, max_mean_kl=1e-6, min_greedy_agreement=1.0),
    "f16": Thresholds(max_abs_logit_diff=None, max_mean_kl=1e-3, min_greedy_agreement=0.95),
    "bf16": Thresholds(max_abs_logit_diff=None, max_mean_kl=5e-3, min_greedy_agreement=None),
    "q8_0": Thresholds(max_abs_logit_diff=None, max_mean_kl=2e-2, min_greedy_agreement=None),
    "q5_1": Thresholds(max_abs_logit_diff=None, max_mean_kl=0.5, min_greedy_agreement=None),
    "q5_0": Thresholds(max_abs_logit_diff=None, max_mean_kl=0.5, min_greedy_agreement=None),
    "q4_1": Thresholds(max_abs_logit_diff=None, max_mean_kl=2.0, min_greedy_agreement=None),
    "q4_0": Thresholds(max_abs_logit_diff=None, max_mean_kl=2.0, min_greedy_agreement=None),
}

TOKENIZER_PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! It's 2024-01-15; the price is $1,234.56 (12% off).",
    "def add(a, b):\n    return a + b\n\n\tindented\ttabs   and   spaces",
    "Naïve café — Zürich, 日本語, русский, emoji 🙂🚀",
    "  leading spaces, trailing spaces  ",
)


def verify_gguf(
    gguf_file: Path, source_dir: Path, outtype: str, recipe: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    """Both checks; `passed` is true when both pass. Loads the source and the GGUF model in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    with gguf_reader_progress(f"  reading the tokenizer of {gguf_file.name}", log):
        gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokens = compare_tokenizers(
        tokenizer, gguf_tokenizer, sentencepiece=_tokenizer_model(gguf_file) == "llama"
    )
    log(
        f"  tokenizer: {tokens['strings']} strings encoded "
        + (
            "identically -> ok"
            if tokens["passed"]
            else f"differently -> FAILED ({tokens['first_difference']})"
        )
    )

    probes, source = build_probes(tokenizer, recipe, log)
    reference = probe_logits(
        AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval(),
        probes,
        "  verifying: the source checkpoint",
        log,
    )
    with gguf_reader_progress(f"  verifying: reading {gguf_file.name} back", log):
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
    logits = compare(
        reference, probe_logits(model.eval(), probes, "  verifying: the GGUF file", log), THRESHOLDS[outtype]
    )
    del model
    log(
        f"  logits on {source}: max |Δlogit| {logits['max_abs_logit_diff']:.2e}, mean KL "
        f"{logits['mean_kl']:.2e}, greedy agreement {100 * logits['greedy_agreement']:.1f}% -> "
        + ("ok" if logits["passed"] else "FAILED")
    )
    return {
        "probes": source,
        "logits": logits,
        "tokenizer": tokens,
        "passed": logits["passed"] and tokens["passed"],
    }


def compare_tokenizers(tokenizer: Any, gguf_tokenizer: Any, *, sentencepiece: bool = False) -> dict[str, Any]:
    """Encode the probe strings (and a chat-template rendering) with both; the first difference, if any.

    `sentencepiece`: skip text that starts with whitespace, and the chat rendering. transformers rebuilds a
    SentencePiece-style GGUF vocabulary with a Metaspace pre-tokenizer that adds the '▁' word prefix only at
    the very start of the text, where Llama 2's tokenizer (and llama.cpp, with add_space_prefix) also adds it
    before leading spaces ("  x") and after each special token ("<s>[INST]"). That is a difference of
    transformers' reader, not of the file; the llama.cpp runtime tests cover those cases.
    """
    texts = [t for t in TOKENIZER_PROBES if not (sentencepiece and t[:1].isspace())]
    if tokenizer.chat_template and not sentencepiece:
        messages = [
            {"role": "user", "content": "What is 12 times 7?"},
            {"role": "assistant", "content": "12 times 7 is 84."},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    first = None
    for text in texts:
        for special in (False, True):
            want = tokenizer(text, add_special_tokens=special)["input_ids"]
            got = gguf_tokenizer(text, add_special_tokens=special)["input_ids"]
            if want != got and first is None:
                first = f"{text[:40]!r} (add_special_tokens={special}): {want[:12]} vs {got[:12]}"
    return {"strings": len(texts), "passed": first is None, "first_difference": first}


def _tokenizer_model(gguf_file: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(gguf_file).fields["tokenizer.ggml.model"]
    return bytes(field.parts[field.data[0]]).decode()


def verification_message(verification: dict[str, Any], kept: Path) -> str:
    parts = []
    logits = verification["logits"]
    if not logits["passed"]:
        t = logits["thresholds"]
        allowed = [f"mean KL <= {t['max_mean_kl']:g}"]
        if t["max_abs_logit_diff"] is not None:
            allowed.insert(0, f"max |Δlogit| <= {t['max_abs_logit_diff']:g}")
        if t["min_greedy_agreement"] is not None:
            allowed.append(f"agreement >= {100 * t['min_greedy_agreement']:g}%")
        parts.append(
            f"logits differ from the source: max |Δlogit| {logits['max_abs_logit_diff']:.3g}, mean KL "
            f"{logits['mean_kl']:.3g}, greedy agreement {100 * logits['greedy_agreement']:.1f}% "
            f"(allowed: {', '.join(allowed)})"
        )
    if not verification["tokenizer"]["passed"]:
        parts.append(
            f"the GGUF tokenizer encodes differently: {verification['tokenizer']['first_difference']}"
        )
    return f"verification failed: {'; '.join(parts)}; the export is kept in {kept} for inspection"
