"""What the 4-bit CPU tests of several tiers share: the smoke data and the QLoRA settings."""

from __future__ import annotations

from conftest import REPO

SMOKE = REPO / "recipes" / "data" / "smoke.jsonl"
QLORA = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
