"""model/threads.py: the CPU threads a process computes with, from how busy its cores are at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratool.model import threads
from loratool.train.plan import cpu_assumption

REPO = Path(__file__).resolve().parents[3]


def choice(busy, cores=2, **env):
    return threads.choose(dict(env), cores=cores, measure=lambda: busy)


def test_on_free_cores_nothing_changes():
    picked = choice(0.2)
    assert picked.threads is None and not picked.contended
    env: dict[str, str] = {}
    threads.apply(picked, env)
    assert env == {}  # torch's own default: a thread per core, spinning waits


@pytest.mark.parametrize(
    ("busy", "cores", "expected"),
    [(1.0, 2, 1), (0.6, 2, 1), (1.9, 2, 1), (3.0, 2, 1), (4.2, 16, 12), (0.5, 16, 15), (1.2, 4, 3)],
)
def test_busy_cores_are_left_to_the_processes_that_use_them(busy, cores, expected):
    picked = choice(busy, cores=cores)
    assert picked.threads == expected and picked.contended
    env: dict[str, str] = {}
    threads.apply(picked, env)
    assert env == {
        "OMP_NUM_THREADS": str(expected),
        "MKL_NUM_THREADS": str(expected),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    assert picked.describe().startswith(f"CPU threads: {expected} of {cores} cores (other processes keep")


def test_the_users_setting_wins_and_is_not_touched():
    picked = choice(1.5, OMP_NUM_THREADS="2")  # torchrun sets 1 for several processes per machine
    assert picked.threads == 2 and not picked.contended
    assert "OMP_NUM_THREADS=2 set in the environment" in picked.describe()
    env = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}
    threads.apply(picked, env)
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}


def test_a_users_wait_policy_is_kept_when_threads_are_cut():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.apply(choice(1.0), env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and env["OMP_NUM_THREADS"] == "1"


def test_unmeasurable_load_leaves_the_default():
    picked = choice(None)
    assert picked.threads is None and "not measurable" in picked.describe()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat")
def test_busy_cores_sees_a_spinning_process_on_the_same_core():
    core = sorted(os.sched_getaffinity(0))[0]
    spinner = subprocess.Popen(
        ["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"]
    ) if _has_taskset() else None  # fmt: skip
    if spinner is None:
        pytest.skip("needs taskset")
    try:
        time.sleep(0.3)
        # only the spinner's core, so whatever else this machine runs on other cores does not count
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {core})
        try:
            busy = threads.busy_cores(0.3)
        finally:
            os.sched_setaffinity(0, before)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy > 0.7


def _has_taskset() -> bool:
    return subprocess.run(["which", "taskset"], capture_output=True).returncode == 0


def test_plan_states_what_its_cpu_time_assumes():
    line = cpu_assumption(1, 2, 1.0)
    assert line.startswith("1 CPU thread on 2 cores, 1.0 of them busy with other processes now")
    assert "in proportion" in line
