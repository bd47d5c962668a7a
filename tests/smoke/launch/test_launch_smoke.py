"""The sbatch script's torchrun line, run for real: two torchrun agents on this machine stand in for two
SLURM nodes (SLURM's variables set as srun would set them, the c10d rendezvous on 127.0.0.1), each
starting one CPU process; together they must train one run and write one adapter. The torchrun script
runs the same way, as two machines with their NODE_RANK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from helpers.launch import torchrun_line
from helpers.multiprocess import free_port
from loratool.cli import app

AGENT_TIMEOUT = 240  # seconds; a hang (an agent waiting for one that died) fails instead of blocking CI


def start_node(command: str, cwd: Path, given: dict[str, str]) -> subprocess.Popen:
    env = {
        **os.environ,
        **given,  # what the cluster tool (or the user) sets on each node
        # the torchrun next to this python, and loratool from this checkout
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("LORATOOL_DEBUG", None)
    return subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout stops the agent and its workers
    )


def finish(node: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = node.communicate(timeout=AGENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        out, err = node.communicate()
        pytest.fail(f"a node did not finish in {AGENT_TIMEOUT} s:\n{out}\n{err}")
    return node.returncode, out + err


@pytest.fixture()
def recipe_here(tmp_path, monkeypatch, tiny_llama, smoke_data) -> Path:
    """A 3-step tiny recipe, tiny.yaml, in the working directory (the launch files name it so)."""
    monkeypatch.chdir(tmp_path)  # sbatch starts the script where it was submitted: here
    body = smoke_recipe(
        tiny_llama,
        smoke_data,
        "out/tiny",
        training={"max_steps": 3, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 100},
    )
    return write_recipe(tmp_path / "tiny.yaml", body)


def launch_file(*args: str) -> str:
    made = CliRunner().invoke(app, ["launch", "tiny.yaml", "--nodes", "2", "--gpus-per-node", "1", *args])
    assert made.exit_code == 0, made.output
    return made.stdout


def assert_one_run_of_two_processes(folder: Path, results: list[tuple[int, str]]) -> None:
    for code, output in results:
        assert code == 0, output
    record = json.loads((folder / "out" / "tiny" / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["world_size"] == 2  # one run across both nodes, not two runs of one process
    assert record["train"]["global_step"] == 3
    adapters = [p.relative_to(folder) for p in folder.rglob("adapter_model.safetensors")]
    assert [p for p in adapters if "checkpoints" not in p.parts] == [
        Path("out/tiny/adapter_model.safetensors")
    ]
    assert sum(output.count("done in") for _, output in results) == 1  # only the main process reports


def test_the_sbatch_torchrun_line_trains_one_run_on_two_nodes(recipe_here):
    command = torchrun_line(launch_file("--target", "slurm"))
    assert "--rdzv-backend c10d" in command and "--nproc-per-node 1" in command
    slurm = {
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "MASTER_ADDR": "127.0.0.1",  # what the script's scontrol line finds: the first node
        "MASTER_PORT": str(free_port()),
    }
    nodes = [start_node(command, recipe_here.parent, slurm) for _ in range(2)]
    assert_one_run_of_two_processes(recipe_here.parent, [finish(node) for node in nodes])


@pytest.mark.slow  # another minute of two agents: the same training through torchrun's static rendezvous
def test_the_torchrun_script_trains_one_run_on_two_machines(recipe_here):
    script = recipe_here.parent / "train.sh"
    script.write_text(launch_file("--target", "torchrun"))
    port = str(free_port())
    machines = [
        start_node(
            f"bash {script}",
            recipe_here.parent,
            {"NODE_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
        )
        for rank in ("0", "1")
    ]
    assert_one_run_of_two_processes(recipe_here.parent, [finish(machine) for machine in machines])
