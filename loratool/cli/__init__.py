"""The `loratool` command line. Thin: parse, load the recipe, call one library function, print errors.

One module per command group, each command a function there:
  application.py  the Typer app, main(), --version, errors -> one message and an exit code, library noise
  options.py      the options and arguments several commands declare the same way
  train.py        train, plan, sweep      (a recipe: train it, predict its cost, train a grid of it)
  launch.py       launch                  (the file SLURM, SkyPilot, Kubeflow or torchrun runs to train it)
  data.py         data                    (a recipe's data as training tokenizes it)
  recipe.py       recipe-reference, recipe-schema
  merge.py        merge                   (one adapter, or several combined first)
  export.py       export                  (GGUF or a merged HF checkpoint)
  eval.py         eval
  generate.py     generate, chat

torch and transformers, and the loratool stages that load them, are imported inside the commands, so
`loratool --help` answers instantly.
"""

from __future__ import annotations

from loratool.cli import data, eval, export, generate, launch, merge, recipe, serve, train
from loratool.cli.application import app, main

# Registered here, in one place, in the order `loratool --help` lists them: the order of the data flow.
app.command("train")(train.train)
app.command("data")(data.data_)
app.command("plan")(train.plan_)
app.command("sweep")(train.sweep)
app.command("launch")(launch.launch)
app.command("recipe-reference")(recipe.recipe_reference)
app.command("recipe-schema")(recipe.recipe_schema)
app.command("merge")(merge.merge)
app.command("export")(export.export)
app.command("eval")(eval.eval_)
app.command("generate")(generate.generate)
app.command("chat")(generate.chat)
app.command("serve")(serve.serve)

__all__ = ["app", "main"]
