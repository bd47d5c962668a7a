"""A local .gguf file as base_model: converted once into a cached HF checkpoint.

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

from conftest import smoke_recipe, write_recipe
from helpers.gguf_base import _quiet

# fixtures, imported for pytest to find in this module
from helpers.gguf_base import private_cache as private_cache
from helpers.gguf_base import tiny_gguf as tiny_gguf
from helpers.gguf_base import tiny_source as tiny_source
from loratool.errors import LoratoolError
from loratool.model import gguf_base
from loratool.model.fingerprint import file_sha256, weights_fingerprint
from loratool.model.gguf_base import SOURCE_RECORD, file_sha256_cached, resolve_base_model
from loratool.recipe import load_recipe


def _converted(gguf: Path) -> tuple[Path, list[str]]:
    lines: list[str] = []
    return Path(resolve_base_model(str(gguf), lines.append)), lines


def test_conversion_reproduces_the_model_and_tokenizer(tiny_gguf, tiny_source, private_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted, lines = _converted(tiny_gguf)
    assert converted.parent == private_cache / "gguf"
    assert converted.name == file_sha256(tiny_gguf)[:16]
    assert lines[0] == f"converting tiny.gguf to a Hugging Face checkpoint (once; cached in {converted})"
    assert lines[1].startswith("  writing the checkpoint: ") and lines[1].endswith(" parameters in float32")
    assert lines[-1].startswith("converted in ") and lines[-1].endswith("s (float32)")
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
    import loratool.model.gguf_base

    path = Path(shutil.copy(tiny_gguf, tmp_path / "model.gguf"))
    calls = []
    monkeypatch.setattr(  # where gguf_base looks it up
        loratool.model.gguf_base, "file_sha256", lambda p: calls.append(p) or file_sha256(p), raising=True
    )
    sha = file_sha256_cached(path)
    assert file_sha256_cached(path) == sha and len(calls) == 1
    with path.open("r+b") as fh:  # same size, new content and mtime: hashed again
        fh.seek(-1, 2)
        fh.write(b"\x01")
    assert file_sha256_cached(path) != sha and len(calls) == 2


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tiny_gguf, private_cache, monkeypatch):
    real = gguf_base.convert_gguf

    def crash(gguf_file: Path, out_dir: Path, log=None) -> str:
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


def test_the_gguf_reader_reports_progress_through_loratool_while_quiet(monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    from loratool.model import gguf_base

    monkeypatch.setattr(gguf_base, "QUIET_READER", True)
    library_bar = gguf_reader.tqdm
    lines: list[str] = []
    with gguf_base.gguf_reader_progress("  dequantizing m.gguf", lines.append, every=0.0):
        assert list(gguf_reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [
            0,
            1,
            2,
        ]
    assert gguf_reader.tqdm is library_bar  # the library's own bar is back afterwards
    assert lines and lines[-1].startswith("  dequantizing m.gguf: 2/3 tensors")
    monkeypatch.setattr(gguf_base, "QUIET_READER", False)  # LORATOOL_DEBUG: the library's bar stays
    with gguf_base.gguf_reader_progress("x", lines.append, every=0.0):
        assert gguf_reader.tqdm is library_bar
