"""`loratool export` through the CLI: GGUF with Ollama, `--format hf` on an adapter, and one clean
error per user mistake."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO
from conftest import random_adapter as peft_adapter
from helpers.export import copy_model, logits_of
from loratool.cli import app

# --- helpers -------------------------------------------------------------------------------------------


def export_cli(*args: str | Path):
    return CliRunner().invoke(app, ["export", *map(str, args)])


# --- the CLI -------------------------------------------------------------------------------------------


def test_export_cli_gguf_with_ollama(tmp_path, tiny_model_factory):
    source = copy_model(tiny_model_factory("qwen2"), tmp_path / "model")
    result = export_cli(source, "--outtype", "q8_0", "--ollama")
    assert result.exit_code == 0, result.output
    out = tmp_path / "model-gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "model.q8_0.gguf"]
    assert not list(tmp_path.glob("*.partial-*"))
    record = json.loads((out / "export.json").read_text())
    assert record["status"] == "complete" and record["outtype"] == "q8_0" and record["format"] == "gguf"
    import hashlib

    assert record["sha256"] == hashlib.sha256((out / "model.q8_0.gguf").read_bytes()).hexdigest()
    assert record["verification"]["passed"] and record["versions"]["gguf"]
    assert "tokenizer: 6 strings encoded identically -> ok" in result.output
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.q8_0.gguf\n")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama) -> Path:
    return peft_adapter(
        tiny_llama, tmp_path_factory.mktemp("adapter") / "adapter", target_modules="all-linear"
    )


def test_format_hf_on_an_adapter_equals_run_merge(tmp_path, adapter):
    from loratool.merge import run_merge

    result = export_cli(adapter, "--format", "hf", "--output", tmp_path / "exported")
    assert result.exit_code == 0, result.output
    run_merge(adapter, output=tmp_path / "merged", log=lambda _: None)
    a, b = (
        load_file(tmp_path / "exported" / "model.safetensors"),
        load_file(tmp_path / "merged" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "exported" / "merge.json").is_file()


def test_gguf_from_an_adapter_merges_first_and_keeps_only_the_gguf(tmp_path, adapter, tiny_llama):
    from transformers import AutoModelForCausalLM

    from loratool.merge import run_merge

    out = tmp_path / "gguf"
    result = export_cli(adapter, "--outtype", "f32", "--output", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter.f32.gguf", "export.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]
    record = json.loads((out / "export.json").read_text())
    assert record["source"]["kind"] == "run" and record["source"]["merge"]["dtype"] == "float32"
    assert record["source"]["merge"]["verification"]["full_precision_base"]["passed"]
    merged = run_merge(adapter, output=tmp_path / "merged", dtype="float32", verify=False, log=lambda _: None)
    ids = [1, 40, 41, 42, 43]
    gguf_model = AutoModelForCausalLM.from_pretrained(out, gguf_file="adapter.f32.gguf", dtype=torch.float32)
    reference = logits_of(AutoModelForCausalLM.from_pretrained(merged), ids)
    torch.testing.assert_close(logits_of(gguf_model, ids), reference, atol=1e-5, rtol=1e-5)
    base = logits_of(AutoModelForCausalLM.from_pretrained(tiny_llama), ids)
    assert (reference - base).abs().max() > 1e-2  # the adapter is in the GGUF


# --- errors --------------------------------------------------------------------------------------------


def test_missing_source(tmp_path):
    result = export_cli(tmp_path / "nope")
    assert result.exit_code == 1 and f"error: source not found: {tmp_path / 'nope'}" in result.output
    assert "Traceback" not in result.output


def test_source_that_is_a_file_or_not_a_model(tmp_path):
    (tmp_path / "model.gguf").write_text("x")
    result = export_cli(tmp_path / "model.gguf")
    assert result.exit_code == 1 and "is a file; SOURCE must be a directory" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    result = export_cli(tmp_path / "empty")
    assert (
        result.exit_code == 1
        and "is neither a model directory" in result.output
        and "notes.txt" in result.output
    )


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, tiny_llama):
    source = copy_model(tiny_llama, tmp_path / "m", model_type="gpt_neox")
    result = export_cli(source)
    assert result.exit_code == 1
    assert "model_type 'gpt_neox' cannot be exported to GGUF" in result.output
    assert "hint: supported model types: llama, mistral, qwen2, qwen3, gemma2, gemma3_text" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unknown_outtype(tmp_path, tiny_llama):
    result = export_cli(tiny_llama, "--outtype", "q4_k", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "error: unknown --outtype 'q4_k'" in result.output
    assert "f32, f16, bf16, q8_0" in result.output and not (tmp_path / "o").exists()


def test_unsupported_rope_scaling_and_unknown_pre_tokenizer(tmp_path, tiny_llama):
    source = copy_model(tiny_llama, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    result = export_cli(source, "--output", tmp_path / "o1")
    assert result.exit_code == 1 and "rope scaling 'yarn' is not supported" in result.output
    source = copy_model(tiny_llama, tmp_path / "pre")
    data = json.loads((source / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (source / "tokenizer.json").write_text(json.dumps(data))
    result = export_cli(source, "--output", tmp_path / "o2")
    assert result.exit_code == 1 and "is not one llama.cpp implements under a known name" in result.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_llama):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = export_cli(tiny_llama, "--output", out, "--no-verify")
    assert result.exit_code == 1 and "is not the output of `loratool export`" in result.output
    result = export_cli(tiny_llama, "--output", out, "--no-verify", "--overwrite")
    assert result.exit_code == 1 and "is not the output of `loratool export`" in result.output
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    assert export_cli(tiny_llama, "--output", out, "--no-verify").exit_code == 0
    assert export_cli(tiny_llama, "--output", out, "--no-verify").exit_code == 1
    result = export_cli(tiny_llama, "--output", out, "--no-verify", "--overwrite", "--outtype", "f32")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["export.json", f"{tiny_llama.name}.f32.gguf"]
    assert json.loads((out / "export.json").read_text())["verification"] == {"skipped": True}


def test_option_combinations_that_make_no_sense(tmp_path, tiny_llama):
    result = export_cli(tiny_llama, "--format", "hf", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "already is a Hugging Face checkpoint" in result.output
    result = export_cli(tiny_llama, "--base", str(tiny_llama), "--output", tmp_path / "o")
    assert result.exit_code == 1 and "--base and --force apply to run directories" in result.output
    result = export_cli(tiny_llama, "--output", tmp_path / "o.gguf")
    assert result.exit_code == 1 and "give a directory" in result.output


def test_failed_verification_keeps_the_file_under_a_name_that_says_so(tmp_path, tiny_llama, monkeypatch):
    import loratool.export.gguf

    monkeypatch.setattr(loratool.export.gguf, "permute_for_rope", lambda w, n: w)  # a layout bug
    out = tmp_path / "o"
    result = export_cli(tiny_llama, "--outtype", "f32", "--output", out)
    assert result.exit_code == 1
    assert "error: verification failed: logits differ from the source" in result.output
    assert "allowed: max |Δlogit| <= 0.001" in result.output
    failed = tmp_path / "o.failed-verification"
    assert not out.exists() and str(failed) in result.output
    assert json.loads((failed / "export.json").read_text())["status"] == "failed-verification"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.failed-verification"]


def test_tokenizer_difference_fails_verification(tmp_path, tiny_llama, monkeypatch):
    import loratool.export.tokenizer

    real = loratool.export.tokenizer.read_vocab

    def swapped(model_dir, vocab_size):  # two tokens exchanged: the GGUF tokenizes differently
        vocab = real(model_dir, vocab_size)
        vocab.tokens[300], vocab.tokens[301] = vocab.tokens[301], vocab.tokens[300]
        return vocab

    import loratool.export.gguf

    monkeypatch.setattr(loratool.export.gguf, "read_vocab", swapped)  # where the GGUF writer looks it up
    result = export_cli(tiny_llama, "--outtype", "f32", "--output", tmp_path / "o")
    assert result.exit_code == 1 and "the GGUF tokenizer encodes differently" in result.output


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, tiny_llama, monkeypatch):
    import loratool.export.gguf

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loratool.export.gguf, "permute_for_rope", interrupt)  # in the middle of the tensors
    result = export_cli(tiny_llama, "--output", tmp_path / "o")
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space(tmp_path, tiny_llama, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    result = export_cli(tiny_llama, "--output", tmp_path / "o")
    assert result.exit_code == 1
    assert f"error: not enough disk space in {tmp_path}: the export needs about" in result.output
    assert list(tmp_path.iterdir()) == []


def test_export_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from loratool.cli import app\n"
        "result = CliRunner().invoke(app, ['export', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "for option in ('--format', '--outtype', '--output', '--ollama', '--base', '--no-verify', '--overwrite'):\n"
        "    assert option in result.output, option\n"
        "print('heavy:', [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout
