"""`loratool train` through the real CLI, without training: the dry run, and one clean error per
bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import trl

from conftest import REPO, smoke_recipe, write_recipe
from helpers.train import train_cli


def test_dry_run_resolves_everything_and_writes_nothing(tmp_path, tiny_llama, smoke_data):
    out = tmp_path / "never"
    recipe_path = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, smoke_data, out))
    result = train_cli(recipe_path, "--dry-run", "--set", "lora.r=4")
    assert result.exit_code == 0, result.output
    assert "resolved recipe:" in result.output
    assert "  r: 4" in result.output and "lora_dropout: 0.0" in result.output
    assert "trainable parameters" in result.output and "loss on" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "expected", "hint"),
    [
        ({"data": {"train": [{"path": "missing.jsonl"}]}}, "missing.jsonl", None),
        ({"base_model": "./no/such/model"}, "base model not found", "local model directory"),
        (
            {"lora": {"target_modules": ["q_proj", "query_key_value"]}},
            "query_key_value matches no layer",
            "q_proj",
        ),
    ],
)
def test_bad_input_exits_1_with_one_clean_message(tmp_path, tiny_llama, smoke_data, change, expected, hint):
    out = tmp_path / "run"
    recipe = smoke_recipe(tiny_llama, smoke_data, out)
    recipe.update(change)
    result = train_cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    if hint:
        assert "hint:" in result.output and hint in result.output
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_pickle_only_base_model_is_refused(tmp_path, tiny_llama, smoke_data):
    import shutil

    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict(), pickled / "pytorch_model.bin")
    result = train_cli(write_recipe(tmp_path / "r.yaml", smoke_recipe(pickled, smoke_data, tmp_path / "run")))
    assert result.exit_code == 1
    assert "weights only in pickle files" in result.output and "safetensors" in result.output
    assert "Traceback" not in result.output


def test_crash_during_training_leaves_a_failed_run_and_no_adapter(
    tmp_path, tiny_llama, smoke_data, monkeypatch
):
    def crash(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trl.SFTTrainer, "train", crash)
    out = tmp_path / "run"
    recipe_path = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, smoke_data, out))
    result = train_cli(recipe_path)
    assert result.exit_code == 1 and "error: out of GPU memory while training" in result.output
    assert "per_device_train_batch_size" in result.output and "Traceback" not in result.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and "out of memory" in manifest["error"]
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    again = train_cli(recipe_path)
    assert again.exit_code == 1 and "holds a run that did not finish" in again.output


def test_typo_in_data_path_leaves_nothing_behind(tmp_path, tiny_llama):
    out = tmp_path / "run"
    recipe_path = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, tmp_path / "trian.jsonl", out))
    for _ in range(2):  # the second attempt is not refused: nothing was left to protect
        result = train_cli(recipe_path)
        assert result.exit_code == 1 and "trian.jsonl" in result.output
        assert "did not finish" not in result.output
    assert not out.exists()


def test_empty_dataset_after_filtering_is_an_error(tmp_path, tiny_llama, smoke_data):
    recipe = smoke_recipe(tiny_llama, smoke_data, tmp_path / "run")
    recipe["data"].update(max_length=4, truncation="drop")
    result = train_cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1
    assert "max_length" in result.output and "Traceback" not in result.output


def test_debug_variable_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loratool", "train", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        env={"LORATOOL_DEBUG": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        cwd=REPO,
    )
    assert (
        result.returncode == 1 and "Traceback" in result.stderr and "recipe file not found" in result.stderr
    )


@pytest.mark.parametrize(
    ("report_to", "expected"),
    [
        ("tensorboard", "training.report_to: tensorboard is not installed"),
        ("tensorbord", "unknown tracker tensorbord — did you mean tensorboard?"),
    ],
)
def test_missing_or_unknown_tracker_is_refused_before_loading(
    tmp_path, tiny_llama, smoke_data, report_to, expected
):
    out = tmp_path / "run"
    recipe = smoke_recipe(tiny_llama, smoke_data, out, training={"report_to": report_to})
    result = train_cli(write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and expected in result.output and "\nhint: " in result.output
    assert not out.exists()
