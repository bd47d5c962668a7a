"""The recipe: one strict, typed YAML file that says everything a run does. Four parts:

- schema.py     the sections (model, quantization, lora, data, training, dpo), every field documented
                once at its definition, with its type, default and range
- rules.py      rules that span fields (and methods.py, the settings each lora.method takes)
- load.py       reading a file: YAML, `extends:` bases, `--set` overrides, where each value came from
                (`--explain`), and one error that lists every problem with its key path
- reference.py  the reference doc generated from the field docs (json_schema.py: the JSON Schema)

The names other packages use are importable from here.
"""

from loratool.recipe.load import (
    MAX_ALIAS_NODES,
    Origins,
    apply_override,
    explain,
    load_recipe,
    load_recipe_with_origins,
    parse_yaml,
    recipe_to_dict,
    unknown_key_problems,
    validate_recipe,
)
from loratool.recipe.reference import reference, reference_markdown
from loratool.recipe.rules import cross_field_problems
from loratool.recipe.schema import (
    MOVED_KEYS,
    RESERVED_LORA_KEYS,
    RESERVED_TRAINING_KEYS,
    DataSection,
    DataSource,
    DpoSection,
    GrpoSection,
    KtoSection,
    LoraSection,
    ModelSection,
    QuantizationSection,
    Recipe,
    RewardFunction,
    RewardSection,
    RlooSection,
    Section,
    TrainingSection,
)

__all__ = [
    "MAX_ALIAS_NODES",
    "MOVED_KEYS",
    "RESERVED_LORA_KEYS",
    "RESERVED_TRAINING_KEYS",
    "DataSection",
    "DataSource",
    "DpoSection",
    "GrpoSection",
    "KtoSection",
    "LoraSection",
    "ModelSection",
    "Origins",
    "QuantizationSection",
    "Recipe",
    "RewardFunction",
    "RewardSection",
    "RlooSection",
    "Section",
    "TrainingSection",
    "apply_override",
    "cross_field_problems",
    "explain",
    "load_recipe",
    "load_recipe_with_origins",
    "parse_yaml",
    "recipe_to_dict",
    "reference",
    "reference_markdown",
    "unknown_key_problems",
    "validate_recipe",
]
