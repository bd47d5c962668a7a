"""What the preference-tuning tests of several tiers share: the word pairs, their files, the data
section and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratool.recipe import DataSection

WORDS = (
    "apple river stone cloud tiger piano garden rocket candle mirror forest silver ocean castle lemon violin"
)
TRAIN_WORDS, HELD_OUT_WORDS = WORDS.split()[:12], WORDS.split()[12:]


def pair(word: str, chat: bool = True) -> dict:
    """A learnable preference: the chosen answer ends in `yes yes`, the rejected one in `no no`."""
    prompt, chosen, rejected = f"Tell me about {word}.", f"{word} is nice. yes yes", f"{word} is nice. no no"
    if not chat:
        return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def data_section(*paths: Path, **settings) -> DataSection:
    return DataSection(train=[{"path": str(p)} for p in paths], **{"max_length": 128, **settings})


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def fresh(tokenizer):
    """A copy, so a chat template set by one test does not leak into the next."""
    import copy

    return copy.deepcopy(tokenizer)
