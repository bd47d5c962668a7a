"""`loratool.cli.application.skip_bitsandbytes_unless_used`: a run that cannot use bitsandbytes does not pay for
importing it (peft imports it, and its import pulls in torch._inductor), and one that may use it keeps it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loratool.cli.application import uses_bitsandbytes
from loratool.recipe import validate_recipe

REPO = Path(__file__).resolve().parents[2]


def recipe(**sections):
    raw = {
        "base_model": "some/model",
        "data": {"train": [{"path": "rows.jsonl", "format": "alpaca"}]},
        "training": {"output_dir": "out/x"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate_recipe(raw)


@pytest.mark.parametrize(
    ("sections", "uses"),
    [
        ({}, False),  # plain LoRA, adamw_torch
        ({"training": {"optim": "adafactor"}}, False),
        ({"quantization": {"load_in_4bit": True}}, True),
        ({"quantization": {"load_in_8bit": True}}, True),
        ({"training": {"optim": "paged_adamw_8bit"}}, True),
        ({"training": {"optim": "galore_adamw_8bit"}}, True),  # not torch's own: kept, whatever it is
        ({"lora": {"init_lora_weights": "loftq"}}, True),  # PEFT quantizes with bitsandbytes when it can
    ],
)
def test_which_recipes_may_use_bitsandbytes(sections, uses):
    assert uses_bitsandbytes(recipe(**sections)) is uses


SKIP_THEN_ADAPT = """
import sys
from loratool.cli.application import skip_bitsandbytes_unless_used
from loratool.recipe import validate_recipe

raw = {"base_model": "m", "data": {"train": [{"path": "r.jsonl", "format": "alpaca"}]},
       "training": {"output_dir": "o"}}
assert skip_bitsandbytes_unless_used(validate_recipe(raw))
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

model = get_peft_model(
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=300)),
    LoraConfig(r=4, target_modules="all-linear"),
)
print("bitsandbytes imported:", sys.modules.get("bitsandbytes") is not None)
print("adapted layers:", sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default")))
"""


def test_a_plain_lora_run_attaches_its_adapter_without_importing_bitsandbytes():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", SKIP_THEN_ADAPT], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "bitsandbytes imported: False" in result.stdout
    assert "adapted layers: 7" in result.stdout  # q, k, v, o, gate, up, down
