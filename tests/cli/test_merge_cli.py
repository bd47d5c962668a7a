"""`loratool merge`: one clean error per user mistake — through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import LORATOOL_RUN, REPO
from conftest import random_adapter as peft_adapter
from helpers.merge import merge_cli, record

# a fixture, imported for pytest to find in this module
from helpers.merge import tiny_gpt2 as tiny_gpt2


def test_base_from_adapter_config_when_there_is_no_run(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "m", "--no-verify")
    assert result.exit_code == 0, result.output
    assert record(tmp_path / "m")["base_model"]["path"] == str(tiny_llama)


def test_base_that_cannot_be_found(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--base", tmp_path / "nowhere", "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert result.output.startswith(f"error: base model not found: '{tmp_path / 'nowhere'}' (from --base)")
    assert "hint: pass --base a local model directory" in result.output

    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "org/uncached"})
    )
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert "base model not found: 'org/uncached' (from adapter_config.json" in result.output
    assert "nor in the Hugging Face cache" in result.output


# --- errors --------------------------------------------------------------------------------------------


def test_adapter_dir_missing(tmp_path):
    result = merge_cli("--adapter", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == f"error: adapter directory not found: {tmp_path / 'nope'}"
    assert result.output.splitlines()[1].startswith("hint: ")


def test_adapter_dir_without_adapter_files_lists_what_is_there(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({**LORATOOL_RUN, "status": "failed"}))
    (folder / "recipe.yaml").write_text("x: 1\n")
    result = merge_cli("--adapter", folder)
    assert result.exit_code == 1
    assert (
        f"error: {folder} is not a LoRA adapter directory: adapter_config.json and adapter_model.safetensors "
        "missing (it has: checkpoints/, recipe.yaml, run.json)" in result.output
    )
    assert "run.json says the training run is 'failed'" in result.output


def test_adapter_for_another_architecture(tmp_path, tiny_gpt2, tiny_llama):
    adapter = peft_adapter(tiny_gpt2, tmp_path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    result = merge_cli("--adapter", adapter, "--base", tiny_llama, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert (
        "error: the adapter changes 2 tensor(s) the base model does not have, e.g. "
        "transformer.h.0.attn.c_attn.weight" in result.output
    )
    assert "another architecture" in result.output and not (tmp_path / "m").exists()


def test_adapter_for_another_hidden_size(tmp_path, tiny_llama, tiny_model_factory):
    narrow = tiny_model_factory("llama", hidden_size=32, intermediate_size=64)
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--base", narrow, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert (
        "error: shape mismatch for model.layers.0.self_attn.q_proj.weight: the base model has [32, 32], the "
        "adapter's LoRA update (B @ A) is [64, 64]" in result.output
    )


def test_adapter_for_another_vocabulary(tmp_path, tiny_llama, tiny_model_factory):
    small = tiny_model_factory("llama", vocab_size=300)
    with_head = peft_adapter(
        tiny_llama, tmp_path / "a1", target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    result = merge_cli("--adapter", with_head, "--base", small, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert (
        "error: shape mismatch for lm_head.weight: the base model has [300, 64], the adapter's full copy is "
        "[512, 64]" in result.output
    )

    # Only attention targeted (same shapes), but the adapter's tokenizer is the 512-token one.
    from transformers import AutoTokenizer

    plain = peft_adapter(tiny_llama, tmp_path / "a2", target_modules=["q_proj"])
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(plain)
    result = merge_cli("--adapter", plain, "--base", small, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert "has 512 tokens but the base" in result.output and "vocabulary of 300" in result.output


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "merged"
    assert merge_cli("--adapter", adapter, "--output", out, "--no-verify").exit_code == 0
    refused = merge_cli("--adapter", adapter, "--output", out, "--no-verify")
    assert refused.exit_code == 1
    assert (
        f"error: output directory {out} already exists" in refused.output and "--overwrite" in refused.output
    )
    replaced = merge_cli("--adapter", adapter, "--output", out, "--no-verify", "--overwrite")
    assert replaced.exit_code == 0, replaced.output

    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = merge_cli("--adapter", adapter, "--output", foreign, "--overwrite")
    assert refused.exit_code == 1 and "is not the output of `loratool merge`" in refused.output
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_failed_verification_is_an_error_and_the_output_says_so(tmp_path, tiny_llama, monkeypatch):
    import loratool.adapter.files

    real = loratool.adapter.files.lora_delta
    monkeypatch.setattr(loratool.adapter.files, "lora_delta", lambda f: 2 * real(f))  # a scaling bug
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules="all-linear")
    out = tmp_path / "merged"
    result = merge_cli("--adapter", adapter, "--output", out)
    assert result.exit_code == 1
    assert "error: verification failed: the merged model does not reproduce base + adapter" in result.output
    assert "max |Δlogit|" in result.output and "allowed: max |Δlogit| <= 0.001" in result.output
    assert not out.exists() and not list(tmp_path.glob("merged.partial-*"))
    failed = tmp_path / "merged.failed-verification"
    assert record(failed)["status"] == "failed-verification"
    assert str(failed) in result.output


def test_interrupted_merge_leaves_nothing_that_looks_complete(tmp_path, tiny_llama, monkeypatch):
    import loratool.merge.run

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loratool.merge.run, "write_generation_config", interrupt)
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "merged")
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_not_enough_disk_space(tmp_path, tiny_llama, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "merged")
    assert result.exit_code == 1
    assert f"error: not enough disk space in {tmp_path}: the merged model needs about" in result.output


def test_unsupported_adapter_is_refused_with_the_field_named(tmp_path, tiny_llama):
    adapter = peft_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    result = merge_cli("--adapter", adapter, "--output", tmp_path / "m")
    assert result.exit_code == 1
    assert "init_lora_weights=pissa" in result.output and "merge_and_unload" in result.output


def test_merge_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from loratool.cli import app\n"
        "result = CliRunner().invoke(app, ['merge', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "for option in ('--adapter', '--base', '--output', '--dtype', '--qlora-base', '--no-verify',\n"
        "               '--force', '--overwrite'):\n"
        "    assert option in result.output, option\n"
        "print('heavy:', [m for m in ('torch', 'transformers', 'peft') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout
