"""bitsandbytes' warning about its fused CPU kernel never reaches the user of a command, on a CPU
with AVX512-BF16 (loratool/model/bnb_cpu.py).

CPUs with AVX512-BF16 are simulated on any CPU (conftest.simulate_avx512bf16): bitsandbytes' own selection
code runs; only its CPU feature check says yes, and its fused kernel is a stand-in that rounds like it.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, smoke_recipe, write_recipe
from helpers.bnb_cpu import SMOKE
from loratool.model.bnb_cpu import KERNEL_HUB_MESSAGE

# Run first in a fresh interpreter: bitsandbytes' native library says the CPU has AVX512-BF16, and the hub
# kernel cannot be loaded (no `kernels` package), so importing bitsandbytes logs the warning for real.
AS_ON_AVX512BF16 = """
import ctypes, sys
sys.modules["kernels"] = None
_load = ctypes.cdll.LoadLibrary
def _load_as_on_avx512bf16(name):
    lib = _load(name)
    if "bitsandbytes" in str(name):
        lib.has_avx512bf16_cpu = lambda: True
    return lib
ctypes.cdll.LoadLibrary = _load_as_on_avx512bf16
"""


def run_as_on_avx512bf16(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", AS_ON_AVX512BF16 + code], capture_output=True, text=True, cwd=REPO
    )


def test_no_kernel_hub_warning_from_a_command(tmp_path, tiny_llama):
    control = run_as_on_avx512bf16(
        "import bitsandbytes.functional as F\nprint('avx512bf16:', F.has_avx512bf16())"
    )
    assert "avx512bf16: True" in control.stdout
    assert KERNEL_HUB_MESSAGE in control.stderr  # the warning is real here: what the command must not show

    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, SMOKE, tmp_path / "run"))
    argv = ["loratool", "train", str(recipe), "--dry-run"]  # a plain LoRA recipe: bitsandbytes is not used
    command = run_as_on_avx512bf16(f"from loratool.cli import main\nsys.argv = {argv!r}\nmain()")
    assert command.returncode == 0, command.stderr
    assert "resolved recipe:" in command.stdout
    assert "gemm_4bit_forward" not in command.stdout + command.stderr
