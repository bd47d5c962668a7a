"""Options and arguments that several commands declare the same way, defined once here so they cannot
drift apart. An option whose help says something different per command (--output, --overwrite, --base,
...) stays with its command: its default and meaning differ there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# RECIPE: train, data, plan, sweep.
RecipeArgument = Annotated[
    Path, typer.Argument(help="YAML recipe file (see recipes/).", show_default=False, metavar="RECIPE")
]
# --set on the commands that only read a recipe (data, plan); train documents it in full.
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key, as for train."),
]

# What generate and chat talk to.
TargetArgument = Annotated[
    Path,
    typer.Argument(
        help="A run directory, a merged checkpoint, or a base model (directory or .gguf file).",
        show_default=False,
        metavar="TARGET",
    ),
]
AdapterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        metavar="[NAME=]DIR",
        help="Another adapter to load on the same base (repeatable); NAME defaults to the directory "
        "name. Its base must be the loaded one.",
        show_default=False,
    ),
]
SystemOption = Annotated[str | None, typer.Option("--system", help="A system message.", show_default=False)]
# Sampling, shared by generate and chat; each command gives its own default (a chat answer may be longer).
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", min=1)]
TemperatureOption = Annotated[float, typer.Option("--temperature", help="0 is greedy.", min=0.0)]
TopPOption = Annotated[float, typer.Option("--top-p")]
ToolsOption = Annotated[
    Path | None,
    typer.Option(
        "--tools",
        metavar="FILE",
        help="A JSON list of tool definitions, rendered by the chat template as in training.",
        show_default=False,
    ),
]
