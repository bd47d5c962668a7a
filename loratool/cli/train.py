"""`loratool train`, `plan` and `sweep`: train a recipe, predict what training it costs, or train a grid
of its variants."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from loratool.cli import application
from loratool.cli.application import reports_errors, skip_bitsandbytes_unless_used, start_libraries
from loratool.cli.options import (
    BucketOption,
    CpusPerTaskOption,
    GpuOption,
    GpusPerNodeOption,
    InstallOption,
    NodesOption,
    PartitionOption,
    RecipeArgument,
    SetOption,
    SlurmTimeOption,
)
from loratool.errors import LoratoolError


@reports_errors
def train(
    recipe: RecipeArgument,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable; YAML values).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate the recipe, check data, tokenizer and target modules without loading weights, "
            "print the resolved recipe and exit.",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous run in training.output_dir.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in training.output_dir from its last checkpoint."),
    ] = False,
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke",
            help="Check the recipe end to end in about a minute: the same recipe on a small random model "
            "of the base's architecture (no weights downloaded), a few steps on a few rows, then merge and "
            "export, each verified. Outputs go to training.output_dir + '-smoke', marked as a smoke run.",
        ),
    ] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Print the resolved recipe with the origin of every value (default, file:line of the "
            "recipe or a base it extends, or --set) and exit.",
        ),
    ] = False,
) -> None:
    """Fine-tune a model with LoRA / QLoRA as the recipe says; the output directory is a PEFT adapter."""
    # deferred, here and below: the recipe loads pydantic and yaml, the training stages torch
    from loratool.recipe import explain as explained
    from loratool.recipe import load_recipe, load_recipe_with_origins

    if explain or dry_run:
        loaded, origins = load_recipe_with_origins(recipe, set_ or [])
    else:
        loaded, origins = load_recipe(recipe, set_ or []), {}
    if explain:
        typer.echo(explained(loaded, origins))
        return
    if application.OWNS_PROCESS and not smoke:  # a smoke run merges and exports too: leave it whole
        skip_bitsandbytes_unless_used(loaded)  # ~1.6 s of start-up that a plain LoRA run never uses
    start_libraries()
    from loratool.train.dry_run import dry_run as check_only
    from loratool.train.run import run_train

    if smoke:
        if resume:
            raise LoratoolError(
                "--smoke and --resume: a smoke run always starts afresh", hint="drop --resume"
            )
        from loratool.smoke import run_smoke

        run_smoke(loaded, log=typer.echo)
        return
    if dry_run:
        check_only(loaded, overwrite=overwrite, resume=resume, log=typer.echo)
        typer.echo("resolved recipe:  # after each value: default, the file and line that set it, or --set")
        typer.echo(explained(loaded, origins))
        return
    from loratool.train.elastic import elastic_restart

    # torchrun --max-restarts starts the same command again after a failure: that attempt continues the
    # run its launch left (never another launch's), whatever --overwrite or --resume the command had.
    restarted = elastic_restart(Path(loaded.training.output_dir).expanduser().resolve())
    if restarted is not None:
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"torchrun restarted this launch (attempt {int(os.environ['TORCHELASTIC_RESTART_COUNT']) + 1}): "
                       + ("continuing its run from the last complete checkpoint" if restarted == "resume"
                          else "its run stopped before its first checkpoint: starting it again"))  # fmt: skip
        overwrite, resume = restarted == "overwrite", restarted == "resume"
    run_train(loaded, overwrite=overwrite, resume=resume, log=typer.echo)


@reports_errors
def plan_(
    recipe: RecipeArgument,
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", help="Plan for a named GPU (H100, A100-80GB, L4, RTX4090, T4, ...)."),
    ] = None,
    memory: Annotated[
        str | None, typer.Option("--memory", help="Plan for a memory budget, e.g. 24GiB (GPU formula).")
    ] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate", help="Also run a few real steps here and compare measured with predicted."
        ),
    ] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON (peak_memory_bytes, ...).")
    ] = False,
    set_: SetOption = None,
    nodes: Annotated[
        int | None,
        typer.Option(
            "--nodes",
            min=1,
            help="Also plan the run on this many machines (DDP, ZeRO-2, ZeRO-3/FSDP).",
            show_default=False,
        ),
    ] = None,
    gpus_per_node: Annotated[
        int | None,
        typer.Option(
            "--gpus-per-node",
            min=1,
            help="Also plan the run on this many GPUs per machine.",
            show_default=False,
        ),
    ] = None,
    interconnect: Annotated[
        str,
        typer.Option(
            "--interconnect",
            help="The link between machines: infiniband (400 Gb/s per GPU) or "
            "ethernet (100 Gb/s per machine).",
        ),
    ] = "infiniband",
) -> None:
    """Predict peak memory by component, speed and wall time, and list conflicts, without weights."""
    from loratool.recipe import load_recipe

    if gpu and memory:
        raise LoratoolError("--gpu and --memory: give one", hint="--gpu H100, or --memory 24GiB")
    loaded = load_recipe(recipe, set_ or [])
    start_libraries()
    from loratool.train.plan import calibrate as measure
    from loratool.train.plan import plan_json, plan_recipe

    log = (lambda _: None) if json_ else typer.echo
    plan = plan_recipe(loaded, gpu=gpu, memory=memory, nodes=nodes, gpus_per_node=gpus_per_node,
                       interconnect=interconnect, log=log)  # fmt: skip
    if calibrate:
        plan.calibration = measure(loaded, plan, log=log)
    typer.echo(plan_json(plan) if json_ else plan.format())


@reports_errors
def sweep(
    recipe: Annotated[
        Path | None,
        typer.Argument(
            help="YAML recipe file (see recipes/); not with --collect.", show_default=False, metavar="RECIPE"
        ),
    ] = None,
    vary: Annotated[
        list[str] | None,
        typer.Option(
            "--vary",
            metavar="KEY=V1,V2,...",
            help="A recipe key and the values it takes, e.g. --vary lora.r=8,16,32 (YAML values; a list "
            "stays whole: [q_proj,v_proj]). Repeat it for a grid: every combination is one cell.",
            show_default=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key in every cell, as for train."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="The sweep's directory, one run directory per cell inside it. Default: sweep-NAME next to "
            "the recipe's training.output_dir (out/NAME).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace a previous sweep there (each cell by its own record)."),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a previous sweep there: finished cells with the same recipe are kept, unfinished "
            "ones continue from their last checkpoint, the rest train.",
        ),
    ] = False,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval", help="Run `loratool eval` on each cell after it trains; its metrics join the table."
        ),
    ] = False,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help="--eval on this file instead of each run's validation split (implies --eval).",
            show_default=False,
        ),
    ] = None,
    eval_max_samples: Annotated[
        int | None,
        typer.Option("--eval-max-samples", help="--eval on at most N rows (implies --eval).", min=1),
    ] = None,
    eval_max_new_tokens: Annotated[
        int | None,
        typer.Option("--eval-max-new-tokens", help="--eval's longest answer (implies --eval).", min=1),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check every cell as `train --dry-run` does (data, target modules, adapter size, plan) "
            "and exit; nothing is written.",
        ),
    ] = False,
    launch: Annotated[
        str | None,
        typer.Option(
            "--launch",
            metavar="slurm|skypilot",
            help="Train the cells on a cluster instead of in turn here: write a SLURM job array (task N "
            "trains cell N) or one SkyPilot task per cell into the sweep directory; then --collect.",
            show_default=False,
        ),
    ] = None,
    collect: Annotated[
        Path | None,
        typer.Option(
            "--collect",
            metavar="DIR",
            help="Build the table of the sweep in DIR from its cells' run directories as they are now "
            "(cells that failed, still run or have not started are marked).",
            show_default=False,
        ),
    ] = None,
    nodes: NodesOption = 1,
    gpus_per_node: GpusPerNodeOption = None,
    gpu: GpuOption = None,
    time: SlurmTimeOption = None,
    partition: PartitionOption = None,
    cpus_per_task: CpusPerTaskOption = None,
    bucket: BucketOption = None,
    install: InstallOption = None,
) -> None:
    """Train a grid of recipe variants, one run per cell, and compare them in one table and plot."""
    from loratool.train.sweep import EvalOptions, collect_sweep, run_sweep

    asked = evaluate or any(v is not None for v in (eval_data, eval_max_samples, eval_max_new_tokens))
    if collect is not None:
        if recipe is not None or vary or launch or dry_run or asked:
            raise LoratoolError(
                "--collect reads a sweep that is already there: it takes no RECIPE, --vary, --launch, "
                "--dry-run or --eval",
                hint=f"loratool sweep --collect {collect}",
            )
        collect_sweep(collect, log=typer.echo)
        return
    if recipe is None or not vary:
        raise LoratoolError(
            "sweep needs a RECIPE and at least one --vary KEY=V1,V2,...",
            hint="e.g. loratool sweep recipes/tiny-sft.yaml --vary lora.r=8,16; or --collect DIR for the "
            "table of a launched sweep",
        )
    if launch is not None:
        if asked or resume or dry_run:
            raise LoratoolError(
                "--launch writes the cells' jobs; --eval, --resume and --dry-run apply to a sweep that trains "
                "here",
                hint="drop them; evaluate a finished cell with `loratool eval CELL_DIR`, and continue a "
                "stopped one by adding --resume to its train line",
            )
        from loratool.launch.sweep import Cluster, launch_sweep  # deferred: pydantic, yaml, the planner

        if gpus_per_node is None:
            start_libraries()  # the planner sizes each cell, as `loratool launch` does
        cluster = Cluster(nodes, gpus_per_node, gpu, time, partition, cpus_per_task, bucket, install)
        words = ["loratool", "sweep", str(recipe), *(w for v in vary for w in ("--vary", v))]
        words += [w for item in set_ or [] for w in ("--set", item)] + ["--launch", launch]
        words += [w for flag, value in cluster.given().items() for w in (flag, str(value))]
        launch_sweep(recipe, vary, launch, cluster, sets=set_ or [], output=output, overwrite=overwrite,
                     command=shlex.join(words), log=typer.echo)  # fmt: skip
        return
    if dry_run:
        start_libraries()
    run_sweep(
        recipe,
        vary,
        sets=set_ or [],
        output=output,
        overwrite=overwrite,
        resume=resume,
        evaluate=EvalOptions(eval_data, eval_max_samples, eval_max_new_tokens) if asked else None,
        dry_run=dry_run,
        log=typer.echo,
    )
