"""The recipe as a JSON Schema (draft 2020-12), generated from the pydantic schema in recipe.py.

Editors that speak the YAML language server read it from the first line of a recipe
(`# yaml-language-server: $schema=../docs/recipe.schema.json`): completion, the field docs on hover, and a
squiggle under a typo. docs/recipe.schema.json is this output, kept in sync by a test.
"""

from __future__ import annotations

import json
from typing import Any

from loratool.recipe import MOVED_KEYS, RESERVED_LORA_KEYS, RESERVED_TRAINING_KEYS, Recipe
from loratool.recipe.library_fields import LORA_CONFIG_FIELDS, SFT_CONFIG_FIELDS

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = "docs/recipe.schema.json"  # relative to the repository root; recipes/ point to it


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file: every key with its description, default and allowed values;
    unknown keys are refused everywhere, as loading refuses them."""
    schema = Recipe.model_json_schema(mode="validation")
    schema = {"$schema": DRAFT, **schema, "title": "loratool recipe"}
    schema["properties"] = {
        "extends": {
            "type": "string",
            "description": "Path of a base recipe (relative to this file) that this one deep-merges onto: "
            "mappings merge key by key, lists and values replace. Chains are allowed, cycles refused.",
        },
        **schema["properties"],
    }
    defs = schema["$defs"]
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
    schema["additionalProperties"] = False
    return schema


def schema_json() -> str:
    """recipe_schema() as the text of docs/recipe.schema.json."""
    return json.dumps(recipe_schema(), indent=2, ensure_ascii=False) + "\n"
