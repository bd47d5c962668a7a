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


# Where a launched job trains: launch (one run) and sweep --launch (one job per cell).
NodesOption = Annotated[int, typer.Option("--nodes", help="Machines to train on.", min=1)]
GpusPerNodeOption = Annotated[
    int | None,
    typer.Option(
        "--gpus-per-node",
        help="GPUs (training processes) per machine. Default: 1 when `loratool plan` predicts that one "
        "--gpu holds the run; the file says how it was chosen.",
        min=1,
        show_default=False,
    ),
]
GpuOption = Annotated[
    str | None,
    typer.Option(
        "--gpu",
        help="The GPU model, as `loratool plan --gpu` names it (H100, A100-80GB, L4, ...): SkyPilot's "
        "accelerator, and what --gpus-per-node is sized for. Default: A100-80GB.",
        show_default=False,
    ),
]
SlurmTimeOption = Annotated[
    str | None,
    typer.Option(
        "--time", help="slurm: the job's time limit (sbatch --time, e.g. 12:00:00).", show_default=False
    ),
]
PartitionOption = Annotated[
    str | None,
    typer.Option("--partition", help="slurm: the partition (sbatch --partition).", show_default=False),
]
CpusPerTaskOption = Annotated[
    int | None,
    typer.Option(
        "--cpus-per-task", help="slurm: CPU cores per node. Default: 8 per GPU.", min=1, show_default=False
    ),
]
BucketOption = Annotated[
    str | None,
    typer.Option(
        "--bucket",
        help="skypilot: a bucket (a name SkyPilot creates, or s3://..., gs://..., r2://...) mounted on "
        "every node at /outputs; the run directory is written there.",
        show_default=False,
    ),
]
InstallOption = Annotated[
    str | None,
    typer.Option(
        "--install",
        metavar="SPEC",
        help="skypilot: what setup pip-installs on every node. Default: loratool at this version.",
        show_default=False,
    ),
]
