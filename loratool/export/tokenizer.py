"""A Hugging Face tokenizer as GGUF metadata (`tokenizer.ggml.*`), the way llama.cpp reads it.

A GGUF carries no tokenizer.json: llama.cpp rebuilds the tokenizer from a token list, token types, merges
(or scores), special token ids and the *name* of a pre-tokenizer whose split regex it has built in. Two
families are supported, both read from `tokenizer.json`:

- byte-level BPE (GPT-2 style; Llama 3, Qwen2, SmolLM, our tiny models) -> `tokenizer.ggml.model = gpt2`,
  tokens spelled in the byte-to-unicode alphabet, merges, and `tokenizer.ggml.pre`.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1-v0.3 as converted to tokenizer.json)
  -> `tokenizer.ggml.model = llama`, `<0xNN>` byte tokens, and scores (llama.cpp's SPM tokenizer merges
  the adjacent pair whose result has the highest score; the pieces are stored in merge order, so the
  score of token i is -i).

The pre-tokenizer name: llama.cpp's own converter recognises a tokenizer by hashing how it tokenizes a fixed
text, which only works for the exact vocabularies of released models; a fine-tuned or home-grown vocabulary
with a standard pre-tokenizer hashes to nothing known. We look at the pre-tokenizer itself instead (its
split regex, digit splitting and byte-level step) and map the patterns llama.cpp implements to their names
(`PRE_TOKENIZERS`); anything else is refused, since a wrong guess would tokenize differently without error.

gguf's `SpecialVocab` does the rest (merges, bos/eos/unk/pad ids, add_bos from the post-processor, the chat
template, chat_template.jinja included).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError

# Split regexes as they appear in tokenizer.json, and the llama.cpp pre-tokenizer that implements each.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# (what the pre-tokenizer does, in words) -> llama.cpp name. The keys are built by _describe_pre_tokenizer.
PRE_TOKENIZERS = {
    f"split:{_LLAMA3_SPLIT} + byte-level": "llama-bpe",  # Llama 3 / 3.x
    f"split:{_QWEN2_SPLIT} + byte-level": "qwen2",  # Qwen2 / 2.5, loratool's tiny models
    "byte-level(gpt2 regex)": "gpt-2",  # GPT-2 itself
    "digits + byte-level(gpt2 regex)": "smollm",  # SmolLM / SmolLM2 (StarCoder's pre-tokenizer)
}

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class GgufVocab:
    """What llama.cpp needs to rebuild the tokenizer (special tokens and merges come from SpecialVocab)."""

    model: str  # tokenizer.ggml.model: gpt2 or llama
    pre: str | None  # tokenizer.ggml.pre (gpt2 only)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None  # llama only
    add_space_prefix: bool | None  # llama only

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "pre": self.pre, "tokens": len(self.tokens)}


def read_vocab(model_dir: Path, vocab_size: int) -> GgufVocab:
    """The tokenizer in `model_dir` as GGUF vocabulary, padded to `vocab_size` (the embedding rows)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        other = [n for n in ("tokenizer.model", "vocab.json", "spiece.model") if (model_dir / n).is_file()]
        raise LoratoolError(
            f"{model_dir} has no tokenizer.json"
            + (f" (it has {', '.join(other)}, which loratool export does not convert)" if other else ""),
            hint="save the tokenizer with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(dir)) "
            "so that tokenizer.json is written, then export again",
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise LoratoolError(
            f"{path}: tokenizer model {model.get('type')!r} is not supported",
            hint="loratool export converts BPE tokenizers (byte-level like Llama 3 / Qwen2, or with byte "
            "fallback like Llama 2 / Mistral)",
        )
    added = {t["id"]: t for t in data.get("added_tokens") or []}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise LoratoolError(
            f"{path} has token id {max(by_id)} but the model has only {vocab_size} embedding rows",
            hint="the tokenizer belongs to another model; export the checkpoint with its own tokenizer",
        )
    if model.get("byte_fallback"):
        return _sentencepiece_style(data, by_id, added, vocab_size)
    return _byte_level(data, by_id, added, vocab_size, path)


def _token_type(token_id: int, added: dict[int, dict[str, Any]]) -> int:
    if token_id not in added:
        return TOKEN_NORMAL
    return TOKEN_CONTROL if added[token_id].get("special") else TOKEN_USER_DEFINED


def _byte_level(
    data: dict[str, Any], by_id: dict[int, str], added: dict[int, dict[str, Any]], size: int, path: Path
) -> GgufVocab:
    pre_found = _describe_pre_tokenizer(data.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(pre_found)
    if pre is None:
        raise LoratoolError(
            f"{path}: the pre-tokenizer ({pre_found}) is not one llama.cpp implements under a known name, "
            "so the GGUF would split text differently from the model's own tokenizer",
            hint="supported byte-level pre-tokenizers: Llama 3 (llama-bpe), Qwen2 (qwen2), GPT-2 (gpt-2), "
            "SmolLM (smollm)",
        )
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:  # embedding rows beyond the tokenizer (vocab padded to a multiple of 64...)
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(_token_type(i, added))
    return GgufVocab("gpt2", pre, tokens, types, None, None)


def _describe_pre_tokenizer(pre: dict[str, Any] | None) -> str:
    """A short, comparable description of a byte-level pre-tokenizer, e.g. 'digits + byte-level(gpt2 regex)'."""
    steps = (
        (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    )
    parts = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            parts.append(f"split:{(step.get('pattern') or {}).get('Regex', step.get('pattern'))}")
        elif kind == "ByteLevel":
            parts.append("byte-level(gpt2 regex)" if step.get("use_regex", True) else "byte-level")
        elif kind == "Digits":
            parts.append("digits" if step.get("individual_digits") else "digit runs")
        else:
            parts.append(json.dumps(step, sort_keys=True))
    return " + ".join(parts) or "none"


def _sentencepiece_style(
    data: dict[str, Any], by_id: dict[int, str], added: dict[int, dict[str, Any]], size: int
) -> GgufVocab:
    unk = (data.get("model") or {}).get("unk_token")
    tokens, types, scores = [], [], []
    for i in range(size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            scores.append(-10000.0)
            continue
        if i in added:
            kind = _token_type(i, added)
        elif token == unk:
            kind = TOKEN_UNKNOWN
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = TOKEN_BYTE
        else:
            kind = TOKEN_NORMAL
        tokens.append(token)
        types.append(kind)
        scores.append(-float(i) if kind == TOKEN_NORMAL else 0.0)
    return GgufVocab("llama", None, tokens, types, scores, _adds_space_prefix(data))


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts '▁' before the first word (Llama 2 style), from its normalizer or its
    Metaspace pre-tokenizer."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps)


def add_vocab(writer: Any, model_dir: Path, vocab: GgufVocab, log: Callable[[str], None]) -> dict[str, Any]:
    """Write the vocabulary, merges, special tokens and chat template; return what was written (export.json)."""
    import gguf

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    # SpecialVocab logs warnings about post-processor details llama.cpp does not use (a pair template's
    # separator); what matters is checked by export verification instead.
    gguf_log = logging.getLogger("gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(vocab.tokens))
    finally:
        gguf_log.setLevel(level)
    # Say it either way: left out, llama.cpp falls back to a per-tokenizer-type default.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    if vocab.model == "gpt2" and not special.merges:
        raise LoratoolError(
            f"{model_dir / 'tokenizer.json'} has no merges", hint="a BPE tokenizer needs its merges"
        )
    special.add_to_gguf(writer, quiet=True)
    log(
        f"  tokenizer: {vocab.model}"
        + (f" (pre-tokenizer {vocab.pre})" if vocab.pre else "")
        + f", {len(vocab.tokens)} tokens, {len(special.merges)} merges, special ids {special.special_token_ids}"
        + (", chat template" if special.chat_template else ", no chat template")
    )
    return {
        **vocab.describe(),
        "merges": len(special.merges),
        "special_token_ids": dict(special.special_token_ids),
        "add_special_token": dict(special.add_special_token),
        "chat_template": special.chat_template is not None,
    }
