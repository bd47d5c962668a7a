"""What the fingerprint tests of several tiers share: the private digest cache, the old sampled
scheme, and the tensor surgery that negates one tensor."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from loratool.model import fingerprint


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A digest cache of this test's own, and none remembered from earlier tests in this process."""
    monkeypatch.setenv("LORATOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_REMEMBERED", {})
    return tmp_path / "cache"


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
