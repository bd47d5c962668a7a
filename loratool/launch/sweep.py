"""`loratool sweep --launch slurm|skypilot`: a sweep's cells as cluster jobs instead of trainings in turn.

The grid is planned and every cell's recipe validated as for a sweep that trains here (train/sweep.py);
then, instead of training, the sweep directory gets the files that train the cells on the cluster and a
sweep.json whose status is `launched`:

- slurm: `sweep.sbatch`, one job array whose task N trains cell N (each task on --nodes nodes, as
  `loratool launch` describes one run), every cell writing its run directory into the sweep directory on
  the shared file system;
- skypilot: `<cell>.sky.yaml`, one task per cell, its run directory on the mounted bucket (--bucket) or
  inside the working directory SkyPilot copies.

`loratool sweep --collect DIR` builds the table from the cells' run directories whenever the user asks,
marking those that failed, still run, or have not started.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from loratool.errors import LoratoolError
from loratool.launch import write_launch_file
from loratool.launch.job import Job, job_for
from loratool.launch.skypilot import check_recipe_path, task_yaml
from loratool.launch.slurm import Array, sbatch_script
from loratool.rundir.outputs import command_line, output_lock
from loratool.train.sweep import RECORD, Cell, claim_sweep_dir, new_record, plan_sweep, row, write_record

TARGETS = ("slurm", "skypilot")
SBATCH = "sweep.sbatch"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where each cell trains, as `loratool launch` takes it: nodes, GPUs and each target's own options."""

    nodes: int = 1
    gpus_per_node: int | None = None  # None: sized by `loratool plan` for each cell
    gpu: str | None = None
    time: str | None = None  # slurm
    partition: str | None = None  # slurm
    cpus_per_task: int | None = None  # slurm
    bucket: str | None = None  # skypilot
    install: str | None = None  # skypilot

    def given(self) -> dict[str, object]:
        """The options as the command line gave them (those left at their default omitted)."""
        flags = {f.name: f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(self)}
        return {
            flags[k]: v
            for k, v in dataclasses.asdict(self).items()
            if v is not None and (k, v) != ("nodes", 1)
        }


def launch_sweep(
    recipe_path: str | Path,
    vary: list[str],
    target: str,
    cluster: Cluster,
    *,
    sets: list[str] | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
) -> Path:
    """Write the sweep directory's launch files and sweep.json (status launched); return the directory."""
    if target not in TARGETS:
        raise LoratoolError(
            f"--launch {target!r}: a sweep launches on slurm (a job array) or skypilot (a task per cell)",
            hint="for Kubeflow or torchrun, write each run's file with `loratool launch RECIPE --set ...`",
        )
    recipe_path, sets = Path(recipe_path), list(sets or [])
    if target == "skypilot":
        check_recipe_path(str(recipe_path))
    axes, cells, sweep_dir = plan_sweep(recipe_path, vary, sets, output, log)
    jobs = [cell_job(cell, recipe_path, sets, target, cluster, sweep_dir, command) for cell in cells]
    if target == "slurm":
        files = {SBATCH: array_script(jobs, cells, sweep_dir, cluster)}
    else:
        files = {
            f"{cell.name}.sky.yaml": task_yaml(
                job,
                bucket=cluster.bucket,
                install=cluster.install,
                bucket_dir=f"{sweep_dir.name}/{cell.name}",
            )
            for cell, job in zip(cells, jobs, strict=True)
        }
    with output_lock(sweep_dir, command_line(), log):
        claim_sweep_dir(sweep_dir, overwrite=overwrite, resume=False, log=log)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = new_record(recipe_path, axes, sets, None, status="launched")
        record["launch"] = {"target": target, "files": sorted(files), **dataclasses.asdict(cluster)}
        record["cells"] = [
            {**row(cell.name, cell.run_dir, cell.values(), None, False), "status": "not started"}
            for cell in cells
        ]
        write_record(sweep_dir, record, {RECORD})  # first: it marks the directory as a loratool sweep
        for name, text in files.items():
            write_launch_file(text, sweep_dir / name, overwrite=True)
        write_record(sweep_dir, record, {RECORD, *files})
    for line in next_steps(target, sweep_dir, files, jobs, cluster):
        log(line)
    return sweep_dir


