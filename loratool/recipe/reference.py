"""The recipe reference: every key with its type, default and meaning, generated from the field docs in
schema.py (`loratool recipe-reference`, docs/recipe-reference.md). The JSON Schema for editors, generated
from the same schema, is its sibling json_schema.py."""

from __future__ import annotations

from pydantic import BaseModel

from loratool.recipe.schema import EXTENDS_DOC, NUMBER_LIMIT, DataSource, Recipe, section_models


def reference() -> str:
    """Every recipe key with its type, default and meaning, generated from the schema's docstrings."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            subs = section_models(field.annotation)
            if field.is_required():
                default = "required"
            elif subs and subs[0] is not DataSource:
                default = "section" if field.default is not None else "optional section"
            else:
                default = f"default: {field.default!r}"
            out.append(f"{prefix}{name}  ({default})")
            if field.description:
                out.extend("    " + line.strip() for line in field.description.splitlines())
            for sub in subs:
                walk(sub, f"{prefix}{name}{'.N' if sub is DataSource else ''}.")

    out.append("extends  (optional)")
    out.extend("    " + line.strip() for line in EXTENDS_DOC.splitlines())
    walk(Recipe, "")
    out.append("")
    out.append("training also accepts any other trl.SFTConfig field; lora any other peft.LoraConfig field.")
    out.append(f"Every number in a recipe is finite and at most {NUMBER_LIMIT:,} either way.")
    return "\n".join(out)


def reference_markdown() -> str:
    """docs/recipe-reference.md: the reference above, for reading on the web."""
    return (
        "# Recipe reference\n\n"
        "Generated from the schema in `loratool/recipe/schema.py` by `loratool recipe-reference --markdown`; "
        "a test keeps it in sync.\n\n```\n" + reference() + "\n```\n"
    )
