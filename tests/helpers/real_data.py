"""What the real-data tests of several tiers share: the files in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SHARED_DATA

# --- the real files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared real-data folder is not beside the checkout ({SHARED_DATA})")
    return SHARED_DATA


# file, format, rows (the README's counts), dropped {reason: [row indices]}, rows truncated to MAX_LENGTH.
REAL_FILES = {
    "alpaca_en_demo": ("alpaca/alpaca_en_demo.json", "alpaca", 999, {}, 0),
    # {{name}} / {{author}} placeholders are data: kept verbatim.
    "identity": ("alpaca/identity.json", "alpaca", 91, {}, 0),
    # Two rows have an empty output: nothing to learn, dropped as empty.
    "code_alpaca_2k": ("alpaca/code_alpaca_2k.json", "alpaca", 2017, {"empty": [237, 1859]}, 0),
    # Row 243's first user message alone is ~6,300 characters of Go code, 12,081 tokens: its first answer
    # starts past MAX_LENGTH. One other row (~4,500 tokens) is cut but keeps answers to learn.
    "glaive_toolcall": ("sharegpt/glaive_toolcall_en_demo.json", "sharegpt", 300, {"no_loss": [243]}, 1),
    "dummy_conversation": ("sharegpt/dummy_conversation.json", "sharegpt", 500, {}, 0),
    # Raw text rows are never dropped; the longest few are cut at MAX_LENGTH.
    "dolly_open_qa": ("text/dolly_open_qa.jsonl", "text", 3742, {}, 3),
    "c4_demo": ("text/c4_demo.jsonl", "text", 300, {}, 19),
}
