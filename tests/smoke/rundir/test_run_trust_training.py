"""Runs you can trust: overwrite never deletes what loratool did not write, one writer per
output, the resume contract (same training or refused; resumed == uninterrupted), failures leave a
clear record."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from helpers.run_trust import (
    adapter_weights,
    hold_lock_in_another_process,
    make_recipe,
    metric_steps,
    train,
    whole_and_parts,
)
from loratool.cli import app
from loratool.rundir.records import CHECKPOINT_SEAL, read_run
from loratool.train.progress import MetricsLog

# --- 1. never delete what loratool did not write -------------------------------------------------------


def test_overwrite_keeps_user_files_and_says_what_it_removes(tmp_path, tiny_llama, smoke_data):
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 2, "save_steps": 2})
    assert train(recipe).exit_code == 0
    out = tmp_path / "out"
    (out / "NOTES.md").write_text("my notes")
    (out / "mydata").mkdir()
    (out / "mydata" / "rows.jsonl").write_text("{}\n")
    # A loratool merge output inside the run (derived from it): removed by name, only what merge wrote.
    merged = out / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_text("w")
    (merged / "mine.txt").write_text("user file inside a derived output")
    (merged / "merge.json").write_text(
        json.dumps(
            {"loratool_output": {"kind": "merge", "format": 1}, "files": ["model.safetensors", "merge.json"]}
        )
    )
    result = train(recipe, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "NOTES.md").read_text() == "my notes"
    assert (out / "mydata" / "rows.jsonl").is_file()
    assert (merged / "mine.txt").is_file() and not (merged / "model.safetensors").exists()
    assert "removed the previous run output" in result.output
    assert "NOTES.md" in result.output and "mydata" in result.output  # said to be kept
    assert "merged/" in result.output
    assert read_run(out).complete


def test_symlinked_output_dir_keeps_the_targets_other_files(tmp_path, tiny_llama, smoke_data):
    real = tmp_path / "scratch"
    link = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        smoke_recipe(tiny_llama, smoke_data, link, training={"max_steps": 2, "save_steps": 2}),
    )
    real.mkdir()
    link.symlink_to(real)
    assert train(recipe).exit_code == 0
    (real / "keep.txt").write_text("x")
    assert train(recipe, "--overwrite").exit_code == 0
    assert (real / "keep.txt").read_text() == "x" and link.is_symlink()
    assert read_run(real).complete


def test_second_writer_is_refused_naming_the_holder_and_the_first_run_is_intact(
    tmp_path, tiny_llama, smoke_data
):
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 2, "save_steps": 2})
    assert train(recipe).exit_code == 0
    before = adapter_weights(tmp_path / "out")
    holder = hold_lock_in_another_process(tmp_path / "out")
    try:
        for args in (("--overwrite",), ("--resume", "--set", "training.max_steps=4")):
            result = train(recipe, *args)
            assert result.exit_code == 1
            assert "being written by another loratool process" in result.output
            assert f"pid {holder.pid}" in result.output and "loratool train other.yaml" in result.output
        merge = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "out")])
        assert merge.exit_code == 0  # another output (out/merged) is not locked by the training run
    finally:
        holder.kill()
        holder.wait()
    after = adapter_weights(tmp_path / "out")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert read_run(tmp_path / "out").complete


# --- 3. the resume contract -----------------------------------------------------------------------------


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after_step(monkeypatch, step: int) -> None:
    original = MetricsLog.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise Interrupt()
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(MetricsLog, "on_step_end", on_step_end)


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny_llama, smoke_data, monkeypatch):
    parts = whole_and_parts(tmp_path, tiny_llama, smoke_data, max_steps=8, save_steps=3, logging_steps=1)
    with monkeypatch.context() as patch:
        interrupt_after_step(patch, 5)  # killed after checkpoint-3 and two more logged steps
        first = train(parts)
    assert first.exit_code == 130
    record = read_run(tmp_path / "parts")
    assert record.status == "failed" and record.error == "interrupted"
    assert (tmp_path / "parts" / "traceback.txt").is_file()
    resumed = train(parts, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from checkpoint-3" in resumed.output
    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "parts")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert metric_steps(tmp_path / "parts") == list(range(1, 9))  # each step logged once
    whole_run, parts_run = read_run(tmp_path / "whole").train, read_run(tmp_path / "parts").train
    assert parts_run["tokens_trained"] == whole_run["tokens_trained"]
    assert parts_run["train_loss"] == pytest.approx(whole_run["train_loss"], rel=1e-5)
    assert read_run(tmp_path / "parts").resumes[0]["from_checkpoint"] == "checkpoint-3"


def test_resume_refuses_what_changes_the_training_and_lists_every_difference(
    tmp_path, tiny_llama, smoke_data
):
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 4, "save_steps": 2})
    assert train(recipe).exit_code == 0
    before = (tmp_path / "out" / "recipe.yaml").read_text()
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(smoke_data.read_text().replace("a", "b", 5))
    result = train(
        recipe,
        "--resume",
        "--set", "training.learning_rate=1e-4",
        "--set", f"data.train.0.path={other_data}",
        "--set", "lora.r=4",
    )  # fmt: skip
    assert result.exit_code == 1
    for expected in ("training.learning_rate: 0.005 -> 0.0001", "lora.r: 8 -> 4", "data.train:"):
        assert expected in result.output
    assert (tmp_path / "out" / "recipe.yaml").read_text() == before  # the record still says what happened
    assert read_run(tmp_path / "out").complete
    dry = train(recipe, "--resume", "--dry-run", "--set", "training.learning_rate=1e-4")
    assert dry.exit_code == 1 and "training.learning_rate" in dry.output


def test_resume_may_extend_a_finished_run_and_records_what_changed(tmp_path, tiny_llama, smoke_data):
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 4, "save_steps": 2})
    assert train(recipe).exit_code == 0
    result = train(recipe, "--resume", "--set", "training.max_steps=6")
    assert result.exit_code == 0, result.output
    record = read_run(tmp_path / "out")
    assert record.train["global_step"] == 6
    assert record.resumes[-1]["changed"] == {"training.max_steps": [4, 6]}
    assert record.resumes[-1]["step"] == 4
    assert "max_steps: 6" in (tmp_path / "out" / "recipe.yaml").read_text()


def test_incomplete_newest_checkpoint_is_skipped_and_named(tmp_path, tiny_llama, smoke_data, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 6, "save_steps": 2})
    with monkeypatch.context() as patch:
        interrupt_after_step(patch, 5)
        assert train(recipe).exit_code == 130
    newest = tmp_path / "out" / "checkpoints" / "checkpoint-4"
    (newest / CHECKPOINT_SEAL).unlink()  # as if the process died while saving it
    (newest / "optimizer.pt").write_bytes(b"")
    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert "skipping incomplete checkpoint checkpoint-4" in result.output
    assert read_run(tmp_path / "out").resumes[0]["skipped_incomplete_checkpoints"] == ["checkpoint-4"]


# --- failures -------------------------------------------------------------------------------------------


def test_disk_full_names_the_file_and_leaves_a_failed_record_without_temp_files(
    tmp_path, tiny_llama, smoke_data, monkeypatch
):
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 4, "save_steps": 2})
    original = MetricsLog.on_log

    def full_disk(self, args, state, control, logs=None, **kwargs):
        if state.global_step >= 3:
            raise OSError(28, "No space left on device", str(self.path))
        return original(self, args, state, control, logs=logs, **kwargs)

    monkeypatch.setattr(MetricsLog, "on_log", full_disk)
    result = train(recipe)
    assert result.exit_code == 1
    assert "no space left on the device while writing" in result.output and "metrics.jsonl" in result.output
    assert "--resume" in result.output and "loratool bug" not in result.output
    record = read_run(tmp_path / "out")
    assert record.status == "failed" and "No space left" in record.error
    assert not [p.name for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]
    assert "OSError" in (tmp_path / "out" / "traceback.txt").read_text()


def test_disk_full_while_saving_a_checkpoint_removes_it_and_says_which(
    tmp_path, tiny_llama, smoke_data, monkeypatch
):
    """torch.save reports a full disk as a RuntimeError, after leaving half a checkpoint behind."""
    from loratool.train.checkpoints import CheckpointSeal

    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 6, "save_steps": 2})

    def full_disk(self, args, state, control, **kwargs):
        if state.global_step == 4:  # checkpoint-4 is on disk but was never sealed
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 1 vs 0: No space left on device"
            )
        return original(self, args, state, control, **kwargs)

    original = CheckpointSeal.on_save
    monkeypatch.setattr(CheckpointSeal, "on_save", full_disk)
    result = train(recipe)
    assert result.exit_code == 1, result.output
    assert "no space left on the device while writing" in result.output and "checkpoint-4" in result.output
    assert "continue from checkpoint-2 with --resume" in result.output
    checkpoints = tmp_path / "out" / "checkpoints"
    assert (checkpoints / "checkpoint-2").is_dir() and not (checkpoints / "checkpoint-4").exists()
    assert read_run(tmp_path / "out").status == "failed"


def test_internal_error_exit_code_and_traceback_file(tmp_path, tiny_llama, smoke_data, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 2, "save_steps": 2})

    def broken(self, *args, **kwargs):
        raise RuntimeError("something inside went wrong")

    monkeypatch.setattr(MetricsLog, "on_step_end", broken)
    result = train(recipe)
    assert result.exit_code == 3
    assert "training failed: RuntimeError: something inside went wrong" in result.output
    assert str(tmp_path / "out" / "traceback.txt") in result.output
    assert read_run(tmp_path / "out").status == "failed"


@pytest.mark.quick
def test_everything_printed_lands_in_train_log(tmp_path, tiny_llama, smoke_data):
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 2, "save_steps": 2})
    result = train(recipe)
    assert result.exit_code == 0
    log = (tmp_path / "out" / "train.log").read_text()
    for line in ("data: train", "adapter: ", "done in "):
        assert line in log  # printed before and after the run directory existed
    assert "train.log" in read_run(tmp_path / "out").raw["files"]


def test_sigterm_leaves_a_failed_record_that_says_so(tmp_path, tiny_llama, smoke_data):
    """`kill PID` (SIGTERM, as schedulers send) is recorded like Ctrl-C: run.json says why it stopped."""
    recipe = make_recipe(tmp_path, tiny_llama, smoke_data, training={"max_steps": 400, "save_steps": 2})
    proc = subprocess.Popen([sys.executable, "-m", "loratool", "train", str(recipe)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seal = tmp_path / "out" / "checkpoints" / "checkpoint-2" / CHECKPOINT_SEAL
    deadline = time.monotonic() + 300
    while not seal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.terminate()
    _, stderr = proc.communicate(timeout=120)
    assert seal.exists(), stderr
    assert proc.returncode == 130, stderr
    record = read_run(tmp_path / "out")
    assert record.status == "failed" and record.error == "terminated by signal 15"


def test_validation_starts_at_step_0_once_across_a_resume(tmp_path, tiny_llama, smoke_data):
    """The loss curve shows where the base started; a resume does not evaluate step 0 again."""
    recipe = make_recipe(
        tmp_path,
        tiny_llama,
        smoke_data,
        data={"validation": 0.1},
        training={"max_steps": 2, "save_steps": 2, "eval_steps": 2},
    )
    assert train(recipe).exit_code == 0
    assert train(recipe, "--resume", "--set", "training.max_steps=4").exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in rows if "eval_loss" in r]
    assert eval_steps == [0, 2, 4]
