"""Fingerprints of model weights and data files, recorded in run.json and checked before a base is used.

The base-model fingerprint covers every byte of every `*.safetensors` file in the model directory (header:
names, shapes, dtypes, offsets; and all tensor data), so one changed tensor anywhere changes it. Each file
is hashed with xxh3-128 and the directory's fingerprint combines the per-file digests with the file names
and sizes; the directory's path is not part of it (the same weights elsewhere have the same fingerprint).

Why xxh3-128: it hashes at memory speed (GB/s on one core), so a fingerprint costs about what reading
the files costs; sha256 (even with SHA-NI) and blake2b are 4-10x slower from the page cache
(docs/benchmarks.md, `scripts/bench_fingerprint.py`). The fingerprint guards against the wrong or a
modified base by mistake (another fine-tune, a corrupt download, an edited shard), not against someone
forging a collision, so a non-cryptographic 128-bit hash is enough. Files named in run.json as *sha256* (data, GGUF files) keep
sha256: `file_sha256`.

Per-file digests are remembered in a small JSON file under loratool's cache directory
(`fingerprints.json`), keyed by the file's resolved path, size, mtime, ctime and inode, so commands after
the first do not read the weights again. The cache is only an optimisation: a missing, corrupt or
unwritable cache file costs a rehash, never an error, and concurrent writers are fine (each writes a temp
file and renames it; the last one wins).

Records written before this scheme hold `sha256-sampled:...` (headers plus three 1 MiB windows of large
files); `fingerprint_matches` still checks them, with that scheme.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError
from loratool.model.cache import cache_root

SCHEME = "xxh3-128"  # the scheme new fingerprints use
LEGACY_SAMPLED = "sha256-sampled"  # loratool <= 0.1.0 records: headers + 1 MiB samples
CHUNK = 8 * 2**20  # read size; large reads keep the syscall count low, memory stays at one buffer
CACHE_FILE = "fingerprints.json"
CACHE_VERSION = 1
CACHE_ENTRIES = 1024  # newest entries kept (~150 bytes each): plenty for the shards of many models
# A file modified this recently is hashed but not remembered: on file systems with coarse timestamps a
# second write within the same tick would leave size and mtime unchanged (git's "racy clean" problem).
RECENT_SECONDS = 2.0

# Legacy sampled scheme: files up to this size were hashed whole, larger ones by header + 3 windows.
_SAMPLED_WHOLE_LIMIT = 64 * 2**20
_SAMPLE = 2**20


def file_sha256(path: Path) -> str:
    """sha256 of a whole file (data files and GGUF files are recorded with it)."""
    digest = hashlib.sha256()
    _hash_file(path, digest)
    return digest.hexdigest()


def weights_fingerprint(model_dir: Path) -> str | None:
    """The fingerprint of a directory's safetensors weights (every byte of every file), in the current
    scheme (`xxh3-128:<32 hex digits>`); None when the directory has no `*.safetensors` file."""
    files = _weight_files(model_dir)
    if not files:
        return None
    cache = _DigestCache()
    combined = _xxh3_128()
    for path in files:
        size, digest = cache.digest(path)
        combined.update(f"{path.name}\t{size}\t{digest}\n".encode())
    cache.save()
    return f"{SCHEME}:{combined.hexdigest()}"


def fingerprint_matches(model_dir: Path, recorded: str) -> bool:
    """Whether the weights in `model_dir` are the ones `recorded` (a fingerprint from run.json) describes.

    The one check of a base against a record: the weights are fingerprinted with the scheme the record
    names, so records of older loratool versions (`sha256-sampled:`) still compare. A directory without
    safetensors weights matches nothing. A scheme this version does not know (a record written by a
    newer loratool, or not a fingerprint at all) raises LoratoolError rather than claiming a mismatch."""
    scheme = fingerprint_scheme(recorded)
    if scheme == SCHEME:
        return weights_fingerprint(model_dir) == recorded
    if scheme == LEGACY_SAMPLED:
        return _sampled_fingerprint(model_dir) == recorded
    raise LoratoolError(
        f"unknown base-model fingerprint {recorded[:48]!r} (this loratool knows {SCHEME} and "
        f"{LEGACY_SAMPLED}), so the base cannot be checked against it",
        hint="the record was probably written by a newer loratool: upgrade loratool",
    )


def fingerprint_scheme(fingerprint: str) -> str:
    """The scheme a fingerprint was made with (`xxh3-128`, `sha256-sampled`). Two fingerprints compare as
    strings only when their schemes agree; otherwise check one against the weights (fingerprint_matches)."""
    return fingerprint.split(":", 1)[0] if ":" in fingerprint else ""


# --- hashing -------------------------------------------------------------------------------------------


def _xxh3_128() -> Any:
    import xxhash  # imported here: only commands that check a base need it

    return xxhash.xxh3_128()


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def _hash_file(path: Path, digest: Any) -> None:
    """Feed a whole file to `digest` in CHUNK-sized reads into one reused buffer."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])


