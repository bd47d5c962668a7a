"""Every recipe we ship validates, and the big ones follow current practice."""

from __future__ import annotations

import pytest

from conftest import REPO
from loratool.model import hardware
from loratool.recipe import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
CPU_DEMOS = ("tiny-smoke", "tiny-dpo", "tiny-kto", "tiny-reward", "tiny-grpo", "smollm2-demo", "smollm2-sft-short",
             "smollm2-grpo")  # fmt: skip
BIG = [p for p in RECIPES if p.stem not in CPU_DEMOS]


def test_the_expected_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    for expected in (
        "llama2-7b-qlora.yaml",
        "llama2-7b-lora.yaml",
        "mistral-7b-qlora.yaml",
        "llama3.1-8b-qlora.yaml",
        "qwen2.5-7b-qlora.yaml",
        "tiny-smoke.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.training.output_dir.startswith("out/")


@pytest.mark.parametrize("path", BIG, ids=lambda p: p.stem)
def test_big_recipes_follow_practice(path):
    recipe = load_recipe(path)
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.model.dtype == "auto" and recipe.training.gradient_checkpointing
    assert recipe.data.completion_only_loss and recipe.data.validation
    if "qlora" in path.stem:
        q = recipe.quantization
        assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
        assert recipe.training.optim == "paged_adamw_8bit"
    else:
        assert recipe.quantization is None
    # The same recipe is accepted on a CPU and on a bf16 GPU: precision is picked by the hardware.
    hardware.check(recipe, hardware.Hardware("cpu", "x86_64", 1, False, 2))
    hardware.check(recipe, hardware.Hardware("cuda", "NVIDIA H100", 1, True, 16))
