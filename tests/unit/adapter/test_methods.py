"""`lora.method` (AdaLoRA, VeRA, LoRA-FA) in the recipe: it defaults to LoRA, and the recipe
refuses settings that do not apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import smoke_recipe, write_recipe
from helpers.methods import METHODS, SMOKE
from loratool.errors import LoratoolError
from loratool.recipe import load_recipe, recipe_to_dict


def recipe_problems(tmp_path: Path, lora: dict, **sections) -> str:
    recipe = smoke_recipe("some/model", SMOKE, tmp_path / "run", lora=lora, **sections)
    recipe["lora"] = lora  # exactly these keys: nothing from the smoke defaults
    with pytest.raises(LoratoolError) as caught:
        load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))
    return caught.value.message


# --- the recipe: each method takes its own settings, and only those ------------------------------------


def test_method_defaults_to_lora_and_each_resolved_recipe_loads_again(tmp_path):
    for lora in (
        {},
        *({k: v for k, v in m.items() if k not in ("r", "lora_alpha")} for m in METHODS.values()),
    ):
        recipe = smoke_recipe("some/model", SMOKE, tmp_path / "run", lora=lora)
        recipe["lora"] = lora
        loaded = load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))
        assert loaded.lora.method == lora.get("method", "lora")
        # A run's recipe.yaml (every default written out) trains again as it is.
        resolved = write_recipe(tmp_path / "resolved.yaml", recipe_to_dict(loaded))
        assert load_recipe(resolved) == loaded


def test_another_methods_settings_are_refused_naming_the_field(tmp_path):
    message = recipe_problems(tmp_path, {"init_r": 8, "d_initial": 0.5})
    assert (
        "lora.init_r: AdaLoRA only, and lora.method is lora — remove it, or set lora.method: adalora"
        in message
    )
    assert "lora.d_initial: VeRA only, and lora.method is lora" in message
    message = recipe_problems(tmp_path, {"method": "vera", "target_r": 4})
    assert "lora.target_r: AdaLoRA only, and lora.method is vera" in message


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({"method": "adalora", "r": 32}, "lora.r: not used with lora.method: adalora (AdaLoRA starts every"),
        ({"method": "adalora", "use_dora": True}, "lora.use_dora: not used with lora.method: adalora"),
        ({"method": "adalora", "loraplus_lr_ratio": 16}, "lora.loraplus_lr_ratio: not used with lora.method"),
        ({"method": "adalora", "rank_pattern": {"q_proj": 4}}, "lora.rank_pattern: not used with"),
        (
            {"method": "vera", "lora_alpha": 8},
            "lora.lora_alpha: not used with lora.method: vera (VeRA has no",
        ),
        ({"method": "vera", "use_rslora": True}, "lora.use_rslora: not used with lora.method: vera"),
        ({"method": "vera", "init_lora_weights": "pissa"}, "lora.init_lora_weights: not used with"),
        ({"method": "vera", "lora_bias": True}, "lora.lora_bias: a peft.LoraConfig setting; VeRA"),
        ({"method": "lorafa", "use_dora": True}, "lora.use_dora: not used with lora.method: lorafa"),
        ({"method": "lorafa", "loraplus_lr_ratio": 16}, "LoRA-FA and LoRA+ are two different optimizers"),
        ({"method": "dylora"}, "lora.method"),
    ],
)
def test_settings_a_method_cannot_use_are_refused(tmp_path, lora, expected):
    assert expected in recipe_problems(tmp_path, lora)


def test_lorafa_refuses_training_optim(tmp_path):
    message = recipe_problems(tmp_path, {"method": "lorafa"}, training={"optim": "adafactor"})
    assert "training.optim: LoRA-FA brings its own optimizer" in message


def test_adalora_schedule_must_leave_steps_to_reallocate(tmp_path):
    message = recipe_problems(tmp_path, {"method": "adalora", "tinit": 8, "tfinal": 4})  # max_steps 12
    assert "lora.tinit + lora.tfinal (8 + 4) leave none of the 12 optimizer steps" in message


def test_total_step_is_loratools_to_set(tmp_path):
    message = recipe_problems(tmp_path, {"method": "adalora", "total_step": 100})
    assert "lora.total_step: set by loratool — remove it" in message
