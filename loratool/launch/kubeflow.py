"""A Kubeflow PyTorchJob (kubeflow.org/v1, Training Operator v1): one Master pod and nodes - 1 Worker
pods, each running torchrun with what the operator puts in every pod's environment — PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, MASTER_ADDR and MASTER_PORT (the Master pod's service) — and a
volume claim mounted at /outputs for the run directory.

PyTorchJob rather than Trainer v2's TrainJob: a TrainJob runs through a ClusterTrainingRuntime that
the cluster's admin defines, so its pods' shape is not the manifest's to say; a PyTorchJob says all of
it, and its CRD's published schema checks the whole manifest (tests/data/launch)."""

from __future__ import annotations

import re

from loratool.errors import LoratoolError
from loratool.launch.job import OUTPUTS_MOUNT, Job, header, torchrun, train_args, yaml_text

# The container and port names the operator looks for (pkg/apis/kubeflow.org/v1/pytorch_types.go):
# MASTER_PORT is read from this port of the Master's "pytorch" container.
CONTAINER = "pytorch"
PORT_NAME, PORT = "pytorchjob-port", 23456


def pytorchjob_yaml(job: Job, *, image: str | None, volume_claim: str | None) -> str:
    """The PyTorchJob manifest for `job`, its pods running `image` with `volume_claim` at /outputs."""
    check_options(image, volume_claim)
    assert image and volume_claim
    output_dir = f"{OUTPUTS_MOUNT}/{job.name}"
    # Kubernetes expands $(NAME) in a container's command from its environment: no shell is needed.
    command = torchrun(
        "$(PET_NNODES)",
        "$(PET_NPROC_PER_NODE)",
        [
            "--node-rank",
            "$(PET_NODE_RANK)",
            "--master-addr",
            "$(MASTER_ADDR)",
            "--master-port",
            "$(MASTER_PORT)",
        ],
        train_args(job, output_dir),
    )
    pod = {
        "spec": {
            "containers": [
                {
                    "name": CONTAINER,
                    "image": image,
                    "command": command,
                    "ports": [{"name": PORT_NAME, "containerPort": PORT}],
                    "resources": {"limits": {"nvidia.com/gpu": job.gpus_per_node}},
                    "volumeMounts": [
                        {"name": "outputs", "mountPath": OUTPUTS_MOUNT},
                        {"name": "shm", "mountPath": "/dev/shm"},
                    ],
                }
            ],
            "volumes": [
                {"name": "outputs", "persistentVolumeClaim": {"claimName": volume_claim}},
                # A container's /dev/shm is 64 MiB; NCCL and the data loader's workers need more.
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
        }
    }
    # Never: a pod started again would run `loratool train` on its own unfinished run directory, which
    # it refuses (continuing takes --resume); the job fails instead, and says so.
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": pod}}
    if job.nodes > 1:
        replicas["Worker"] = {"replicas": job.nodes - 1, "restartPolicy": "Never", "template": pod}
    manifest = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": kubernetes_name(job.name)},
        "spec": {"nprocPerNode": str(job.gpus_per_node), "pytorchReplicaSpecs": replicas},
    }
    notes = (
        "Apply it with `kubectl apply -f FILE` (the Kubeflow Training Operator, v1, must run in the "
        "cluster). Each pod starts in the image's working directory, where the recipe path "
        f"{job.recipe} and its data must resolve: build the image from the directory `loratool launch` "
        "ran in.",
        f"The run directory is written to {output_dir} on the volume claim {volume_claim} "
        "(training.output_dir is moved there with --set).",
        "A job that stopped early continues from its last complete checkpoint when `--resume` is "
        "added to the command below and it is applied again (after `kubectl delete` of the old one) with "
        "the same nodes and GPUs; `loratool train --resume` refuses a run without a checkpoint, so it is "
        "not there from the start.",
    )
    return header(job, *notes) + yaml_text(manifest)


def check_options(image: str | None, volume_claim: str | None) -> None:
    """Refuse a missing --image or --volume-claim (before the run is sized, which takes a while)."""
    if not image:
        raise LoratoolError(
            "--target kubeflow needs --image: the container image every pod runs",
            hint="build one with loratool installed and this directory (the recipe and its data) as its "
            "working directory, push it, and pass --image REGISTRY/NAME:TAG",
        )
    if not volume_claim:
        raise LoratoolError(
            "--target kubeflow needs --volume-claim: a pod keeps nothing once it ends, so the run "
            "directory goes on a PersistentVolumeClaim",
            hint="create a PersistentVolumeClaim (ReadWriteMany when --nodes is over 1: every pod "
            "reads the checkpoints on --resume) and pass its name with --volume-claim NAME",
        )


def kubernetes_name(name: str) -> str:
    """A valid object name (RFC 1123 label: lowercase letters, digits and '-'), short enough that the
    operator's pod and service names (NAME-worker-12) stay within 63 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].rstrip("-")
    return label or "loratool"
