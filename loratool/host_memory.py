"""Peak memory of training on a CPU: hand freed activation buffers back to the operating system.

On a CPU every activation is a malloc'd block. glibc's malloc gives a large request its own mapping, which
goes back to the system when freed, only above a threshold; each time such a block is freed it raises the
threshold to that block's size (up to 32 MiB). After the first training step, nearly every activation of
the next one is below it and comes from the heap instead, where freed blocks are kept for reuse and
fragment between steps of different lengths. On shape b of scripts/bench_train.py that held about 1.4 GiB
more at the peak than the tensors alive at any moment (docs/benchmarks.md has the figures).

Fixing the threshold at glibc's starting value (128 KiB) stops the adjustment: activations get their own
mappings and are returned when freed. The cost is fresh pages for each large activation (the kernel
zeroes them), a few percent of a CPU step at most; the benchmark measures it with everything else.

It must happen early: blocks already freed into the heap keep serving requests of their size, so `loratool
train` sets it before anything heavy is imported (on a GPU it changes little: activations live on the
device). Only glibc on Linux, and never against the user's own MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES settings.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_applied: dict[str, int | str] | None = None


def return_freed_activations() -> dict[str, int | str] | None:
    """Fix glibc's mmap and trim thresholds for this process (once); what was set (for run.json), or None
    when nothing was (not glibc, or the user tuned malloc themselves)."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> dict[str, int | str] | None:
    if sys.platform != "linux" or any(name in os.environ for name in _USER_SETTINGS):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: leave them alone
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, THRESHOLD) != 1:
        return None
    return {"allocator": "glibc", "mmap_threshold": THRESHOLD, "trim_threshold": THRESHOLD}