def cell_job(
    cell: Cell,
    recipe_path: Path,
    sets: list[str],
    target: str,
    cluster: Cluster,
    sweep_dir: Path,
    command: str,
) -> Job:
    """The job that trains `cell`: the sweep's --set, then the cell's values and its run directory."""
    output_dir = str(cell.run_dir)
    if target == "skypilot" and cluster.bucket is None:
        # SkyPilot copies this directory to the nodes: the run directory must be inside it, as a relative path.
        relative = os.path.relpath(cell.run_dir, Path.cwd())
        if relative.startswith(".."):
            raise LoratoolError(
                f"--launch skypilot: the sweep directory {sweep_dir} is outside this directory, which is "
                "what SkyPilot copies to the nodes",
                hint="pass --bucket NAME (the run directories go to the bucket), or an --output inside "
                "this directory",
            )
        output_dir = relative
    cell_sets = [*sets, *(f"{key}={value}" for key, value in cell.settings)]
    if not (target == "skypilot" and cluster.bucket is not None):  # else the task moves it to the bucket
        cell_sets.append(f"training.output_dir={json.dumps(output_dir)}")
    job = job_for(recipe_path, cell.recipe, nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node,
                  gpu=cluster.gpu, command=command, sets=cell_sets)  # fmt: skip
    # The cluster's name for the job: the sweep's and the cell's, each as a cluster name may be spelled.
    name = f"{_safe(sweep_dir.name)}-{job.name}"[:63].strip("-.")
    return dataclasses.replace(job, name=name, output_dir=output_dir)


def array_script(jobs: list[Job], cells: list[Cell], sweep_dir: Path, cluster: Cluster) -> str:
    """One sbatch job array for every cell. Its tasks share one set of #SBATCH lines, so they get the GPUs
    the hungriest cell needs (when `loratool plan` sized them)."""
    hungriest = max(jobs, key=lambda job: job.gpus_per_node)
    shared = dataclasses.replace(hungriest, name=_safe(sweep_dir.name), sets=())
    array = Array(cells=tuple((cell.name, job.sets) for cell, job in zip(cells, jobs, strict=True)),
                  log_dir=str(sweep_dir))  # fmt: skip
    return sbatch_script(
        shared,
        time=cluster.time,
        partition=cluster.partition,
        cpus_per_task=cluster.cpus_per_task,
        array=array,
    )


def next_steps(
    target: str, sweep_dir: Path, files: dict[str, str], jobs: list[Job], cluster: Cluster
) -> list[str]:
    """What the user runs next, printed after the files are written."""
    where = os.path.relpath(sweep_dir, Path.cwd())
    where = where if not where.startswith("..") else str(sweep_dir)
    if target == "slurm":
        lines = [
            f"wrote {where}/{SBATCH}: a job array of {len(jobs)} tasks ({cluster.nodes} node(s) x "
            f"{max(job.gpus_per_node for job in jobs)} GPU(s) each)",
            f"submit it from this directory: sbatch {shlex.quote(f'{where}/{SBATCH}')}",
        ]
    else:
        lines = [f"wrote {len(files)} SkyPilot tasks in {where}; launch each from this directory:"]
        lines += [
            f"  sky jobs launch -n {job.name} {shlex.quote(f'{where}/{name}')}"
            for name, job in zip(files, jobs, strict=True)
        ]
        if cluster.bucket is not None:
            lines.append(
                f"the run directories go to the bucket {cluster.bucket}, under {sweep_dir.name}/: copy them "
                f"into {where} before collecting"
            )
    lines.append(f"then, as the cells finish: loratool sweep --collect {shlex.quote(where)}")
    return lines


def _safe(name: str) -> str:
    """A name as clusters take it (SLURM job names, SkyPilot task names): letters, digits, - _ and ."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "sweep"
