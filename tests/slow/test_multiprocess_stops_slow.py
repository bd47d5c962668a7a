"""A process of a multi-process run that hangs or fails stops the others within training.ddp_timeout, with
one line naming it and why; the run stays resumable and nothing looks finished (issues 23 and 24).

Two CPU processes (gloo) on a tiny model, through torchrun on 127.0.0.1: one of them stopped with SIGSTOP
mid-training; two "machines" (two torchrun agents, c10d rendezvous) of which one lacks the data file; and
two machines of which one loses its process to SIGKILL.
The limit is set small here (15 s); every wait of the test is bounded, so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, smoke_recipe, write_recipe
from helpers.multiprocess import free_port, launch_env
from loratool.rundir.records import RunDir

# Each launch loads torch and the tiny model in two processes: about a minute on 2 busy CPU cores.
slow = pytest.mark.slow

LIMIT_S = 15  # training.ddp_timeout in these runs
BOUND_S = LIMIT_S + 60  # generous: what it proves is "not transformers' 30 minutes"
START_S = 300  # at most, for the processes to load and train their first steps


def torchrun(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`torchrun ARGS`, its output (both streams) into `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *args],
            cwd=cwd,
            env=launch_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_until(condition, seconds: float, what: str) -> float:
    """Poll `condition` until true; the seconds it took. Fails after `seconds`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def worker(agent: subprocess.Popen, rank: int) -> psutil.Process:
    """The process torchrun started for `rank`."""
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    pytest.fail(f"torchrun has no process of rank {rank}")


def leave_nothing(*agents: subprocess.Popen) -> None:
    """Kill every process the agents started (a stopped one too), then the agents if they do not exit:
    the test leaves nothing behind."""
    for agent in agents:
        try:
            workers = psutil.Process(agent.pid).children(recursive=True)
        except psutil.Error:
            workers = []
        for proc in workers:
            try:
                proc.kill()  # SIGKILL ends a stopped process too
            except psutil.Error:
                pass
    for agent in agents:
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def errors(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("error:")]


def stepped(run: Path, step: int) -> bool:
    metrics = run / "metrics.jsonl"
    if not metrics.exists() or not (run / "checkpoints" / "checkpoint-2").exists():
        return False
    return any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line)


