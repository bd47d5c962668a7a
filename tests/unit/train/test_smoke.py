"""`loratool train --smoke` without training: the small model keeps the architecture, the recipe
keeps all but its cost, the model card banner stays below the metadata."""

from __future__ import annotations

import pytest

from conftest import smoke_recipe
from loratool.recipe import validate_recipe
from loratool.rundir.model_card import mark_smoke_run
from loratool.smoke import SMOKE_SIZES, SMOKE_STEPS, shrink
from loratool.smoke import smoke_recipe as make_smoke


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_shrink_keeps_the_architecture_and_makes_it_small(tiny_model_factory, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_factory(arch, hidden_size=128, num_layers=4, num_heads=8))
    shrink(config)
    assert config.model_type == arch and config.num_hidden_layers == SMOKE_SIZES["num_hidden_layers"]
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__.lower().startswith(arch) and len(model.model.layers) == 2


def test_smoke_recipe_keeps_the_recipe_but_its_cost(tmp_path, smoke_data):
    raw = smoke_recipe(
        "some/model",
        smoke_data,
        tmp_path / "run",
        quantization={"load_in_4bit": True},
        training={"output_dir": str(tmp_path / "run"), "optim": "paged_adamw_8bit", "save_steps": 50},
    )
    raw["data"]["max_length"] = 4096
    recipe = validate_recipe(raw)
    smoke, changes = make_smoke(recipe, tmp_path / "base")
    assert smoke.base_model == str(tmp_path / "base") and smoke.quantization == recipe.quantization
    assert smoke.lora == recipe.lora and smoke.training.optim == "paged_adamw_8bit"
    assert smoke.training.max_steps == SMOKE_STEPS and smoke.data.max_length == 256
    assert smoke.data.train[0].max_rows == 32 and smoke.data.train[0].format == "alpaca"
    assert smoke.training.output_dir == f"{tmp_path / 'run'}-smoke"
    assert "data.max_length: 4096 -> 256" in changes and "training.save_steps: 50 -> 2" in changes


def test_model_card_banner_stays_below_the_metadata(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: peft\n---\n\n# Model\n")
    mark_smoke_run(card)
    text = card.read_text()
    assert text.startswith("---\nlibrary_name: peft\n---\n") and "SMOKE RUN" in text.split("---")[2]
