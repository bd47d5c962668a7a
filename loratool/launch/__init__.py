"""`loratool launch`: the files that cluster tools run to train a recipe on several machines — an sbatch
script (SLURM), a SkyPilot task, a Kubeflow PyTorchJob, or a torchrun script for machines of your own.

loratool schedules and launches nothing itself: SLURM, SkyPilot or Kubernetes place the nodes, torchrun
starts the processes on each and joins them, and every process runs `loratool train RECIPE`, which
already trains as one run across processes (train/processes.py). One module per target, each a
function of the Job (job.py, with the torchrun command they share)."""

from __future__ import annotations

import os
from pathlib import Path

from loratool.errors import LoratoolError
from loratool.launch.job import Job, job_for
from loratool.launch.kubeflow import check_options, pytorchjob_yaml
from loratool.launch.skypilot import check_recipe_path, task_yaml
from loratool.launch.slurm import sbatch_script
from loratool.launch.torchrun import torchrun_script

TARGETS = ("slurm", "skypilot", "kubeflow", "torchrun")


def check_target(target: str, recipe: str, *, image: str | None, volume_claim: str | None) -> None:
    """Refuse what `target` cannot work with before the run is sized (sizing loads the planner)."""
    if target not in TARGETS:
        raise LoratoolError(f"--target {target!r}: unknown target", hint=f"one of {', '.join(TARGETS)}")
    if target == "skypilot":
        check_recipe_path(recipe)
    if target == "kubeflow":
        check_options(image, volume_claim)


def launch_file(
    job: Job,
    target: str,
    *,
    time: str | None = None,
    partition: str | None = None,
    cpus_per_task: int | None = None,
    bucket: str | None = None,
    install: str | None = None,
    image: str | None = None,
    volume_claim: str | None = None,
) -> str:
    """The text of `target`'s launch file for `job`; each target takes only its own options."""
    if target == "slurm":
        return sbatch_script(job, time=time, partition=partition, cpus_per_task=cpus_per_task)
    if target == "skypilot":
        return task_yaml(job, bucket=bucket, install=install)
    if target == "kubeflow":
        return pytorchjob_yaml(job, image=image, volume_claim=volume_claim)
    if target == "torchrun":
        return torchrun_script(job)
    raise LoratoolError(f"--target {target!r}: unknown target", hint=f"one of {', '.join(TARGETS)}")


def write_launch_file(text: str, path: Path, *, overwrite: bool) -> None:
    """Write `text` to `path`, refusing to replace a file unless `overwrite`; written whole or not at all
    (a temporary file beside it, renamed into place)."""
    if path.is_dir():
        raise LoratoolError(f"--output {path} is a directory", hint="give a file name, e.g. train.sbatch")
    if path.exists() and not overwrite:
        raise LoratoolError(f"--output {path} already exists", hint="pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise LoratoolError(
            f"--output {path}: the directory {path.parent} does not exist", hint="create it first"
        )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["TARGETS", "Job", "check_target", "job_for", "launch_file", "write_launch_file"]
