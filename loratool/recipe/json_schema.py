"""The recipe as a JSON Schema (draft 2020-12), generated from the pydantic schema in schema.py.

Editors that speak the YAML language server read it from the first line of a recipe
(`# yaml-language-server: $schema=../docs/recipe.schema.json`): completion, the field docs on hover, and a
squiggle under a typo. docs/recipe.schema.json is this output, kept in sync by a test.
"""

from __future__ import annotations

import json
from typing import Any

from loratool.recipe.library_fields import LORA_CONFIG_FIELDS, SFT_CONFIG_FIELDS
from loratool.recipe.schema import (
    EXTENDS_DOC,
    MOVED_KEYS,
    RESERVED_LORA_KEYS,
    RESERVED_TRAINING_KEYS,
    Recipe,
)

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = "docs/recipe.schema.json"  # relative to the repository root; recipes/ point to it


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file: every key with its description, default and allowed values;
    unknown keys are refused everywhere, as loading refuses them. A recipe with `extends:` is a layer over
    its base: it needs no required key, and a null may unset an inherited one (EXTENDS_DOC)."""
    model = Recipe.model_json_schema(mode="validation")
    defs = model["$defs"]
    # lora and training also take any other LoraConfig / SFTConfig field, handed to the library as is:
    # they are known keys (so that a typo next to them is still caught), with any value.
    passthrough = [
        ("LoraSection", LORA_CONFIG_FIELDS - RESERVED_LORA_KEYS, "peft.LoraConfig"),
        ("TrainingSection", SFT_CONFIG_FIELDS - RESERVED_TRAINING_KEYS - set(MOVED_KEYS), "trl.SFTConfig"),
    ]
    for name, fields, library in passthrough:
        section = defs[name]
        for field in sorted(fields - set(section["properties"])):
            section["properties"][field] = {
                "description": f"A {library} field loratool passes through unchanged; see its documentation."
            }
    for section in defs.values():
        if section.get("type") == "object":
            section["additionalProperties"] = False
    # Two readings of one file, chosen by `extends`: without it the recipe is whole (the schema as
    # pydantic writes it, required keys included); with it, each section is a layer whose keys may each be
    # left out or null. JSON Schema only adds constraints, so the top level holds just the key names.
    whole = model["properties"]
    layer = {}
    for key, prop in whole.items():
        section = _section_of(prop)
        if section is None:
            layer[key] = _or_null({k: v for k, v in prop.items() if k not in ("title", "description")})
            continue
        defs[f"{section}Layer"] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                k: _or_null({"$ref": f"#/$defs/{section}/properties/{k}"}, unless=v)
                for k, v in defs[section]["properties"].items()
            },
        }
        layer[key] = _or_null({"$ref": f"#/$defs/{section}Layer"})
    extends = {"type": "string", "description": " ".join(EXTENDS_DOC.split())}
    return {
        "$schema": DRAFT,
        "title": "loratool recipe",
        "description": model["description"],
        "type": "object",
        "properties": {
            "extends": extends,
            **{k: {"description": p["description"]} for k, p in whole.items()},
        },
        "additionalProperties": False,
        "if": {"required": ["extends"]},
        "then": {"properties": layer},
        "else": {"required": model["required"], "properties": whole},
        "$defs": defs,
    }


def _section_of(prop: dict[str, Any]) -> str | None:
    """The $defs name of the section a top-level key holds (`lora` -> LoraSection), None for a value."""
    for option in [prop, *prop.get("anyOf", [])]:
        if "$ref" in option:
            return option["$ref"].rsplit("/", 1)[-1]
    return None


def _or_null(schema: dict[str, Any], unless: dict[str, Any] | None = None) -> dict[str, Any]:
    """`schema`, or null too, unless the property `unless` already takes null (an optional field, or a
    pass-through field, which takes anything)."""
    if unless is not None:
        typed = {"type", "$ref", "anyOf", "enum", "const"} & unless.keys()
        if not typed or {"type": "null"} in unless.get("anyOf", []):
            return schema
    return {"anyOf": [schema, {"type": "null"}]}


def schema_json() -> str:
    """recipe_schema() as the text of docs/recipe.schema.json."""
    return json.dumps(recipe_schema(), indent=2, ensure_ascii=False) + "\n"
