"""`extends:` children: null unsets an inherited key, a directory is named as such, the JSON Schema accepts
a child without the required keys, and `--explain` output reads back as YAML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from loratool.cli import app
from loratool.errors import LoratoolError
from loratool.recipe import explain, load_recipe, load_recipe_with_origins, recipe_to_dict
from loratool.recipe.json_schema import SCHEMA_FILE

REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))

LORA_BASE = """\
base_model: some/model
lora:
  r: 8
  lora_alpha: 16
data:
  train:
    - path: train.jsonl
training:
  output_dir: out
  save_total_limit: 5
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def editor() -> jsonschema.Draft202012Validator:
    """The committed schema file, as an editor reads it."""
    return jsonschema.Draft202012Validator(json.loads((REPO / SCHEMA_FILE).read_text()))


# --- unsetting an inherited key -------------------------------------------------------------------------


def test_null_in_a_child_drops_the_inherited_value(tmp_path):
    write(tmp_path / "lora.yaml", LORA_BASE)
    child = write(
        tmp_path / "vera.yaml", "extends: lora.yaml\nlora:\n  method: vera\n  r: 256\n  lora_alpha: null\n"
    )
    recipe, origins = load_recipe_with_origins(child)
    assert recipe.lora.method == "vera" and recipe.lora.r == 256
    assert recipe.lora.lora_alpha == 32  # the schema default, which VeRA accepts
    assert origins["lora.lora_alpha"] == f"default (unset at {child}:5)"
    line = next(x for x in explain(recipe, origins).splitlines() if "lora_alpha:" in x)
    assert line.endswith(f"# default (unset at {child}:5)")


def test_without_the_null_vera_refuses_the_inherited_alpha(tmp_path):
    write(tmp_path / "lora.yaml", LORA_BASE)
    child = write(tmp_path / "vera.yaml", "extends: lora.yaml\nlora:\n  method: vera\n")
    with pytest.raises(LoratoolError, match="lora.lora_alpha: not used with lora.method: vera"):
        load_recipe(child)


def test_null_for_a_key_that_takes_null_sets_it(tmp_path):
    write(tmp_path / "lora.yaml", LORA_BASE)
    child = write(tmp_path / "c.yaml", "extends: lora.yaml\ntraining:\n  save_total_limit: null\n")
    assert load_recipe(child).training.save_total_limit is None  # "keep every checkpoint", as before


def test_null_unsets_through_a_chain_and_a_whole_section(tmp_path):
    write(tmp_path / "a.yaml", LORA_BASE)
    write(tmp_path / "b.yaml", "extends: a.yaml\nlora:\n  r: 4\n  lora_dropout: 0.2\n")
    c = write(tmp_path / "c.yaml", "extends: b.yaml\nlora: null\n")
    recipe, origins = load_recipe_with_origins(c)
    assert recipe.lora.r == 16 and recipe.lora.lora_dropout == 0.05  # the whole section is back to defaults
    assert origins["lora"] == f"default (unset at {c}:2)" and "lora.r" not in origins


def test_null_in_a_recipe_that_extends_nothing_is_still_refused(tmp_path):
    alone = write(tmp_path / "alone.yaml", LORA_BASE.replace("lora_alpha: 16", "lora_alpha: null"))
    with pytest.raises(LoratoolError, match=r"lora.lora_alpha: expected a valid number \(got None\)"):
        load_recipe(alone)


# --- extends: a directory ---------------------------------------------------------------------------------


def test_extends_a_directory_says_so_and_what_to_give(tmp_path):
    write(tmp_path / "y" / "base.yaml", LORA_BASE)
    child = write(tmp_path / "x" / "child.yaml", "extends: ../y\n")
    with pytest.raises(LoratoolError) as info:
        load_recipe(child)
    assert f"{child}:1: extends '../y' is a directory" in info.value.message
    assert "no such recipe file" not in info.value.message
    assert "extends: ../y/base.yaml" in info.value.hint


# --- the JSON Schema ------------------------------------------------------------------------------------


