"""LoRA+ gives the B matrices a higher learning rate (the optimizer, without training)."""

from __future__ import annotations

import pytest

from loratool.adapter.lora import attach_adapter, build_loraplus_optimizer
from loratool.recipe import validate_recipe


def test_loraplus_gives_b_matrices_a_higher_learning_rate(tiny_llama):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    recipe = validate_recipe(
        {
            "base_model": str(tiny_llama),
            "lora": {"loraplus_lr_ratio": 16},
            "data": {"train": [{"path": "x"}]},
            "training": {"output_dir": "o"},
        }
    )
    model = attach_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        recipe.lora,
        quantized=False,
        gradient_checkpointing=False,
    )
    args = SFTConfig(output_dir="/tmp/unused", learning_rate=1e-4, bf16=False, report_to="none")
    optimizer = build_loraplus_optimizer(model, recipe.lora, args)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lrs[names[id(p)]] = group["lr"]
    assert lrs and all(lr == pytest.approx(1.6e-3) for n, lr in lrs.items() if "lora_B" in n)
    assert all(lr == pytest.approx(1e-4) for n, lr in lrs.items() if "lora_A" in n)
    plain = validate_recipe({**recipe.model_dump(mode="json"), "lora": {}})
    assert build_loraplus_optimizer(model, plain.lora, args) is None
