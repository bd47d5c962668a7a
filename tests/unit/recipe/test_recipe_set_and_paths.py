"""`--set` lays over the recipe as a recipe over its base: a mapping merges into the section (the keys
given win), with provenance per key; empty paths are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loratool.cli import app
from loratool.errors import LoratoolError
from loratool.recipe import apply_override, explain, load_recipe, load_recipe_with_origins

RECIPE = """\
base_model: some/model
data:
  train:
    - path: train.jsonl
training:
  output_dir: out
  learning_rate: 1.0e-4
  seed: 7
lora:
  r: 8
"""


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_a_mapping_given_to_set_merges_into_the_section(recipe):
    loaded, origins = load_recipe_with_origins(
        recipe, ["training={output_dir: /tmp/elsewhere, max_steps: 3}"]
    )
    training = loaded.training
    assert training.output_dir == "/tmp/elsewhere" and training.max_steps == 3  # the keys given win
    assert training.learning_rate == 1e-4 and training.seed == 7  # the others stay as the file says
    where = "--set training={output_dir: /tmp/elsewhere, max_steps: 3}"
    assert origins["training.output_dir"] == where and origins["training.max_steps"] == where
    assert origins["training.learning_rate"] == f"{recipe}:7" and origins["training.seed"] == f"{recipe}:8"
    lines = explain(loaded, origins).splitlines()
    assert next(x for x in lines if "learning_rate:" in x).endswith(f"# {recipe}:7")
    assert next(x for x in lines if "output_dir:" in x).endswith(f"# {where}")


def test_set_merges_through_the_cli_too(recipe):
    result = CliRunner().invoke(app, ["train", str(recipe), "--explain", "--set", "lora={lora_dropout: 0.1}"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["lora"]["r"] == 8 and shown["lora"]["lora_dropout"] == 0.1


def test_apply_override_merges_nested_mappings_and_replaces_the_rest():
    raw = {
        "training": {"output_dir": "a", "learning_rate": 1e-4},
        "lora": {"rank_pattern": {"q": 4}, "target_modules": ["q_proj", "v_proj"]},
    }
    apply_override(raw, "training={seed: 3}")
    assert raw["training"] == {"output_dir": "a", "learning_rate": 1e-4, "seed": 3}
    apply_override(raw, "lora={rank_pattern: {k: 2}, target_modules: [o_proj]}")
    assert raw["lora"]["rank_pattern"] == {"q": 4, "k": 2}  # mappings merge at every depth
    assert raw["lora"]["target_modules"] == ["o_proj"]  # lists replace
    apply_override(raw, "training.output_dir={x: 1}")  # a mapping over a value replaces it
    assert raw["training"]["output_dir"] == {"x": 1}


def test_null_in_set_sends_a_key_back_to_its_default(recipe):
    loaded, origins = load_recipe_with_origins(recipe, ["training.learning_rate=null"])
    assert loaded.training.learning_rate == 2e-4
    assert origins["training.learning_rate"] == "default (unset by --set training.learning_rate=null)"
    loaded = load_recipe(recipe, ["training.save_total_limit=null"])  # a key that takes null keeps it
    assert loaded.training.save_total_limit is None


@pytest.mark.parametrize(
    "override",
    [
        'training.output_dir=""',
        "training.output_dir=",
        "training.output_dir='  '",
        'base_model=""',
        'data.train.0.path=""',
        'model.tokenizer=""',
        'data.chat_template=""',
    ],
)
def test_an_empty_path_is_refused_naming_the_key(recipe, override):
    key = override.partition("=")[0]
    with pytest.raises(LoratoolError) as info:
        load_recipe(recipe, [override])
    assert f"  - {key}: must not be empty (an empty path means the current directory)" in info.value.message


def test_an_empty_dpo_init_adapter_is_refused(recipe):
    with pytest.raises(LoratoolError, match=r"dpo.init_adapter: must not be empty"):
        load_recipe(recipe, ["dpo={init_adapter: ''}"])


def test_an_empty_output_dir_is_refused_before_train_writes_anything(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["train", str(recipe), "--set", 'training.output_dir=""'])
    assert result.exit_code != 0
    assert "training.output_dir: must not be empty" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
