"""The base-model fingerprint: every byte of every tensor counts, the digest cache is used and
invalidated when it must be, and old `sha256-sampled:` records still compare."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

# fixtures, imported for pytest to find in this module
from helpers.fingerprint import cache_dir as cache_dir
from helpers.fingerprint import legacy_windows as legacy_windows
from helpers.fingerprint import negate_tensor, old_sampled_fingerprint, sampled_windows, tensor_layout
from loratool.errors import LoratoolError
from loratool.model import fingerprint
from loratool.model.fingerprint import fingerprint_matches, fingerprint_scheme, weights_fingerprint

LONG_AGO = time.time() - 3600  # older than fingerprint.RECENT_SECONDS: digests of such files are kept


@pytest.fixture()
def hashed(monkeypatch) -> list[Path]:
    """The files whose bytes were read for a fingerprint, in order."""
    calls: list[Path] = []
    real = fingerprint._file_digest
    monkeypatch.setattr(fingerprint, "_file_digest", lambda path: calls.append(path) or real(path))
    return calls


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    os.utime(path, (LONG_AGO, LONG_AGO))
    return path


@pytest.fixture()
def model(tmp_path) -> Path:
    """A two-shard model: eight float32 tensors of 8 KiB in one shard, one in the other."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "model"
    write_safetensors(
        folder / "model-00001-of-00002.safetensors",
        {f"layers.{i}.weight": rng.standard_normal((32, 64), dtype=np.float32) for i in range(8)},
    )
    write_safetensors(
        folder / "model-00002-of-00002.safetensors",
        {"lm_head.weight": rng.standard_normal((32, 64)).astype(np.float32)},
    )
    (folder / "config.json").write_text("{}")
    return folder


# --- what the fingerprint covers ----------------------------------------------------------------------


def test_one_negated_tensor_changes_the_fingerprint_where_sampling_missed_it(model, legacy_windows):
    shard = model / "model-00001-of-00002.safetensors"
    before, legacy_before = weights_fingerprint(model), fingerprint._sampled_fingerprint(model)
    assert fingerprint_scheme(before) == fingerprint.SCHEME
    negate_tensor(shard, sampled_windows(shard, fingerprint._SAMPLE))
    assert weights_fingerprint(model) != before
    # The old scheme (and so a run.json written by loratool 0.1.0) saw no difference.
    assert fingerprint._sampled_fingerprint(model) == legacy_before


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_changed_byte_anywhere_in_the_data_changes_the_fingerprint(model, where):
    shard = model / "model-00001-of-00002.safetensors"
    start, _ = tensor_layout(shard)
    size = shard.stat().st_size
    offset = {"first": start, "middle": (start + size) // 2, "last": size - 1}[where]
    before = weights_fingerprint(model)
    with shard.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 1]))
    assert weights_fingerprint(model) != before


def test_the_same_weights_elsewhere_have_the_same_fingerprint(model, tmp_path):
    copy = shutil.copytree(model, tmp_path / "elsewhere" / "copy")
    (copy / "README.md").write_text("not weights")  # only *.safetensors files count
    assert weights_fingerprint(copy) == weights_fingerprint(model)
    # File names are part of it: the same bytes under other shard names are another checkpoint.
    (copy / "model-00002-of-00002.safetensors").rename(copy / "model-00003-of-00003.safetensors")
    assert weights_fingerprint(copy) != weights_fingerprint(model)


def test_a_directory_without_safetensors_has_no_fingerprint(tmp_path, model):
    (tmp_path / "empty").mkdir()
    assert weights_fingerprint(tmp_path / "empty") is None
    assert not fingerprint_matches(tmp_path / "empty", weights_fingerprint(model))


def test_file_sha256_is_the_sha256_of_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "CHUNK", 1000)  # several reads, the last one short
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(4321))
    assert fingerprint.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --- the digest cache ---------------------------------------------------------------------------------


def test_a_second_call_uses_the_cache_file(model, hashed, cache_dir):
    first = weights_fingerprint(model)
    assert len(hashed) == 2
    entries = json.loads((cache_dir / fingerprint.CACHE_FILE).read_text())["files"]
    assert sorted(entries) == sorted(str(p.resolve()) for p in model.glob("*.safetensors"))
    fingerprint._REMEMBERED.clear()  # as a new command would start: only the file remembers
    assert weights_fingerprint(model) == first
    assert fingerprint_matches(model, first)
    assert len(hashed) == 2  # nothing read again


def test_touching_mtime_or_size_forces_a_rehash(model, hashed):
    first = weights_fingerprint(model)
    shard1, shard2 = sorted(model.glob("*.safetensors"))
    os.utime(shard1, (LONG_AGO + 10, LONG_AGO + 10))
    assert weights_fingerprint(model) == first  # same bytes, read again
    assert hashed[2:] == [shard1]
    with shard2.open("ab") as fh:
        fh.write(b"\0")
    os.utime(shard2, (LONG_AGO, LONG_AGO))  # the old mtime back: the size (and ctime) still tell
    assert weights_fingerprint(model) != first
    assert hashed[3:] == [shard2]


