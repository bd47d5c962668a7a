"""How fast the base-model fingerprint is: candidate hashes on one file, cold and from the page cache, and
loratool's `weights_fingerprint` on a model directory (first call, then answered from its digest cache).

    python scripts/bench_fingerprint.py [--size-mb 512] [--repeat 3] [--dir DIR]

"cold" drops the file's pages from the page cache before each read (posix_fadvise DONTNEED, no root
needed; on a virtual machine the host may still cache the disk). "page cache" reads it again right after
a full read. Figures are MB/s (10^6 bytes per second), the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_whole(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(8 * 2**20):
            pass


class NoHash:
    """Reading alone: the floor under every hash."""

    def update(self, _data: object) -> None:
        pass


def candidates() -> dict[str, object]:
    import xxhash

    return {
        "read only (no hash)": NoHash,
        "sha256 (hashlib)": hashlib.sha256,
        "blake2b (hashlib)": hashlib.blake2b,
        "xxh3_128 (xxhash)": xxhash.xxh3_128,
    }


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512, help="size of the test file, MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the test file (default: a temp dir)"
    )
    args = parser.parse_args()

    from loratool.model import fingerprint

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        os.environ["LORATOOL_CACHE"] = str(tmp / "cache")  # an empty digest cache of our own
        model = tmp / "model"
        model.mkdir()
        path = model / "model.safetensors"  # random bytes: the fingerprint does not parse the file
        size = args.size_mb * 2**20
        with path.open("wb") as fh:
            for _ in range(args.size_mb // 64):
                fh.write(os.urandom(64 * 2**20))
            fh.write(os.urandom(size % (64 * 2**20)))
        old = time.time() - 3600  # older than fingerprint.RECENT_SECONDS, so the digest is remembered
        os.utime(path, (old, old))
        mb = size / 1e6

        print(
            f"machine: {os.cpu_count()} CPU cores ({platform.machine()}), Python {platform.python_version()}"
        )
        print(f"file: {size / 2**20:.0f} MiB of random bytes in {tmp}\n")
        print(f"{'hash':<22} {'cold MB/s':>10} {'page cache MB/s':>16}")
        for name, new in candidates().items():

            def run(new=new):
                fingerprint._hash_file(path, new())

            cold, warm = [], []
            for _ in range(args.repeat):
                drop_from_page_cache(path)
                cold.append(mb / timed(run))
                read_whole(path)
                warm.append(mb / timed(run))
            print(f"{name:<22} {statistics.median(cold):>10,.0f} {statistics.median(warm):>16,.0f}")

        first, again = [], []
        for _ in range(args.repeat):
            (tmp / "cache" / fingerprint.CACHE_FILE).unlink(missing_ok=True)
            fingerprint._REMEMBERED.clear()  # this process's memo too: a first call, as a new command
            drop_from_page_cache(path)
            first.append(timed(lambda: fingerprint.weights_fingerprint(model)))
            again.append(timed(lambda: fingerprint.weights_fingerprint(model)))
        print(
            f"\nloratool weights_fingerprint ({fingerprint.SCHEME}): first call, cold "
            f"{statistics.median(first):.2f} s ({mb / statistics.median(first):,.0f} MB/s); "
            f"second call (digest cache) {statistics.median(again) * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
