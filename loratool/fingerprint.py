"""Cheap, stable fingerprints of model weights and data files, recorded in run.json.

A full sha256 of a 14 GB checkpoint takes minutes; the weights fingerprint instead hashes each
safetensors file's header (names, shapes, dtypes, offsets) plus 1 MiB samples at its start, middle and
end. Two different fine-tunes of one architecture differ in the sampled bytes, so a mismatched base is
caught; files under 64 MiB are hashed whole.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WHOLE_FILE_LIMIT = 64 * 2**20
SAMPLE = 2**20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(4 * 2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_fingerprint(model_dir: Path) -> str | None:
    """sha256-based fingerprint of a directory's safetensors weights; None when it has none."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            if size <= WHOLE_FILE_LIMIT:
                digest.update(fh.read())
                continue
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(header_len))
            for offset in (0, size // 2, size - SAMPLE):
                fh.seek(offset)
                digest.update(fh.read(SAMPLE))
    return "sha256-sampled:" + digest.hexdigest()
