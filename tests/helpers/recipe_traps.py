"""What the damaged-adapter tests of several tiers share: a pristine adapter and the damages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# --- damaged adapter files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine_adapter(tiny_llama, tmp_path_factory) -> Path:
    from conftest import random_adapter

    return random_adapter(tiny_llama, tmp_path_factory.mktemp("adapters") / "pristine")


def damage(adapter: Path, how: str) -> None:
    config, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "padded":
        weights.write_bytes(weights.read_bytes() + b"\0" * 8)
    elif how == "header-cut":
        weights.write_bytes(weights.read_bytes()[:20])
    elif how == "not-json":
        config.write_text('{"peft_type": "LORA", ')
    elif how == "not-object":
        config.write_text("[1, 2]")
    elif how == "no-peft-type":
        config.write_text(json.dumps({"r": 8}))


DAMAGES = {
    "truncated": ("adapter_model.safetensors", "truncated: "),
    "padded": ("adapter_model.safetensors", "longer than its tensors"),
    "header-cut": ("adapter_model.safetensors", "truncated: 20 bytes, shorter than its own header says"),
    "not-json": ("adapter_config.json", "cannot read the adapter's config"),
    "not-object": ("adapter_config.json", "the adapter's config is a JSON list, not an object"),
    "no-peft-type": ("adapter_config.json", "no peft_type"),
}
