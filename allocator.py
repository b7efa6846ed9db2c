"""Keep the memory that a CPU training step frees for the next step (Linux with glibc).

Every step allocates and frees the same activations again, many of them about a megabyte.
glibc's malloc gives freed memory at the top of its heap back to the kernel once a few
megabytes are free (its trim threshold follows the largest block freed), and the next step
takes it back page by page: about 600 page faults a step for config/shakespeare_char_cpu.py,
a step 11.3 ms instead of 9.9 on the 2-core Xeon of the README. PyTorch's CPU tuning guide
suggests another allocator (jemalloc, tcmalloc) for this; two mallopt settings do it with
glibc's own: blocks up to 32 MB come from the heap, and up to 512 MB of freed memory stays
in it. A run's peak memory is the same; the process just keeps it until it ends.

    import allocator
    allocator.keep_freed_memory()   # train.py does this for a run on the CPU
"""

import ctypes
import sys

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold=32 * 2**20, trim_threshold=512 * 2**20):
    """Tell glibc's malloc to keep freed memory; True if it took both settings, False on
    another C library or system (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this Python runs on
        libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts settings and ignores them
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
