"""Keep freed tensor memory in the process instead of handing it back to the OS at every free.

glibc serves allocations above its mmap threshold (128 KiB at start) with fresh ``mmap`` pages and trims
the heap top above 128 KiB of free space. A CPU forward over a knowledge base allocates and frees
megabyte-sized score tensors thousands of times a second, so every one of them is page-faulted in again
(measured on the MMoE matcher's attention: 79k page faults and a fifth of the user time as system time per
100 chunks; 8k and almost none with the thresholds below). ``mallopt`` is glibc's own switch; Python has
no binding for it, so it is called through ctypes. Elsewhere (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 2**20  # allocations below this come from the heap and are reused after a free
TRIM_THRESHOLD = 256 * 2**20  # free heap kept before it is returned to the OS


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when they were set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
