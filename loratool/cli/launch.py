"""`loratool launch`: write the file SLURM, SkyPilot, Kubeflow or torchrun runs to train a recipe on
several machines."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Literal

import typer

from loratool.cli.application import reports_errors, start_libraries
from loratool.cli.options import (
    BucketOption,
    CpusPerTaskOption,
    GpuOption,
    GpusPerNodeOption,
    InstallOption,
    NodesOption,
    PartitionOption,
    RecipeArgument,
    SlurmTimeOption,
)


@reports_errors
def launch(
    recipe: RecipeArgument,
    target: Annotated[
        Literal["slurm", "skypilot", "kubeflow", "torchrun"],
        typer.Option(
            "--target",
            help="slurm: an sbatch script; skypilot: a task YAML; kubeflow: a PyTorchJob manifest; "
            "torchrun: a script to run on each of your own machines.",
            show_default=False,
        ),
    ],
    nodes: NodesOption = 1,
    gpus_per_node: GpusPerNodeOption = None,
    gpu: GpuOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write the file here instead of printing it.", show_default=False
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --output file.")] = False,
    time: SlurmTimeOption = None,
    partition: PartitionOption = None,
    cpus_per_task: CpusPerTaskOption = None,
    bucket: BucketOption = None,
    install: InstallOption = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image", help="kubeflow (required): the container image every pod runs.", show_default=False
        ),
    ] = None,
    volume_claim: Annotated[
        str | None,
        typer.Option(
            "--volume-claim",
            metavar="NAME",
            help="kubeflow (required): a PersistentVolumeClaim mounted at /outputs; the run directory is "
            "written there.",
            show_default=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a recipe key, as for train: the launch file passes it on to every node's train.",
        ),
    ] = None,
) -> None:
    """Write the launch file for a cluster tool (SLURM, SkyPilot, Kubeflow) or torchrun: every node runs
    `torchrun ... -m loratool train RECIPE`; the file says what it assumes."""
    # deferred: the recipe and the launch files load pydantic and yaml (and sizing, transformers)
    from loratool.launch import check_target, job_for, launch_file, write_launch_file
    from loratool.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    check_target(target, str(recipe), image=image, volume_claim=volume_claim)
    if gpus_per_node is None:
        start_libraries()  # the planner sizes the run: torch's threads and the library noise, as for plan
    given = {
        "--target": target,
        "--nodes": nodes if nodes != 1 else None,
        "--gpus-per-node": gpus_per_node,
        "--gpu": gpu,
        "--time": time,
        "--partition": partition,
        "--cpus-per-task": cpus_per_task,
        "--bucket": bucket,
        "--install": install,
        "--image": image,
        "--volume-claim": volume_claim,
    }
    words = ["loratool", "launch", shlex.quote(str(recipe))]
    words += [f"--set {shlex.quote(item)}" for item in set_ or []]
    words += [f"{flag} {shlex.quote(str(value))}" for flag, value in given.items() if value is not None]
    job = job_for(
        recipe,
        loaded,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu=gpu,
        command=" ".join(words),
        sets=set_ or [],
    )
    text = launch_file(
        job,
        target,
        time=time,
        partition=partition,
        cpus_per_task=cpus_per_task,
        bucket=bucket,
        install=install,
        image=image,
        volume_claim=volume_claim,
    )
    if output is None:
        typer.echo(text, nl=False)
        return
    write_launch_file(text, output, overwrite=overwrite)
    typer.echo(f"wrote {output} ({target}, {nodes} node(s) x {job.gpus_per_node} GPU(s))", err=True)
