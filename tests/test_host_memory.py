"""CPU training hands freed activations back to the system (loratool/host_memory.py)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from loratool import host_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost",
        )
    ]  # fmt: skip


def _glibc():
    if sys.platform != "linux":
        pytest.skip("glibc's malloc only")
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33+")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def test_a_block_above_128_kib_gets_its_own_mapping_even_after_bigger_ones_were_freed(monkeypatch):
    libc = _glibc()
    for name in host_memory._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert host_memory.return_freed_activations() == {
        "allocator": "glibc",
        "mmap_threshold": 128 * 1024,
        "trim_threshold": 128 * 1024,
    }
    # Left to itself, glibc would raise its threshold to 8 MiB here and serve the next 1 MiB from the heap.
    libc.free(libc.malloc(8 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(1 << 20)
    try:
        assert libc.mallinfo2().hblks == before + 1
    finally:
        libc.free(block)
    assert libc.mallinfo2().hblks == before  # and the mapping went back when freed


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_a_user_who_tuned_malloc_keeps_their_settings(monkeypatch, name):
    monkeypatch.setenv(name, "65536")
    assert host_memory.return_freed_activations() is None
