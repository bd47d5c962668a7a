"""A shell script of the torchrun command for machines of your own: the same script on every machine,
which says its rank (NODE_RANK) and the main machine's address (MASTER_ADDR) in its environment —
torchrun's static rendezvous, as in PyTorch's multi-node docs."""

from __future__ import annotations

from loratool.launch.job import MAIN_PORT, Expand, Job, header, shell_command, torchrun, train_args


def torchrun_script(job: Job) -> str:
    """The script each of `job.nodes` machines runs (one machine: torchrun --standalone)."""
    if job.nodes == 1:
        command = torchrun("1", str(job.gpus_per_node), ["--standalone"], train_args(job))
        notes = (
            "Run it with `bash FILE` from the directory `loratool launch` ran in: the recipe path and "
            f"training.output_dir ({job.output_dir}) are relative to it.",
        )
    else:
        last = job.nodes - 1
        others = "1 on the other" if last == 1 else f"1 to {last} on the others"
        rendezvous: list = [
            "--node-rank",
            Expand(f"${{NODE_RANK:?set NODE_RANK: 0 on the main machine, {others}}}"),
            "--master-addr",
            Expand("${MASTER_ADDR:?set MASTER_ADDR to the address of the main machine}"),
            "--master-port",
            Expand(f"${{MASTER_PORT:-{MAIN_PORT}}}"),
        ]
        command = torchrun(str(job.nodes), str(job.gpus_per_node), rendezvous, train_args(job))
        notes = (
            f"Run it on each of the {job.nodes} machines, from the same directory as here (the recipe path "
            f"and training.output_dir, {job.output_dir}, are relative to it): NODE_RANK=0 on the main "
            f"machine, {others}, and the main machine's address in MASTER_ADDR, e.g. "
            "`NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash FILE`. MASTER_PORT (default "
            f"{MAIN_PORT}) must be free on the main machine.",
            "training.output_dir must be on storage every machine sees: --resume reads the checkpoints on "
            "every machine. Continue a run that stopped early by adding --resume to the train line (same "
            "machines and GPUs); a first run must not have it, since `loratool train --resume` refuses a "
            "run without a checkpoint.",
        )
    return "#!/bin/bash\n" + header(job, *notes) + shell_command(command) + "\n"
