"""The recipe's JSON Schema and `extends:` inheritance."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO
from helpers.recipe_schema import MINIMAL, write
from loratool.errors import LoratoolError
from loratool.recipe import explain, load_recipe, load_recipe_with_origins
from loratool.recipe.json_schema import SCHEMA_FILE, recipe_schema, schema_json

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def validator() -> jsonschema.Draft202012Validator:
    schema = recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)  # a valid draft 2020-12 schema
    return jsonschema.Draft202012Validator(schema)


def test_schema_file_is_in_sync():
    assert (REPO / SCHEMA_FILE).read_text() == schema_json(), (
        "run: loratool recipe-schema > docs/recipe.schema.json"
    )


def test_schema_carries_descriptions_defaults_and_enums():
    schema = recipe_schema()
    data = schema["$defs"]["DataSection"]["properties"]
    assert data["truncation"]["enum"] == ["truncate", "drop"] and data["truncation"]["default"] == "truncate"
    assert "Longest tokenized example" in data["max_length"]["description"]
    lora = schema["$defs"]["LoraSection"]
    assert lora["properties"]["r"]["default"] == 16
    assert "use_qalora" in lora["properties"]  # a LoraConfig pass-through field is a known key
    assert "task_type" not in lora["properties"]  # set by loratool: not a recipe key
    training = schema["$defs"]["TrainingSection"]["properties"]
    assert "eval_on_start" in training and "max_length" not in training  # moved to data.max_length
    assert "extends" in schema["properties"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates_against_the_schema_and_points_to_it(path):
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../docs/recipe.schema.json"
    assert (path.parent / "../docs/recipe.schema.json").resolve() == (REPO / SCHEMA_FILE).resolve()
    errors = list(validator().iter_errors(yaml.safe_load(path.read_text())))
    assert errors == []


@pytest.mark.parametrize(
    ("section", "key"),
    [("training", "learnig_rate"), ("lora", "rank"), ("data", "max_len"), (None, "epochs")],
)
def test_unknown_key_fails_the_schema(section, key):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    (raw.setdefault(section, {}) if section else raw)[key] = 1
    errors = list(validator().iter_errors(raw))
    assert len(errors) == 1 and "Additional properties are not allowed" in errors[0].message
    assert key in errors[0].message


def test_wrong_enum_value_fails_the_schema():
    raw = {**MINIMAL, "data": {"train": [{"path": "a.jsonl", "format": "csv"}]}}
    assert list(validator().iter_errors(raw))


def test_extends_deep_merges_and_lists_replace(tmp_path):
    base = write(
        tmp_path / "base.yaml",
        "base_model: some/model\n"
        "lora:\n  r: 8\n  target_modules: [q_proj, v_proj, k_proj]\n"
        "data:\n  train:\n    - path: a.jsonl\n      format: alpaca\n    - path: b.jsonl\n  max_length: 512\n"
        "training:\n  output_dir: out/base\n  learning_rate: 1.0e-4\n",
    )
    (tmp_path / "sub").mkdir()
    child = write(
        tmp_path / "sub" / "child.yaml",
        "extends: ../base.yaml\nlora:\n  lora_alpha: 64\n  target_modules: [o_proj]\n"
        "data:\n  train:\n    - path: c.jsonl\n",
    )
    recipe, origins = load_recipe_with_origins(child, ["training.learning_rate=3e-4"])
    assert recipe.lora.r == 8 and recipe.lora.lora_alpha == 64  # merged key by key
    assert recipe.lora.target_modules == ["o_proj"]  # lists replace
    assert [s.path for s in recipe.data.train] == ["c.jsonl"] and recipe.data.train[0].format == "auto"
    assert recipe.data.max_length == 512 and recipe.training.output_dir == "out/base"
    assert recipe.training.learning_rate == 3e-4
    assert origins["lora.r"] == f"{base}:3" and origins["lora.lora_alpha"] == f"{child}:3"
    assert origins["training.learning_rate"] == "--set training.learning_rate=3e-4"
    assert "data.train.0.format" not in origins and "data.train.1.path" not in origins
    text = explain(recipe, origins)
    assert yaml.safe_load(text)["lora"]["r"] == 8  # the explanation is itself YAML
    line = next(x for x in text.splitlines() if x.strip().startswith("r: 8"))
    assert line.endswith(f"# {base}:3")
    assert next(x for x in text.splitlines() if "bias:" in x).endswith("# default")


def test_extends_chain_and_base_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    write(tmp_path / "a.yaml", "base_model: m\ndata:\n  train:\n    - path: data/rows.jsonl\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\ntraining:\n  output_dir: out/b\n")
    (tmp_path / "c").mkdir()
    c = write(tmp_path / "c" / "c.yaml", "extends: ../b.yaml\nlora:\n  r: 4\n")
    recipe = load_recipe(c)
    assert recipe.lora.r == 4 and recipe.training.output_dir == "out/b"
    assert Path(recipe.data.train[0].path) == tmp_path / "data" / "rows.jsonl"  # relative to a.yaml


def test_extends_cycle_is_refused_naming_the_chain(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\nbase_model: m\n")
    write(tmp_path / "b.yaml", "extends: c.yaml\n")
    write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(LoratoolError, match="cycle") as info:
        load_recipe(tmp_path / "a.yaml")
    assert "a.yaml -> " in info.value.message and "b.yaml -> " in info.value.message
    assert "c.yaml -> " in info.value.message


def test_extends_itself_and_missing_base(tmp_path):
    me = write(tmp_path / "me.yaml", "extends: me.yaml\n")
    with pytest.raises(LoratoolError, match="cycle"):
        load_recipe(me)
    lost = write(tmp_path / "lost.yaml", "base_model: m\n\nextends: nowhere.yaml\n")
    with pytest.raises(LoratoolError, match=r"lost.yaml:3: extends 'nowhere.yaml': no such recipe file"):
        load_recipe(lost)


def test_base_problems_name_the_base_file(tmp_path):
    write(tmp_path / "base.yaml", "base_model: m\nlora:\n  r: 8\n  r: 16\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\n")
    with pytest.raises(LoratoolError) as info:
        load_recipe(child)
    assert f"{tmp_path / 'base.yaml'}: lora.r: key given twice" in info.value.message
