"""An sbatch script: SLURM allocates the nodes, `srun` starts one torchrun agent on each, and torchrun's
c10d rendezvous on the first node joins them — PyTorch's own torchrun-on-SLURM pattern
(pytorch/examples, distributed/ddp-tutorial-series/slurm/sbatch_run.sh)."""

from __future__ import annotations

from loratool.launch.job import MAIN_PORT, Expand, Job, header, shell_command, torchrun, train_args

# CPU cores per GPU when --cpus-per-task is not given: the data loader, tokenization and the process itself.
CPUS_PER_GPU = 8


def sbatch_script(
    job: Job, *, time: str | None = None, partition: str | None = None, cpus_per_task: int | None = None
) -> str:
    """The sbatch script for `job`; `time` is SLURM's --time (e.g. 12:00:00), `partition` its --partition."""
    options = {
        "job-name": job.name,
        "nodes": job.nodes,
        "ntasks-per-node": 1,  # one torchrun agent per node; it starts the training processes
        "gpus-per-node": job.gpus_per_node,
        "cpus-per-task": cpus_per_task or CPUS_PER_GPU * job.gpus_per_node,
        "time": time,
        "partition": partition,
    }
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
        train_args(job),
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
    sbatch = "".join(f"#SBATCH --{key}={value}\n" for key, value in options.items() if value is not None)
    return (
        "#!/bin/bash\n"
        + header(job, *notes)
        + sbatch
        + "\n"
        + "# The first node hosts the rendezvous; the port must be free there.\n"
        + 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        + f"MASTER_PORT={MAIN_PORT}\n"
        + "export MASTER_ADDR MASTER_PORT\n"
        + "\n"
        + "# --kill-on-bad-exit: a node whose training fails stops the others instead of leaving them waiting.\n"
        + "srun --kill-on-bad-exit=1 "
        + shell_command(command)
        + "\n"
    )
