"""An sbatch script: SLURM allocates the nodes, `srun` starts one torchrun agent on each, and torchrun's
c10d rendezvous on the first node joins them — PyTorch's own torchrun-on-SLURM pattern
(pytorch/examples, distributed/ddp-tutorial-series/slurm/sbatch_run.sh)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from loratool.launch.job import MAIN_PORT, Expand, Job, header, shell_command, torchrun, train_args

# CPU cores per GPU when --cpus-per-task is not given: the data loader, tokenization and the process itself.
CPUS_PER_GPU = 8


@dataclass(frozen=True)
class Array:
    """A job array: one task per sweep cell, each training the recipe with its own --set arguments."""

    cells: tuple[tuple[str, tuple[str, ...]], ...]  # (cell name, its --set items), in task-id order
    log_dir: str  # where SLURM writes each task's output (it must exist when the task starts)


def sbatch_script(
    job: Job,
    *,
    time: str | None = None,
    partition: str | None = None,
    cpus_per_task: int | None = None,
    array: Array | None = None,
) -> str:
    """The sbatch script for `job`; `time` is SLURM's --time (e.g. 12:00:00), `partition` its --partition;
    with `array`, a job array whose task N trains cell N (`loratool sweep --launch slurm`)."""
    options = {
        "job-name": job.name,
        "nodes": job.nodes,
        "ntasks-per-node": 1,  # one torchrun agent per node; it starts the training processes
        "gpus-per-node": job.gpus_per_node,
        "cpus-per-task": cpus_per_task or CPUS_PER_GPU * job.gpus_per_node,
        "time": time,
        "partition": partition,
    }
    if array is not None:
        options["array"] = f"0-{len(array.cells) - 1}"
        options["output"] = f"{array.log_dir}/slurm-%A_%a.out"  # %A the array's job id, %a the task's
    train = train_args(job) + ([Expand("${CELL[@]}")] if array is not None else [])
    command = torchrun(
        Expand("$SLURM_NNODES"),
        str(job.gpus_per_node),
        [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            Expand("$MASTER_ADDR:$MASTER_PORT"),
            "--rdzv-id",
            Expand("$SLURM_JOB_ID"),
        ],
        train,
    )
    notes = (
        "Submit it with `sbatch FILE` from the directory `loratool launch` ran in, in the environment "
        "where loratool is installed (sbatch passes it on): SLURM starts the script there, and the recipe "
        f"path and training.output_dir ({job.output_dir}) are relative to it. Every node must see that "
        "directory, the base model and the data: a shared file system.",
        "A job that stopped early (preempted, out of time) continues from its last complete checkpoint "
        "when `--resume` is added to the train line below and it is submitted again with the same nodes "
        "and GPUs. It is not there from the start: `loratool train --resume` refuses a run without a "
        "checkpoint.",
    )
    if array is not None:
        notes = (
            f"One array task per sweep cell ({len(array.cells)}): submit it with `sbatch FILE` from the "
            "directory `loratool sweep` ran in, in the environment where loratool is installed. Each task "
            "writes its cell's run directory; `loratool sweep --collect DIR` builds the table from them, "
            "as far as they got. Every node must see the sweep directory, the base model and the data.",
            "A task that stopped early continues from its last complete checkpoint when `--resume` is "
            "added to the train line and that task is submitted again (`sbatch --array=N FILE`).",
        )
    sbatch = "".join(f"#SBATCH --{key}={value}\n" for key, value in options.items() if value is not None)
    port = f"{MAIN_PORT}"
    if array is not None:
        # Array tasks may share a first node: each rendezvous gets a port of its own.
        port = f"$(({MAIN_PORT} + SLURM_ARRAY_TASK_ID % 1000))"
    return (
        "#!/bin/bash\n"
        + header(job, *notes)
        + sbatch
        + "\n"
        + (cell_table(array) if array is not None else "")
        + "# The first node hosts the rendezvous; the port must be free there.\n"
        + 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        + f"MASTER_PORT={port}\n"
        + "export MASTER_ADDR MASTER_PORT\n"
        + "\n"
        + "# --kill-on-bad-exit: a node whose training fails stops the others instead of leaving them waiting.\n"
        + "srun --kill-on-bad-exit=1 "
        + shell_command(command)
        + "\n"
    )


def cell_table(array: Array) -> str:
    """The shell that picks this array task's cell: its --set arguments in the bash array CELL."""
    lines = [
        "# This task's cell: its --set arguments (task N trains cell N).",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for number, (name, sets) in enumerate(array.cells):
        words = " ".join(f"--set {shlex.quote(item)}" for item in sets)
        lines.append(f"  {number}) CELL=({words}) ;;  # {name}")
    lines += ['  *) echo "no sweep cell for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac", "", ""]
    return "\n".join(lines)