def _file_digest(path: Path) -> str:
    digest = _xxh3_128()
    _hash_file(path, digest)
    return digest.hexdigest()


def _sampled_fingerprint(model_dir: Path) -> str | None:
    """The legacy `sha256-sampled:` fingerprint, computed exactly as loratool <= 0.1.0 recorded it."""
    files = _weight_files(model_dir)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            if size <= _SAMPLED_WHOLE_LIMIT:
                digest.update(fh.read())
                continue
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(header_len))
            for offset in (0, size // 2, size - _SAMPLE):
                fh.seek(offset)
                digest.update(fh.read(_SAMPLE))
    return f"{LEGACY_SAMPLED}:{digest.hexdigest()}"


# --- the digest cache ----------------------------------------------------------------------------------


# This process's digests too: a command checks the same base more than once (merge records the
# fingerprint and checks it), and must not read the weights twice when the cache file cannot be written.
_REMEMBERED: dict[str, dict[str, Any]] = {}


class _DigestCache:
    """Per-file xxh3-128 digests remembered across commands, keyed by what changes when a file does."""

    def __init__(self) -> None:
        self.path = cache_root() / CACHE_FILE
        self.entries = {**_read_entries(self.path), **_REMEMBERED}
        self.new: dict[str, dict[str, Any]] = {}

    def digest(self, path: Path) -> tuple[int, str]:
        """(size, digest) of one file: remembered, or hashed now."""
        real = path.resolve()  # a Hugging Face cache snapshot links to its blobs: key on the blob
        key = str(real)
        before = _stat_key(real)
        entry = self.entries.get(key)
        if entry is not None and {k: entry.get(k) for k in before} == before:
            digest = entry.get(SCHEME)
            if isinstance(digest, str):
                return before["size"], digest
        started = time.time()
        digest = _file_digest(real)
        after = _stat_key(real)
        if after == before and started - before["mtime_ns"] / 1e9 > RECENT_SECONDS:
            self.new[key] = {**after, SCHEME: digest}
        return after["size"], digest

    def save(self) -> None:
        """Add this command's new digests to the cache file (re-read first, so that entries another
        process wrote meanwhile are kept); write a temp file and rename it over the old one."""
        if not self.new:
            return
        _REMEMBERED.update(self.new)
        entries = _read_entries(self.path)
        for key, entry in self.new.items():
            entries.pop(key, None)  # re-inserted at the end: the newest entries survive the trim
            entries[key] = entry
        entries = dict(list(entries.items())[-CACHE_ENTRIES:])
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": CACHE_VERSION, "files": entries}, fh, indent=1)
                fh.write("\n")
            os.replace(tmp, self.path)
            tmp = None
        except OSError:  # a read-only or full cache directory only costs a rehash next time
            pass
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _stat_key(path: Path) -> dict[str, int]:
    stat = path.stat()
    # ctime and inode as well as mtime: a copy made with `cp -p` / `rsync -a`, or an mtime set back by
    # hand, keeps size and mtime but not these.
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
    }


def _read_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The cache file's entries; {} when it is missing, unreadable, corrupt or of another version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    files = data.get("files")
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(v, dict)}
