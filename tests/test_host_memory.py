"""Training hands freed activations back to the system (loratool/host_memory.py)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from loratool import host_memory

# In a fresh interpreter: free a 24 MiB block (glibc would then raise its mmap threshold to 24 MiB), then
# ask for 16 MiB and count the blocks glibc mapped for it on their own (mallinfo2().hblks).
_PROBE = """
import ctypes, json, sys
from loratool import host_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = host_memory.return_freed_activations() if sys.argv[1] == "set" else None
libc.free(libc.malloc(24 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(16 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"applied": applied, "mapped": mapped, "after_free": libc.mallinfo2().hblks - before}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in host_memory._USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _require_glibc() -> None:
    if sys.platform != "linux":
        pytest.skip("glibc's malloc only")
    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33+")


def test_a_big_block_gets_its_own_mapping_even_after_a_bigger_one_was_freed():
    _require_glibc()
    # Left to itself, glibc serves the 16 MiB from the heap, where freed blocks stay with the process ...
    assert _probe("leave")["mapped"] == 0
    # ... with the fixed threshold it gets its own mapping, returned to the system when freed.
    fixed = _probe("set")
    assert fixed["applied"] == {
        "allocator": "glibc",
        "mmap_threshold": 128 * 1024,
        "trim_threshold": 128 * 1024,
    }
    assert fixed["mapped"] == 1 and fixed["after_free"] == 0


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_a_user_who_tuned_malloc_keeps_their_settings(monkeypatch, name):
    monkeypatch.setenv(name, "65536")
    monkeypatch.setattr(host_memory, "_applied", None)
    assert host_memory.return_freed_activations() is None