def test_a_file_replaced_with_its_size_and_mtime_kept_is_rehashed(model, hashed, tmp_path):
    first = weights_fingerprint(model)
    shard = model / "model-00002-of-00002.safetensors"
    changed = shutil.copy2(shard, tmp_path / "changed.safetensors")
    negate_tensor(Path(changed), [])
    os.utime(changed, (LONG_AGO, shard.stat().st_mtime))  # `cp -p` / `rsync -a`: mtime kept
    os.replace(changed, shard)
    assert weights_fingerprint(model) != first
    assert hashed[2:] == [shard]


def test_a_file_modified_just_now_is_not_remembered(model, hashed):
    shard = model / "model-00002-of-00002.safetensors"
    shard.touch()  # within RECENT_SECONDS: a second write in the same clock tick could go unseen
    weights_fingerprint(model)
    weights_fingerprint(model)
    assert hashed.count(shard) == 2 and len(hashed) == 3


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"version": 99, "files": {}}', '{"version": 1, "files": 3}']
)
def test_a_corrupt_cache_file_is_ignored_and_rewritten(model, hashed, cache_dir, content):
    expected = weights_fingerprint(model)
    fingerprint._REMEMBERED.clear()
    (cache_dir / fingerprint.CACHE_FILE).write_text(content)
    assert weights_fingerprint(model) == expected
    assert len(hashed) == 4  # hashed again
    data = json.loads((cache_dir / fingerprint.CACHE_FILE).read_text())
    assert data["version"] == fingerprint.CACHE_VERSION and len(data["files"]) == 2
    assert not list(cache_dir.glob("*.tmp"))


def test_a_cache_that_cannot_be_written_costs_only_a_rehash(model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LORATOOL_CACHE", str(blocker / "cache"))  # mkdir under a file fails
    assert fingerprint_scheme(weights_fingerprint(model)) == fingerprint.SCHEME


def test_the_cache_keeps_its_newest_entries(model, monkeypatch, cache_dir, tmp_path):
    monkeypatch.setattr(fingerprint, "CACHE_ENTRIES", 1)
    weights_fingerprint(model)
    entries = json.loads((cache_dir / fingerprint.CACHE_FILE).read_text())["files"]
    assert list(entries) == [str((model / "model-00002-of-00002.safetensors").resolve())]


def test_concurrent_writers_leave_a_valid_cache(tmp_path, cache_dir):
    rng = np.random.default_rng(1)
    models = []
    for i in range(4):
        write_safetensors(
            tmp_path / f"m{i}" / "model.safetensors", {"w": rng.standard_normal(4096).astype(np.float32)}
        )
        models.append(tmp_path / f"m{i}")
    code = (
        "import sys; from pathlib import Path; from loratool.model.fingerprint import weights_fingerprint; "
        "[print(weights_fingerprint(Path(sys.argv[1]))) for _ in range(20)]"
    )
    env = {**os.environ, "LORATOOL_CACHE": str(cache_dir), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(m)], env=env, stdout=subprocess.PIPE, text=True)
        for m in models
    ]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert [set(out) for out in outputs] == [{weights_fingerprint(m)} for m in models]
    data = json.loads((cache_dir / fingerprint.CACHE_FILE).read_text())  # valid JSON: never half written
    assert set(data["files"]) <= {str((m / "model.safetensors").resolve()) for m in models}
    assert not list(cache_dir.glob("*.tmp"))


# --- records of older versions --------------------------------------------------------------------------


def test_old_sampled_records_still_compare(model, legacy_windows, tmp_path):
    recorded = old_sampled_fingerprint(model, whole_limit=0, sample=4096)
    assert fingerprint._sampled_fingerprint(model) == recorded
    assert fingerprint_matches(model, recorded)
    other = shutil.copytree(model, tmp_path / "other")
    with (other / "model-00001-of-00002.safetensors").open("r+b") as fh:
        fh.seek(-1, os.SEEK_END)  # inside the last sampled window
        fh.write(b"\x7f")
    assert not fingerprint_matches(other, recorded)


def test_old_records_of_small_files_hashed_them_whole(model):
    recorded = old_sampled_fingerprint(model, whole_limit=64 * 2**20, sample=2**20)
    assert fingerprint_matches(model, recorded)


def test_an_unknown_scheme_is_a_clear_error(model):
    with pytest.raises(LoratoolError) as err:
        fingerprint_matches(model, "sha512-future:abcdef")
    assert "sha512-future" in err.value.message and "upgrade loratool" in err.value.hint
    with pytest.raises(LoratoolError):
        fingerprint_matches(model, "no scheme at all")
