"""Restarts under `torchrun --max-restarts N`: torchrun starts every process of the launch again after one
fails, with TORCHELASTIC_RESTART_COUNT counting the attempts. loratool makes such an attempt continue the
run its launch left, from the last complete checkpoint (`elastic_restart`, the train command acts on it),
records the launch and the attempt in run.json, and joins each attempt's process group through keys of its
own (`join_group`).

Why the last: torchrun keeps one store for the whole launch, and torch's env:// rendezvous puts the same
keys in it at every attempt. An attempt could then read the address a dead process of the attempt before
published, and fail to connect ("Gloo connectFullMesh failed ... Connection refused", seen here after a
killed rank), or wait on it until the timeout. A prefix per attempt keeps each attempt's keys apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from loratool.rundir.records import RunDir, read_run


def elastic_launch(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """run.json's `launch`: torchrun's run id (its --rdzv-id), which attempt this is (0 the first, 1 after
    one failure, ...) and how many restarts it allows; None outside torchrun."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    return {
        "launcher": "torchrun",
        "run_id": env["TORCHELASTIC_RUN_ID"],
        "restart": _int(env.get("TORCHELASTIC_RESTART_COUNT")),
        "max_restarts": _int(env.get("TORCHELASTIC_MAX_RESTARTS")),
    }


def elastic_restart(output: Path, env: Mapping[str, str] | None = None) -> str | None:
    """What an attempt after a failure under `torchrun --max-restarts` does with the run it finds:
    "resume" its own unfinished run from the last complete checkpoint, "overwrite" its own run that died
    before its first checkpoint, or None (a first attempt, a finished run, a run of another launch: the
    usual rules). A run is this launch's own when run.json names the same torchrun run id; torchrun's
    default id for a fixed --master-addr, "none", names no launch, so such restarts are not continued."""
    launch = elastic_launch(env)
    if launch is None or not launch["restart"] or launch["run_id"] in ("", "none"):
        return None
    record = read_run(output)
    if record is None or record.complete or (record.launch or {}).get("run_id") != launch["run_id"]:
        return None
    checkpoint, _ = RunDir(output).latest_checkpoint()
    return "resume" if checkpoint is not None else "overwrite"


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def join_group(backend: str, timeout: timedelta, env: Mapping[str, str] | None = None) -> bool:
    """Under torchrun, start the default process group through this attempt's own keys of the launch's
    store (module docstring); accelerate then uses the group as it is. False (nothing done) outside
    torchrun or when a group already exists."""
    import torch.distributed as dist

    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env or dist.is_initialized():
        return False
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    # With the agent's store (torchrun's default) every process is a client; else rank 0 hosts it.
    hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=hosts, timeout=timeout,
                          multi_tenant=True)  # fmt: skip
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"loratool/attempt-{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)  # fmt: skip
    return True
