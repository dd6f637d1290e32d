"""glibc malloc settings for a process that allocates and frees the same large tensors at every training step.

By default glibc serves a block of more than 128 KiB (a threshold that grows with use, up to 32 MiB) with its own
mmap and returns it to the kernel when freed, and gives the top of a heap back once 128 KiB of it is free. A
training step allocates its activations and gradients afresh each time, so each step faults every page of them
in again, and the kernel zeroes each page first: a step of the report's small classifier (batch 128 at 32 px,
about 30 ms on one core) took about 1,000 page faults, and 5-15% of its time went to them. Keeping freed memory in
the process (blocks up to 32 MiB from the heap, no trimming below 1 GiB free) ends it; the cost is that a process
keeps up to that much memory it no longer uses, far below what a stage's peak already holds. Elsewhere than glibc
this does nothing."""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's largest (on 64-bit systems)
TRIM_THRESHOLD = 2 ** 30
TOP_PAD = 64 * 2 ** 20


def keep_freed_memory() -> bool:
    """Set glibc's thresholds so that freed blocks stay in the process; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = [mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))]
    return all(accepted)  # each setting tried, whether or not another was refused
