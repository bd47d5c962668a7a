"""Helpers for the data-pipeline tests: a tiny ChatML tokenizer, data files, recipe sections."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Same guard as conftest: nothing in these tests may reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IGNORE = -100


def chatml_tokenizer(chat_template: bool = True) -> Any:
    """A fresh tiny tokenizer (BOS <|begin_of_text|> prepended by tokenizer(text), EOS <|im_end|>) with
    a ChatML template; fresh because tests set other templates on it. The BPE is trained once per
    process (cached by tiny_model), so this is cheap."""
    from loratool.model.tiny import CHATML_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(vocab_size=512)
    tokenizer.chat_template = CHATML_TEMPLATE if chat_template else None
    return tokenizer


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def source(path: Path | str, **fields: Any) -> Any:
    from loratool.recipe import DataSource

    return DataSource(path=str(path), **fields)


def section(*sources: Any, **fields: Any) -> Any:
    """A DataSection; sources may be DataSource objects or bare paths."""
    from loratool.recipe import DataSection, DataSource

    train = [s if isinstance(s, DataSource) else source(s) for s in sources]
    return DataSection(train=train, **fields)


def loss_ids(input_ids: list[int], labels: list[int]) -> list[int]:
    """The tokens that carry loss, checking on the way that labels copy input_ids where they are set."""
    assert len(input_ids) == len(labels)
    kept = []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            kept.append(token)
    return kept


def template_ids(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    """apply_chat_template(tokenize=True) ids (transformers 5 returns a BatchEncoding, 4 a list), with the
    BOS that tokenizer(text) puts first added when the template did not write it: what the model trains on
    and is prompted with."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    ids = list(out["input_ids"]) if hasattr(out, "keys") else list(out)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


ALPACA_ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "output": "Blue."},
]
