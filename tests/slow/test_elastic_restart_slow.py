"""Under `torchrun --max-restarts`, a rank killed mid-run makes torchrun restart the group, and the restarted
attempt continues the run from its last complete checkpoint on its own (no `--resume` typed): it ends with
the adapter an uninterrupted run of the same launch gives, and run.json shows the restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, smoke_recipe, write_recipe
from helpers.multiprocess import finish_group, launch_env
from loratool.rundir.records import CHECKPOINT_SEAL

LAUNCH_TIMEOUT = 300  # seconds; a hang fails the test instead of blocking CI
STEPS, SAVE_EVERY = 30, 3


def launch(recipe: Path, output: Path, *extra: str) -> subprocess.Popen:
    env = launch_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *extra,
               "-m", "loratool", "train", str(recipe), "--set", f"training.output_dir={output}"]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def worker_of_rank(agent: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process torchrun started with RANK=`rank`."""
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "loratool" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


@pytest.mark.slow  # two launches of two CPU processes: about a minute on 2 cores
def test_a_killed_rank_restarts_the_group_and_the_run_resumes_to_the_same_adapter(tmp_path, tiny_llama):
    body = smoke_recipe(
        tiny_llama,
        REPO / "recipes" / "data" / "smoke.jsonl",
        tmp_path / "unused",
        training={"max_steps": STEPS, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                  "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": SAVE_EVERY},
    )  # fmt: skip
    recipe = write_recipe(tmp_path / "recipe.yaml", body)

    straight = tmp_path / "straight"
    code, out = finish_group(launch(recipe, straight), LAUNCH_TIMEOUT)
    assert code == 0, out

    restarted = tmp_path / "restarted"
    agent = launch(recipe, restarted, "--max-restarts", "1")
    seal = restarted / "checkpoints" / f"checkpoint-{2 * SAVE_EVERY}" / CHECKPOINT_SEAL
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not seal.is_file():
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0]
        time.sleep(0.05)
    worker_of_rank(agent, 1).kill()  # a node lost mid-run: SIGKILL, no chance to clean up
    code, out = finish_group(agent, LAUNCH_TIMEOUT)
    assert code == 0, out
    assert (
        "torchrun restarted this launch (attempt 2): continuing its run from the last complete checkpoint"
        in out
    )

    record = json.loads((restarted / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["launch"]["restart"] == 1 and record["launch"]["max_restarts"] == 1
    (resumed,) = record["resumes"]
    assert resumed["elastic_restart"] == 1 and resumed["step"] >= 2 * SAVE_EVERY
    assert record["train"]["global_step"] == STEPS

    got = load_file(restarted / "adapter_model.safetensors")
    expected = load_file(straight / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    print(f"restarted after a killed rank vs uninterrupted: adapter max |Δ| {worst:.2e}")
    assert worst <= 1e-6, f"max |Δ| {worst:.2e} between the restarted and the uninterrupted adapter"
    assert any(not torch.equal(got[k], torch.zeros_like(got[k])) for k in got)  # it trained