README_CHILD = """\
extends: ../recipes/llama3.1-8b-qlora.yaml   # relative to this file
data:
  train: [{path: my.jsonl}]                   # lists replace the base's list
training:
  learning_rate: 1.0e-4                       # mappings merge key by key: the rest of training is kept
"""


def test_the_schema_accepts_the_documented_extends_child_and_it_loads(tmp_path):
    child = write(tmp_path / "mine" / "my-run.yaml", README_CHILD)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    assert list(editor().iter_errors(yaml.safe_load(README_CHILD))) == []
    assert load_recipe(child).training.learning_rate == 1e-4


@pytest.mark.parametrize("base", SHIPPED, ids=lambda p: p.stem)
def test_a_child_of_each_shipped_recipe_passes_the_schema_and_loads(tmp_path, base):
    text = f"extends: {base}\ntraining:\n  learning_rate: 5.0e-5\nlora:\n  lora_dropout: null\n"
    child = write(tmp_path / "child.yaml", text)
    assert list(editor().iter_errors(yaml.safe_load(text))) == []
    recipe = load_recipe(child)
    assert recipe.training.learning_rate == 5e-5 and recipe.lora.lora_dropout == 0.05


def test_the_schema_still_checks_a_child():
    errors = list(editor().iter_errors({"extends": "base.yaml", "trainig": {}}))
    assert [e.message for e in errors] == ["Additional properties are not allowed ('trainig' was unexpected)"]
    errors = list(editor().iter_errors({"extends": "base.yaml", "lora": {"rnak": 4}}))
    best = jsonschema.exceptions.best_match(errors)  # what an editor shows for `lora: anyOf [layer, null]`
    assert best.message == "Additional properties are not allowed ('rnak' was unexpected)"


def test_the_schema_still_requires_the_keys_of_a_whole_recipe():
    raw = {"base_model": "m", "data": {"train": [{"path": "a.jsonl"}]}, "training": {"learning_rate": 1}}
    assert [e.message for e in editor().iter_errors(raw)] == ["'output_dir' is a required property"]
    raw = {"base_model": "m", "training": {"output_dir": "o"}}
    assert [e.message for e in editor().iter_errors(raw)] == ["'data' is a required property"]
    raw = {"base_model": "m", "data": {"train": [{"path": "a"}]}, "training": {"output_dir": "o"}}
    assert list(editor().iter_errors({**raw, "lora": {"lora_alpha": None}}))  # null needs extends


# --- --explain output is YAML ----------------------------------------------------------------------------


def test_explain_leaves_two_spaces_before_every_comment(tmp_path):
    long_id = "an-organization-with-a-long-name/a-model-repository-whose-name-is-long-too"
    recipe = write(
        tmp_path / "r.yaml",
        f"base_model: {long_id}\ndata:\n  train:\n    - path: train.jsonl\ntraining:\n  output_dir: out\n",
    )
    loaded, origins = load_recipe_with_origins(recipe)
    text = explain(loaded, origins)
    commented = [line for line in text.splitlines() if "#" in line]
    assert commented and all(re.search(r"\S {2,}# ", line) for line in commented)
    assert not any(re.search(r"\S # |\S# ", line) for line in commented)
    assert yaml.safe_load(text) == recipe_to_dict(loaded)  # pastes back: no comment glued to a value
    result = CliRunner().invoke(app, ["train", str(recipe), "--explain"])
    assert result.exit_code == 0, result.output
    assert f"base_model: {long_id}  # {recipe}:1" in result.output


def test_null_unsets_inside_a_section_the_base_does_not_have(tmp_path):
    write(tmp_path / "a.yaml", LORA_BASE)
    child = write(tmp_path / "b.yaml", "extends: a.yaml\ndpo:\n  beta: null\n")
    recipe = load_recipe(child, ["quantization={load_in_4bit: true, bnb_4bit_quant_type: null}"])
    assert recipe.dpo is not None and recipe.dpo.beta == 0.1
    assert recipe.quantization is not None and recipe.quantization.bnb_4bit_quant_type == "nf4"
