"""The GPU benchmark script end to end on the CPU (--cpu-smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_bench_gpu_cpu_smoke_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--cpu-smoke", "--out", str(tmp_path / "out"),
         "--work", str(tmp_path / "work")],
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "bench_gpu.json").read_text())
    assert {(r["setup"], r["batch"]) for r in report["results"]} == {("qlora", 1), ("lora-bf16", 1)}
    for row in report["results"]:
        for side in ("baseline", "loratool"):
            assert row[side]["tokens_per_s"] > 0 and row[side]["real_tokens"] > 0
    assert "| tiny | qlora | 1 | loratool |" in (tmp_path / "out" / "bench_gpu.md").read_text()
