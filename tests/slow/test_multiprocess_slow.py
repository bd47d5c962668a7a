"""Several processes on CPU (gloo), through the real launchers: `torchrun` and `accelerate
launch` (one machine, and two "machines" on localhost). They must give one run, equal to the one-process
run with the same global batch: per-step training loss, validation loss and adapter.

The runs are shared by the module: a one-process reference of 8 steps (batch 8), a two-process run of 6
steps (2 rows x 2 processes x 2 accumulation steps) under torchrun, and its resume to step 8 as two
machines. A constant learning rate makes 6 steps + 2 resumed steps the same training as 8 straight ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from helpers.multiprocess import CONFIGS, free_port, launch_env
from loratool.cli import app

# The launches take about a minute and a half on 2 free CPU cores: marked slow, which `make test` runs.
slow = pytest.mark.slow

LAUNCH_TIMEOUT = 300  # seconds; a hang (a process waiting for one that died) fails instead of blocking CI


STEPS, FIRST_PART = 8, 6


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "loratool", *args],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )


def accelerate_launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", *args],
        cwd=REPO,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    return proc.returncode, out, err


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows(run) if key in r}


def record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def loratool_lines(text: str) -> list[str]:
    """What loratool printed, without the launchers' own lines (torchrun's W... warnings, accelerate's
    defaults notice)."""
    return [line for line in text.splitlines() if line.startswith(("step ", "done in", "adapter ", "data:"))]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_llama) -> Path:
    folder = tmp_path_factory.mktemp("multiprocess")
    body = smoke_recipe(
        tiny_llama,
        REPO / "recipes" / "data" / "smoke.jsonl",
        folder / "two",
        data={"validation": 0.1},
        training={
            "max_steps": FIRST_PART,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "per_device_eval_batch_size": 4,  # 26 validation rows: batches of unequal token counts
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "eval_steps": 3,
            "save_steps": 3,
        },
    )
    return write_recipe(folder / "recipe.yaml", body)


@pytest.fixture(scope="module")
def one_process(recipe) -> Path:
    out = recipe.parent / "one"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(recipe),
            "--set",
            f"training.output_dir={out}",
            "--set",
            f"training.max_steps={STEPS}",
            "--set",
            "training.per_device_train_batch_size=8",
            "--set",
            "training.gradient_accumulation_steps=1",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def two_processes(recipe) -> tuple[Path, subprocess.CompletedProcess]:
    result = torchrun("train", str(recipe))
    assert result.returncode == 0, result.stdout + result.stderr
    return recipe.parent / "two", result


@pytest.fixture(scope="module")
def resumed_on_two_machines(recipe, two_processes) -> tuple[Path, list[tuple[int, str, str]]]:
    run, _ = two_processes
    port = str(free_port())
    machines = [
        accelerate_launch(
            "--config_file",
            str(CONFIGS / "multi-machine.yaml"),
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "-m",
            "loratool",
            "train",
            str(recipe),
            "--resume",
            "--set",
            f"training.max_steps={STEPS}",
        )
        for rank in (0, 1)
    ]
    results = [finish(proc) for proc in machines]
    for code, out, err in results:
        assert code == 0, out + err
    return run, results


@slow
def test_torchrun_gives_one_run_printed_once(two_processes):
    run, result = two_processes
    printed = loratool_lines(result.stdout)
    assert sum(line.startswith("done in") for line in printed) == 1
    assert sum(line.startswith("data:") for line in printed) == 1
    assert len([line for line in printed if line.startswith(f"step {FIRST_PART}/")]) == 2  # loss + eval
    # The other process writes nothing to the terminal: torchrun's own notices only, no tracebacks.
    assert not [line for line in result.stderr.splitlines() if not line.startswith("W")], result.stderr
    manifest = record(run)
    assert manifest["status"] == "complete"
    assert (manifest["world_size"], manifest["effective_batch_size"]) == (2, 8)
    assert not list(run.parent.glob("two-*")), "no second run directory"


@slow
def test_two_processes_train_like_one_with_the_same_global_batch(one_process, resumed_on_two_machines):
    two, _ = resumed_on_two_machines
    single, double = losses(one_process, "loss"), losses(two, "loss")
    assert sorted(single) == sorted(double) == list(range(1, STEPS + 1))
    for step in single:
        assert double[step] == pytest.approx(single[step], abs=1e-3), step
    # Measured: equal to ~1e-6 (float32 sums in another order).
    assert max(abs(double[s] - single[s]) for s in single) < 1e-4
    assert record(two)["train"]["tokens_trained"] == record(one_process)["train"]["tokens_trained"]


@slow
def test_validation_loss_covers_the_whole_set_once_like_one_process(one_process, resumed_on_two_machines):
    two, _ = resumed_on_two_machines
    single, double = losses(one_process, "eval_loss"), losses(two, "eval_loss")
    assert sorted(single) == sorted(double) == [0, 3, 6, 8]  # 0: before the first step
    for step in single:
        assert double[step] == pytest.approx(single[step], abs=1e-5), step


@slow
def test_final_adapters_are_equivalent(one_process, resumed_on_two_machines):
    two, _ = resumed_on_two_machines
    a = load_file(one_process / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        # Measured max |difference| ~1e-6 after 8 steps, against adapter changes of ~1e-2.
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-3)
    moved = max(a[n].abs().max().item() for n in a if "lora_B" in n)  # B starts at zero
    assert moved > 1e-3  # the comparison is not between two untrained adapters


@slow
def test_resume_as_two_machines_continues_the_same_run(resumed_on_two_machines):
    run, results = resumed_on_two_machines
    manifest = record(run)
    assert manifest["status"] == "complete"
    assert manifest["train"]["global_step"] == STEPS
    assert manifest["world_size"] == 2
    assert [r["from_checkpoint"] for r in manifest["resumes"]] == [f"checkpoint-{FIRST_PART}"]
    (_, out0, _), (_, out1, err1) = results
    assert sum(line.startswith("done in") for line in loratool_lines(out0)) == 1
    assert loratool_lines(out1) == []  # machine 1 runs a process that is not the main one


@slow
def test_resume_with_another_number_of_processes_is_refused(recipe, resumed_on_two_machines):
    run, _ = resumed_on_two_machines
    result = CliRunner().invoke(app, ["train", str(recipe), "--resume", "--set", "training.max_steps=10"])
    assert result.exit_code == 1
    assert "processes (world size): 2 -> 1" in result.output
    assert record(run)["train"]["global_step"] == STEPS  # untouched


@slow
def test_an_error_on_the_main_process_stops_the_others(tmp_path, tiny_llama):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run\n")
    body = smoke_recipe(tiny_llama, REPO / "recipes" / "data" / "smoke.jsonl", foreign)
    recipe = write_recipe(tmp_path / "r.yaml", body)
    proc = accelerate_launch(
        "--config_file",
        str(CONFIGS / "ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "loratool",
        "train",
        str(recipe),
    )
    code, out, err = finish(proc)  # a process left waiting would time out here
    assert code != 0
    assert err.count("error: training.output_dir") == 1, err  # said once, by the main process
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
