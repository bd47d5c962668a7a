"""A SkyPilot task YAML: SkyPilot provisions `num_nodes` machines with the GPUs, copies the working
directory to each, installs loratool in `setup` and runs torchrun on every node with the rank and
addresses it gives (SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS, SKYPILOT_NUM_NODES,
SKYPILOT_NUM_GPUS_PER_NODE) — SkyPilot's own distributed-training pattern (docs: running-jobs,
distributed-jobs)."""

from __future__ import annotations

from pathlib import Path

from loratool import __version__
from loratool.errors import LoratoolError
from loratool.launch.job import (
    MAIN_PORT,
    OUTPUTS_MOUNT,
    Expand,
    Job,
    header,
    shell_command,
    torchrun,
    train_args,
    yaml_text,
)

# loratool plan's GPU names that SkyPilot spells differently (its A100 is the 40 GB one); the others agree.
SKYPILOT_GPU_NAMES = {"A100-40GB": "A100"}
# Bucket URL schemes SkyPilot mounts (its storage `source`); a bare name is a bucket SkyPilot creates.
BUCKET_SCHEMES = ("s3://", "gs://", "r2://", "https://", "cos://", "oci://", "nebius://", "cw://")


def task_yaml(
    job: Job, *, bucket: str | None = None, install: str | None = None, bucket_dir: str | None = None
) -> str:
    """The SkyPilot task for `job`. `bucket`: a bucket name or URL mounted on every node at /outputs,
    where the run directory goes (at `bucket_dir`, default the job's name); `install`: what `setup`
    pip-installs (default loratool==VERSION)."""
    check_recipe_path(job.recipe)
    output_dir = None if bucket is None else f"{OUTPUTS_MOUNT}/{bucket_dir or job.name}"
    command = torchrun(
        Expand("$SKYPILOT_NUM_NODES"),
        Expand("$SKYPILOT_NUM_GPUS_PER_NODE"),
        [
            "--node-rank",
            Expand("$SKYPILOT_NODE_RANK"),
            "--master-addr",
            Expand("$MASTER_ADDR"),
            "--master-port",
            str(MAIN_PORT),
        ],
        train_args(job, output_dir),
    )
    run = (
        "# The first node's address is the rendezvous: SKYPILOT_NODE_IPS lists one address per line.\n"
        'MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)\n' + shell_command(command, indent="  ") + "\n"
    )
    task: dict = {
        "name": job.name,
        "num_nodes": job.nodes,
        "resources": {"accelerators": f"{SKYPILOT_GPU_NAMES.get(job.gpu, job.gpu)}:{job.gpus_per_node}"},
        "workdir": ".",
    }
    if bucket is not None:
        # MOUNT_CACHED: writes go to a local cache and upload in the background, which suits checkpoints
        # (SkyPilot's recommendation for training outputs); MOUNT writes through and is slower.
        where = {"source": bucket} if bucket.startswith(BUCKET_SCHEMES) else {"name": bucket}
        task["file_mounts"] = {OUTPUTS_MOUNT: {**where, "mode": "MOUNT_CACHED"}}
    task["setup"] = f"pip install {install or f'loratool=={__version__}'}\n"
    task["run"] = run
    where_outputs = (
        f"The run directory is written to {output_dir} on the bucket {bucket} (training.output_dir is "
        "moved there with --set), which every node mounts."
        if bucket
        else f"Without --bucket the run directory ({job.output_dir}) stays on the first node's disk, under "
        "~/sky_workdir: copy it off (`sky rsync-down`) before the cluster goes down, and --resume after a "
        "node is replaced cannot find the checkpoints. --bucket NAME keeps it on a bucket."
    )
    notes = (
        "Launch it with `sky launch -c NAME FILE` from the directory `loratool launch` ran in: workdir "
        "copies that directory to every node and run starts there, so the recipe, its data and "
        "training.output_dir resolve as they do here.",
        where_outputs,
        f"setup installs loratool {__version__} from PyPI; --install SPEC installs another (a git URL, "
        "or `-e .` when this directory is a loratool checkout).",
    )
    return header(job, *notes) + yaml_text(task)


def check_recipe_path(recipe: str) -> None:
    """Refuse a recipe outside this directory: SkyPilot copies only this directory to the nodes."""
    if Path(recipe).is_absolute() or ".." in Path(recipe).parts:
        raise LoratoolError(
            f"--target skypilot: the recipe {recipe} is outside this directory; SkyPilot copies this "
            "directory (workdir: .) to every node, and the job finds the recipe there",
            hint="run `loratool launch` from a directory that holds the recipe and its data, with the "
            "recipe's path relative to it",
        )
