"""`loratool data`: show a recipe's data as training tokenizes it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from loratool.cli.application import reports_errors, start_libraries
from loratool.cli.options import RecipeArgument, SetOption


@reports_errors
def data_(
    recipe: RecipeArgument,
    rows: Annotated[int, typer.Option("--rows", min=0, help="How many rows to show, tokenized.")] = 3,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Also write a self-contained HTML page (rows, checks, histogram)."),
    ] = None,
    histogram: Annotated[
        Path | None, typer.Option("--histogram", help="Also write the token-length histogram as a PNG.")
    ] = None,
    set_: SetOption = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit with code 1 when a check warns (for CI).")
    ] = False,
) -> None:
    """Show the data as training tokenizes it: loss tokens highlighted, lengths, summary and checks."""
    # deferred, here and below: the recipe loads pydantic and yaml, the tokenizer transformers
    from loratool.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    start_libraries()
    from loratool.data.inspect import format_report, inspect_data, length_histogram_png, to_html
    from loratool.model.load import load_tokenizer

    tokenizer = load_tokenizer(loaded.base_model, loaded.model, typer.echo)
    report = inspect_data(loaded, tokenizer)
    typer.echo(format_report(report, rows=rows, color=sys.stdout.isatty()))
    if histogram is not None:
        length_histogram_png(report, histogram)
        typer.echo(f"histogram written to {histogram}")
    if html is not None:
        html.write_text(to_html(report, rows=rows), encoding="utf-8")
        typer.echo(f"HTML written to {html}")
    if strict and report.findings:
        raise typer.Exit(1)
