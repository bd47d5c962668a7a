"""The base-model fingerprint: every byte of every tensor counts, the digest cache is used and invalidated
when it must be, old `sha256-sampled:` records still compare, and merge / eval refuse a base with one
tensor negated where the old sampling saw nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe
from loratool.cli import app
from loratool.errors import LoratoolError
from loratool.model import fingerprint
from loratool.model.fingerprint import fingerprint_matches, fingerprint_scheme, weights_fingerprint

LONG_AGO = time.time() - 3600  # older than fingerprint.RECENT_SECONDS: digests of such files are kept


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A digest cache of this test's own, and none remembered from earlier tests in this process."""
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_REMEMBERED", {})
    return tmp_path / "cache"


@pytest.fixture()
def hashed(monkeypatch) -> list[Path]:
    """The files whose bytes were read for a fingerprint, in order."""
    calls: list[Path] = []
    real = fingerprint._file_digest
    monkeypatch.setattr(fingerprint, "_file_digest", lambda path: calls.append(path) or real(path))
    return calls


@pytest.fixture()
def legacy_windows(monkeypatch):
    """Make the old sampled scheme sample a tiny model the way it sampled a 14 GB one: header plus three
    small windows (the real one hashed files under 64 MiB whole)."""
    monkeypatch.setattr(fingerprint, "_SAMPLED_WHOLE_LIMIT", 0)
    monkeypatch.setattr(fingerprint, "_SAMPLE", 4096)