def stepped_once(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.exists() and any('"loss"' in line for line in metrics.read_text().splitlines())


@slow
def test_a_stopped_rank_stops_the_other_within_the_limit(tmp_path, tiny_llama):
    run = tmp_path / "run"
    body = smoke_recipe(
        tiny_llama,
        REPO / "recipes" / "data" / "smoke.jsonl",
        run,
        training={
            "max_steps": 100000,  # never reached: rank 1 is stopped after a few steps
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "save_steps": 2,
            "ddp_timeout": LIMIT_S,
        },
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", body)
    log = tmp_path / "torchrun.log"
    agent = torchrun(
        ["--standalone", "--nproc_per_node", "2", "-m", "loratool", "train", str(recipe)], REPO, log
    )
    try:
        wait_until(lambda: stepped(run, 3) or agent.poll() is not None, START_S, "3 training steps")
        assert agent.poll() is None, log.read_text()
        main, stopped = worker(agent, 0), worker(agent, 1)
        stopped.send_signal(signal.SIGSTOP)  # stopped, not dead: its sockets stay open, its beat stops
        took = wait_until(
            lambda: any("stopped answering" in line for line in errors(log)), BOUND_S, "rank 0 names rank 1"
        )
        main.wait(timeout=60)  # rank 0 exits by itself (torchrun would then kill the stopped one)
    finally:
        leave_nothing(agent)
    print(f"SIGSTOP of rank 1 -> rank 0 named it {took:.1f} s later (limit {LIMIT_S} s)")
    assert took <= BOUND_S, took
    text = log.read_text()
    assert re.search(rf"exitcode\s*:\s*1 \(pid: {main.pid}\)", text), text  # rank 0 failed, exit code 1
    named = [line for line in errors(log) if "stopped answering" in line]
    assert len(named) == 1, text
    assert re.fullmatch(
        rf"error: rank 1 \(host .+, pid {stopped.pid}\) stopped answering \d+ s ago \(no heartbeat\); "
        "stopping this rank too",
        named[0],
    ), named[0]
    assert f'File "{REPO / "loratool"}' not in text  # no traceback from loratool (torchrun prints its own)
    # Nothing looks finished, and --resume continues from the last checkpoint.
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "failed"
    assert "rank 1" in manifest["error"] and "stopped answering" in manifest["error"]
    assert not (run / "adapter_model.safetensors").exists()
    checkpoint, _ = RunDir.prepare(run, resume=True, dry_run=True, log=lambda _: None).latest_checkpoint()
    assert checkpoint is not None and int(checkpoint.name.split("-")[-1]) >= 2


@slow
def test_a_rank_that_fails_at_start_up_stops_the_other(tmp_path, tiny_llama):
    # Two "machines", each a torchrun agent in its own directory; the recipe's data path is relative to
    # the recipe, and the file is there on one machine only. Which one becomes rank 0 is the rendezvous's
    # choice: either way the healthy one must name the other.
    port = free_port()
    machines = {name: tmp_path / name for name in ("with-data", "without-data")}
    for folder in machines.values():
        folder.mkdir()
        # One output directory both see (as on a shared file system): only the data differs.
        body = smoke_recipe(tiny_llama, "train.jsonl", tmp_path / "out", training={"ddp_timeout": LIMIT_S})
        write_recipe(folder / "recipe.yaml", body)
    (machines["with-data"] / "train.jsonl").write_bytes(
        (REPO / "recipes" / "data" / "smoke.jsonl").read_bytes()
    )
    args = [
        "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "startup-failure",
        "-m", "loratool", "train", "recipe.yaml",
    ]  # fmt: skip
    logs = {name: folder / "torchrun.log" for name, folder in machines.items()}
    agents = {name: torchrun(args, folder, logs[name]) for name, folder in machines.items()}
    try:
        wait_until(
            lambda: agents["without-data"].poll() is not None, START_S, "the machine without data fails"
        )
        took = wait_until(lambda: agents["with-data"].poll() is not None, BOUND_S, "the other one stops")
    finally:
        leave_nothing(*agents.values())
    assert took <= BOUND_S
    assert agents["without-data"].returncode != 0
    assert any("data source not found" in line for line in errors(logs["without-data"])), logs[
        "without-data"
    ].read_text()
    assert agents["with-data"].returncode != 0
    named = [line for line in errors(logs["with-data"]) if "failed:" in line]
    assert len(named) == 1, logs["with-data"].read_text()
    assert re.fullmatch(
        r"error: rank [01] \(host .+, pid \d+\) failed: .*data source not found.*train\.jsonl.*; "
        "stopping this rank too",
        named[0],
    ), named[0]
    # Nothing was started: the main process waits for every process's checks before it writes a run.
    assert not (tmp_path / "out" / "run.json").exists()


@slow
def test_machines_that_do_not_share_the_output_directory_are_refused(tmp_path, tiny_llama):
    # Two "machines" in their own directories with a relative output_dir: each would write its own copy.
    port = free_port()
    machines = [tmp_path / name for name in ("a", "b")]
    for folder in machines:
        folder.mkdir()
        body = smoke_recipe(tiny_llama, REPO / "recipes" / "data" / "smoke.jsonl", "out",
                            training={"ddp_timeout": LIMIT_S})  # fmt: skip
        write_recipe(folder / "recipe.yaml", body)
    args = [
        "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "not-shared",
        "-m", "loratool", "train", "recipe.yaml",
    ]  # fmt: skip
    logs = [folder / "torchrun.log" for folder in machines]
    agents = [torchrun(args, folder, log) for folder, log in zip(machines, logs, strict=True)]
    try:
        for agent in agents:
            wait_until(lambda agent=agent: agent.poll() is not None, START_S + BOUND_S, "both machines stop")
    finally:
        leave_nothing(*agents)
    assert [agent.returncode != 0 for agent in agents] == [True, True]
    lines = [line for log in logs for line in errors(log)]
    refused = [line for line in lines if "does not see the output directory the main process writes" in line]
    assert refused, "\n".join(lines)
    assert re.search(
        r"rank 1 on .+ does not see the output directory .*lock file .* is missing here", refused[0]
    )
    assert not any((folder / "out" / "run.json").exists() for folder in machines)  # nothing was trained


@slow
def test_a_killed_rank_on_another_machine_is_named(tmp_path, tiny_llama):
    # Its own machine's torchrun reports a killed process; the other machine learns it from the silence
    # of its heartbeat. Static rendezvous: machine 0 (which keeps the store) is the one that survives.
    body = smoke_recipe(
        tiny_llama,
        REPO / "recipes" / "data" / "smoke.jsonl",
        tmp_path / "run",
        training={
            "max_steps": 100000,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "ddp_timeout": LIMIT_S,
        },
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", body)
    port = str(free_port())
    logs = [tmp_path / f"machine-{rank}.log" for rank in (0, 1)]
    agents = [
        torchrun(
            [
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv-backend",
                "static",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "--node-rank",
                str(rank),
                "-m",
                "loratool",
                "train",
                str(recipe),
            ],
            REPO,
            logs[rank],
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        wait_until(lambda: stepped_once(tmp_path / "run") or agents[0].poll() is not None, START_S, "a step")
        killed = worker(agents[1], 1)
        killed.kill()  # SIGKILL: no chance to say anything
        took = wait_until(lambda: agents[0].poll() is not None, BOUND_S, "machine 0 stops")
    finally:
        leave_nothing(*agents)
    print(f"SIGKILL of rank 1 on machine 1 -> machine 0 exited {took:.1f} s later (limit {LIMIT_S} s)")
    assert took <= BOUND_S
    assert agents[0].returncode != 0
    named = [line for line in errors(logs[0]) if line.startswith("error: rank 1 ")]
    assert len(named) == 1, logs[0].read_text()
    assert f"pid {killed.pid}) stopped answering" in named[0]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
