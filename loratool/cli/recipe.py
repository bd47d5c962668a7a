"""`loratool recipe-reference` and `recipe-schema`: every recipe key, as text or as JSON Schema."""

from __future__ import annotations

from typing import Annotated

import typer


def recipe_reference(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print it as docs/recipe-reference.md.")
    ] = False,
) -> None:
    """Print every recipe key with its default and meaning."""
    # deferred, here and below: the recipe schema loads pydantic and yaml
    from loratool.recipe import reference, reference_markdown

    typer.echo(reference_markdown() if markdown else reference(), nl=not markdown)


def recipe_schema() -> None:
    """Print the recipe's JSON Schema (draft 2020-12), for editors: see docs/recipe.schema.json."""
    from loratool.recipe.json_schema import schema_json

    typer.echo(schema_json(), nl=False)