def old_sampled_fingerprint(model_dir: Path, whole_limit: int, sample: int) -> str:
    """loratool 0.1.0's weights_fingerprint, verbatim but for its two constants: what old run.json hold."""
    files = sorted(model_dir.glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            if size <= whole_limit:
                digest.update(fh.read())
                continue
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(header_len))
            for offset in (0, size // 2, size - sample):
                fh.seek(offset)
                digest.update(fh.read(sample))
    return "sha256-sampled:" + digest.hexdigest()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    os.utime(path, (LONG_AGO, LONG_AGO))
    return path


def tensor_layout(path: Path) -> tuple[int, dict[str, tuple[str, int, int]]]:
    """(start of the data, {name: (dtype, first byte, end byte)}) of a safetensors file, offsets absolute."""
    with path.open("rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(header_len))
    start = 8 + header_len
    return start, {
        name: (info["dtype"], start + info["data_offsets"][0], start + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }


def negate_tensor(path: Path, outside: list[tuple[int, int]]) -> str:
    """Negate, in place, the largest tensor none of whose bytes lie in the `outside` byte ranges (flip the
    sign bit of every element: the header and the file size stay the same). Returns its name."""
    _, layout = tensor_layout(path)
    free = [
        (end - begin, name)
        for name, (_, begin, end) in layout.items()
        if all(end <= lo or begin >= hi for lo, hi in outside)
    ]
    assert free, "no tensor lies outside the sampled windows"
    _, name = max(free)
    dtype, begin, end = layout[name]
    width = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16}[dtype]
    with path.open("r+b") as fh:
        fh.seek(begin)
        data = np.frombuffer(fh.read(end - begin), dtype=width)
        fh.seek(begin)
        fh.write((data ^ width(1 << (8 * data.itemsize - 1))).tobytes())
    return name


def sampled_windows(path: Path, sample: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    start, _ = tensor_layout(path)
    return [(0, start), *((offset, offset + sample) for offset in (0, size // 2, size - sample))]


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


# --- merge, eval and generate check the base through it --------------------------------------------------


def train_run(tmp: Path, base: Path) -> Path:
    recipe = smoke_recipe(
        base, REPO / "recipes" / "data" / "smoke.jsonl", tmp / "run", training={"max_steps": 2}
    )
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> tuple[Path, Path]:
    """(run, base): a short real training run on a base copy of its own, which tests modify and restore."""
    tmp = tmp_path_factory.mktemp("fingerprint-run")
    base = shutil.copytree(tiny_llama, tmp / "base")
    return train_run(tmp, base), base


def test_merge_and_eval_refuse_a_base_with_one_tensor_negated(trained, tmp_path, legacy_windows):
    from loratool.generate.target import check_run_base, resolve_target

    run, base = trained
    shard = base / "model.safetensors"
    pristine = shard.read_bytes()
    recorded = json.loads((run / "run.json").read_text())["base_model"]["fingerprint"]
    assert fingerprint_scheme(recorded) == fingerprint.SCHEME
    legacy = fingerprint._sampled_fingerprint(base)
    try:
        name = negate_tensor(shard, sampled_windows(shard, fingerprint._SAMPLE))
        assert fingerprint._sampled_fingerprint(base) == legacy  # what 0.1.0 would have compared

        merged = CliRunner().invoke(app, ["merge", "--adapter", str(run), "--output", str(tmp_path / "m")])
        assert merged.exit_code == 1, merged.output
        assert "error: the base model is not the one this adapter was trained on" in merged.output, name
        assert not (tmp_path / "m").exists()
        forced = CliRunner().invoke(
            app, ["merge", "--adapter", str(run), "--output", str(tmp_path / "m"), "--force", "--no-verify"]
        )
        assert forced.exit_code == 0, forced.output
        assert json.loads((tmp_path / "m" / "merge.json").read_text())["base_model"]["fingerprint_check"] == (
            "mismatch, merged with --force"
        )

        with pytest.raises(LoratoolError, match="is not the one the run in"):  # eval, generate, chat
            check_run_base(resolve_target(run), log=lambda _: None)
    finally:
        shard.write_bytes(pristine)
    check_run_base(resolve_target(run), log=lambda _: None)  # restored: accepted again


def test_merge_accepts_an_old_sampled_record_of_the_same_base(trained, tmp_path):
    run, base = trained
    old = shutil.copytree(run, tmp_path / "old-run")
    manifest = json.loads((old / "run.json").read_text())
    manifest["base_model"]["fingerprint"] = old_sampled_fingerprint(base, 64 * 2**20, 2**20)
    (old / "run.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(
        app, ["merge", "--adapter", str(old), "--output", str(tmp_path / "m"), "--no-verify"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "m" / "merge.json").read_text())["base_model"]
    assert record["fingerprint_check"] == "match"
    assert record["fingerprint"] == weights_fingerprint(base)  # merge.json records the current scheme


def test_generate_compares_adapters_recorded_in_either_scheme(trained, tmp_path, tiny_model_factory):
    from loratool.generate.target import resolve_target

    run, base = trained
    as_base = resolve_target(base)
    assert as_base.base_matches(weights_fingerprint(base))
    assert as_base.base_matches(old_sampled_fingerprint(base, 64 * 2**20, 2**20))
    other = tiny_model_factory("llama", seed=1)
    assert not as_base.base_matches(weights_fingerprint(other))
    assert not as_base.base_matches(old_sampled_fingerprint(other, 64 * 2**20, 2**20))
    # A run target recorded with the new scheme, another adapter's run with the old one: checked against
    # the run's base weights.
    as_run = resolve_target(run)
    assert as_run.base_matches(old_sampled_fingerprint(base, 64 * 2**20, 2**20))
    assert not as_run.base_matches(old_sampled_fingerprint(other, 64 * 2**20, 2**20))


def test_combine_refuses_a_base_with_one_tensor_negated(trained, tmp_path, legacy_windows):
    run, base = trained
    other = shutil.copytree(base, tmp_path / "other-base")
    negate_tensor(
        other / "model.safetensors", sampled_windows(other / "model.safetensors", fingerprint._SAMPLE)
    )
    twin = shutil.copytree(run, tmp_path / "twin")
    args = ["merge", "--adapter", str(run), "--adapter", str(twin), "--adapter-only"]
    out = tmp_path / "combined"
    refused = CliRunner().invoke(app, [*args, "--base", str(other), "--adapter-output", str(out)])
    assert refused.exit_code == 1, refused.output
    assert "error: the base model is not the one this adapter was trained on" in refused.output
    assert not out.exists()
    accepted = CliRunner().invoke(app, [*args, "--base", str(base), "--adapter-output", str(out)])
    assert accepted.exit_code == 0, accepted.output
