"""Process-wide tuning for the data path, applied by the edges (client command, daemon).

glibc serves allocations of 128 KiB and more with mmap, and gives freed memory at the top of
the heap back at once: a record-sized buffer per record then costs an mmap, page faults and a
munmap every time. Raising both thresholds keeps such buffers in the heap for reuse.
"""

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def release_free_memory():
    """Give the heap's free pages back to the system (glibc's malloc_trim). The thresholds
    above keep freed records for reuse while data flows; once it stops, they are only memory
    held. Best effort, like tune_allocator."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tune_allocator():
    """Best effort: nothing happens on a C library without mallopt."""
    try:
        # The running program's own symbols include the C library's: no library search.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024)
    ok &= mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024)
    return bool(ok)
