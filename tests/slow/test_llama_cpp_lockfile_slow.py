"""The llama.cpp harness's lock file is in sync with its package.json: `npm ci` (what a user or a CI job runs
in tests/llama_cpp to get the runtime) accepts it. It lists node-llama-cpp's optional binaries for every
platform; the entries for the platforms this project's registry mirror does not serve (macOS, Windows,
riscv64) were written by hand, with their os and cpu, and carry no integrity hash."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO
from llama_cpp_runtime import unavailable

HARNESS = REPO / "tests" / "llama_cpp"


@pytest.mark.slow  # asks the npm registry for the packages' metadata
def test_npm_ci_accepts_the_lock_file(tmp_path):
    npm = shutil.which("npm")
    if npm is None:
        unavailable("npm is not on PATH")
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(HARNESS / name, tmp_path / name)
    done = subprocess.run([npm, "ci", "--dry-run", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Missing:" not in done.stderr
