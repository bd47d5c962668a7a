"""`loratool sweep --launch` and `--collect`, end to end on a tiny model: the sweep writes one SLURM job array
(or one SkyPilot task per cell) instead of training; array task N, run by bash with srun stubbed, hands
`loratool train` exactly cell N's recipe; a cell trained with those arguments shows up in the collected
table, and cells that failed, still run or never started are marked as such."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import LORATOOL_RUN
from helpers.launch import PRINT_ARGS, run_stubbed, skypilot_problems
from helpers.sweep import tiny_recipe
from loratool.cli import app


def cli(*args: str):
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture()
def here(tmp_path, tiny_llama, smoke_data, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the files name the recipe and the sweep as given: relative to here
    tiny_recipe(tmp_path, tiny_llama, smoke_data)
    return tmp_path


def train_args_of_task(script: Path, task: int) -> list[str]:
    """What array task `task` hands `loratool train`: the script run by bash, srun printing its arguments."""
    stubs = f"srun() {{ {PRINT_ARGS}; }}\nscontrol() {{ echo node-1; }}"
    env = {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n1",
    }
    ran = run_stubbed(script, stubs, env)
    assert ran.returncode == 0, ran.stderr
    words = ran.stdout.splitlines()
    assert words[words.index("--rdzv-endpoint") + 1] == f"node-1:{29500 + task}"  # a port per task
    return words[words.index("train") + 1 :]


def test_a_slurm_array_trains_each_cell_and_collect_builds_the_table(here):
    launched = cli("sweep", "tiny.yaml", "--vary", "lora.r=4,8", "--launch", "slurm", "--gpus-per-node", "1",
                   "--output", "sw")  # fmt: skip
    assert launched.exit_code == 0, launched.output
    assert "sbatch sw/sweep.sbatch" in launched.output and "loratool sweep --collect sw" in launched.output
    record = json.loads((here / "sw" / "sweep.json").read_text())
    assert record["status"] == "launched" and record["launch"]["target"] == "slurm"
    assert [c["status"] for c in record["cells"]] == ["not started", "not started"]
    script = here / "sw" / "sweep.sbatch"
    assert "#SBATCH --array=0-1\n" in script.read_text()
    assert not (here / "sw" / "r=4").exists()  # nothing trained here

    args = train_args_of_task(script, 1)
    assert args == ["tiny.yaml", "--set", "lora.r=8", "--set", f'training.output_dir="{here / "sw" / "r=8"}"']
    assert train_args_of_task(script, 0)[2] == "lora.r=4"
    assert run_stubbed(script, "srun() { :; }", {"SLURM_ARRAY_TASK_ID": "2"}).returncode == 1  # no cell 2

    trained = cli("train", *args)  # what task 1 runs on its node
    assert trained.exit_code == 0, trained.output
    (here / "sw" / "r=4").mkdir()  # task 0 still running (its run.json says so)
    (here / "sw" / "r=4" / "run.json").write_text(json.dumps({**LORATOOL_RUN, "status": "running"}))

    collected = cli("sweep", "--collect", "sw")
    assert collected.exit_code == 0, collected.output
    assert "collected 2 cells: 1 complete, 1 running" in collected.output
    record = json.loads((here / "sw" / "sweep.json").read_text())
    assert record["status"] == "running"
    done = record["cells"][1]
    assert done["status"] == "complete" and done["trainable_parameters"] > 0 and done["validation_loss"] > 0
    assert "| 8 | complete |" in (here / "sw" / "results.md").read_text()

    (here / "sw" / "r=4" / "run.json").write_text(
        json.dumps({**LORATOOL_RUN, "status": "failed", "error": "CUDA out of memory on node-1"})
    )
    failed = cli("sweep", "--collect", "sw")
    assert failed.exit_code == 1
    assert "1 of 2 cells failed" in failed.output and "r=4: CUDA out of memory on node-1" in failed.output
    assert json.loads((here / "sw" / "sweep.json").read_text())["status"] == "failed"
    rows = list(csv.DictReader((here / "sw" / "results.csv").open()))
    assert [(r["cell"], r["status"]) for r in rows] == [("r=4", "failed"), ("r=8", "complete")]
    assert rows[0]["error"] == "CUDA out of memory on node-1"


def test_skypilot_gets_one_valid_task_per_cell(here):
    launched = cli("sweep", "tiny.yaml", "--vary", "lora.r=4,8", "--launch", "skypilot", "--gpus-per-node", "1",
                   "--gpu", "H100", "--bucket", "s3://runs", "--output", "sw")  # fmt: skip
    assert launched.exit_code == 0, launched.output
    for r in (4, 8):
        text = (here / "sw" / f"r={r}.sky.yaml").read_text()
        task = yaml.safe_load(text)
        assert skypilot_problems(task) == []
        assert task["name"] == f"sw-r-{r}" and task["resources"]["accelerators"] == "H100:1"
        assert f"--set lora.r={r} --set training.output_dir=/outputs/sw/r={r}" in task["run"]
    assert "sky jobs launch -n sw-r-4 sw/r=4.sky.yaml" in launched.output


def test_skypilot_without_a_bucket_keeps_the_cells_inside_what_it_copies(here, tmp_path_factory):
    inside = cli("sweep", "tiny.yaml", "--vary", "lora.r=4", "--launch", "skypilot", "--gpus-per-node", "1",
                 "--output", "sw")  # fmt: skip
    assert inside.exit_code == 0, inside.output
    assert "--set 'training.output_dir=\"sw/r=4\"'" in (here / "sw" / "r=4.sky.yaml").read_text()
    outside = tmp_path_factory.mktemp("elsewhere")
    refused = cli("sweep", "tiny.yaml", "--vary", "lora.r=4", "--launch", "skypilot", "--gpus-per-node", "1",
                  "--output", outside / "sw")  # fmt: skip
    assert refused.exit_code == 1 and "is outside this directory" in refused.output
    assert "--bucket" in refused.output and not (outside / "sw").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--vary", "lora.r=4", "--launch", "kubeflow"],
            "a sweep launches on slurm (a job array) or skypilot",
        ),
        (["--vary", "lora.r=4", "--launch", "slurm", "--eval"], "--launch writes the cells' jobs"),
        (["--collect", "sw"], "--collect reads a sweep that is already there"),
    ],
)
def test_what_cannot_go_together_is_refused(here, args, message):
    result = cli("sweep", "tiny.yaml", *args)
    assert result.exit_code == 1 and message in result.output


def test_collect_refuses_a_directory_without_a_sweep(here):
    (here / "empty").mkdir()
    result = cli("sweep", "--collect", "empty")
    assert result.exit_code == 1 and "no loratool sweep there" in result.output
    missing = cli("sweep")
    assert missing.exit_code == 1 and "sweep needs a RECIPE and at least one --vary" in missing.output
