"""Keep freed tensor memory in the process instead of handing it back to the OS at every free.

glibc serves allocations above its mmap threshold (128 KiB at start) with fresh ``mmap`` pages and trims
the heap top above 128 KiB of free space. A CPU forward over a knowledge base allocates and frees
megabyte-sized score tensors thousands of times a second, and they can be page-faulted in again each time
(measured on 100 chunks of the MMoE matcher's attention: untuned 7k-100k page faults from run to run, up to
a fifth of the user time spent in the kernel; 8k-10k with the thresholds below; a 40 MiB temporary made 20
times: 204,851 faults untuned, 40,977-81,937 tuned). ``mallopt`` is glibc's own switch; Python has
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
