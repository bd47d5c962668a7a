"""Every number of every recipe section is finite and within NUMBER_LIMIT, checked at load with one line
per key path (not an overflow minutes later)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from typer.testing import CliRunner

from loratool.cli import app
from loratool.errors import LoratoolError
from loratool.recipe import Recipe, load_recipe, validate_recipe
from loratool.recipe.schema import NUMBER_LIMIT, DataSource, section_models

MINIMAL = {
    "base_model": "some/model",
    "data": {"train": [{"path": "train.jsonl"}]},
    "training": {"output_dir": "out"},
}
# MINIMAL with every list of sources present, so that each field of a source can be set.
WITH_SOURCES = {**MINIMAL, "data": {"train": [{"path": "t.jsonl"}], "validation": [{"path": "v.jsonl"}]}}


def _types(annotation: Any) -> set[Any]:
    found = {annotation}
    for arg in get_args(annotation):
        found |= _types(arg)
    return found


def numeric_fields() -> list[tuple[str, Any]]:
    """(key path, annotation) of every int or float field in every section, read from the schema, so that
    a field added later is covered without touching this test."""
    found = []

    def walk(model: Any, prefix: str) -> None:
        for name, field in model.model_fields.items():
            for sub in section_models(field.annotation):
                listed = sub is DataSource or any(
                    get_origin(t) is list and sub in get_args(t) for t in _types(field.annotation)
                )  # a list of sections (data sources, rewards): the first item's fields
                walk(sub, f"{prefix}{name}.0." if listed else f"{prefix}{name}.")
            if {int, float} & _types(field.annotation):  # data.validation is sources or a fraction
                found.append((f"{prefix}{name}", field.annotation))

    walk(Recipe, "")
    return found


# The required keys of sections that have some, so that the number under test is the only problem.
REQUIRED = {
    "grpo": {"rewards": [{"exact_match": "answer"}]},
    "rloo": {"rewards": [{"exact_match": "answer"}]},
}


def recipe_with(path: str, value: Any) -> dict[str, Any]:
    raw = yaml.safe_load(yaml.safe_dump(WITH_SOURCES))
    section = path.split(".")[0]
    if section in REQUIRED:
        raw[section] = yaml.safe_load(yaml.safe_dump(REQUIRED[section]))
    node: Any = raw
    keys = path.split(".")
    for key, after in zip(keys[:-1], keys[1:], strict=True):
        if key.isdigit():
            node = node[int(key)]
        else:  # a list where the next key is an index (grpo.rewards.0.weight), else a section
            node = node.setdefault(key, [{}] if after.isdigit() else {})
    node[keys[-1]] = value
    return raw


def refusal(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(LoratoolError) as info:
        validate_recipe(raw)
    return [line for line in info.value.message.splitlines() if line.startswith("  - ")]


def test_the_class_of_fields_is_found():
    paths = {path for path, _ in numeric_fields()}
    assert {"lora.r", "lora.lora_alpha", "data.max_length", "training.max_steps", "training.seed"} <= paths
    assert {
        "dpo.beta",
        "quantization.llm_int8_threshold",
        "data.train.0.max_rows",
        "lora.rank_pattern",
    } <= paths


@pytest.mark.parametrize(("path", "annotation"), numeric_fields(), ids=[p for p, _ in numeric_fields()])
def test_every_number_field_refuses_huge_and_infinite_values(path, annotation):
    floats = float in _types(annotation)
    mapping = any(get_origin(t) is dict for t in _types(annotation))
    wrap = (lambda v: {"q_proj": v}) if mapping else (lambda v: v)
    values = [10**30, -(10**30), NUMBER_LIMIT + 1]
    if floats:
        values += [math.inf, -math.inf, math.nan, 1e300]
    for value in values:
        lines = refusal(recipe_with(path, wrap(value)))
        # the key's own line (for a mapping, pydantic may name the entry: lora.alpha_pattern.q_proj)
        assert len(lines) == 1 and re.match(rf"  - {re.escape(path)}[.:]", lines[0]), (value, lines)


def test_the_limit_itself_is_a_valid_seed_and_count():
    recipe = validate_recipe(recipe_with("training.seed", NUMBER_LIMIT))
    assert recipe.training.seed == NUMBER_LIMIT
    assert validate_recipe(recipe_with("training.max_steps", 10**9)).training.max_steps == 10**9


def test_pass_through_library_numbers_are_checked_too():
    lines = refusal(recipe_with("training.adam_epsilon", math.inf))
    assert lines == ["  - training.adam_epsilon: inf is not a finite number"]
    lines = refusal(recipe_with("lora.layer_replication", [[0, 10**30]]))
    assert len(lines) == 1 and lines[0].startswith("  - lora.layer_replication: ")
    assert validate_recipe(recipe_with("training.adam_epsilon", 1e-8)).training.model_extra == {
        "adam_epsilon": 1e-8
    }


# The cases of the probe report, written as a user writes them: in YAML, where `1e20` (no dot) is text.
PROBES = {
    "training.learning_rate": ".inf",
    "lora.lora_alpha": "1e400",
    "lora.r": "1e20",
    "data.max_length": "1e23",
    "training.max_steps": "1e22",
    "training.seed": "-1",
}


def write_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL, sort_keys=False))
    return path


@pytest.mark.parametrize(("key", "text"), [*PROBES.items(), ("training.learning_rate", ".nan")])
def test_probe_values_are_refused_at_load_naming_the_key(tmp_path, key, text):
    recipe = write_recipe(tmp_path)
    with pytest.raises(LoratoolError) as info:
        load_recipe(recipe, [f"{key}={text}"])
    lines = [line for line in info.value.message.splitlines() if line.startswith("  - ")]
    assert len(lines) == 1 and lines[0].startswith(f"  - {key}: "), lines


def test_probe_values_in_a_file_each_get_one_line_and_explain_refuses_them(tmp_path):
    section_lines: dict[str, list[str]] = {}
    for key, text in PROBES.items():
        section, name = key.split(".")
        section_lines.setdefault(section, []).append(f"  {name}: {text}")
    body = "base_model: some/model\n"
    body += "data:\n  train:\n    - path: train.jsonl\n" + "\n".join(section_lines["data"]) + "\n"
    body += "training:\n  output_dir: out\n" + "\n".join(section_lines["training"]) + "\n"
    body += "lora:\n" + "\n".join(section_lines["lora"]) + "\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    result = CliRunner().invoke(app, ["train", str(recipe), "--explain"])
    assert result.exit_code != 0
    assert f"{len(PROBES)} problems in the recipe" in result.output
    for key in PROBES:
        assert sum(line.startswith(f"  - {key}: ") for line in result.output.splitlines()) == 1, key
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    assert "out of range" in result.output and "not a finite number" in result.output
