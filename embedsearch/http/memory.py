"""Process-wide memory settings of the long-running service (``embedsearch serve`` applies them)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

#: glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3
#: Buffers of this size or more (decoded images, their bands) are mapped one by one and unmapped when freed.
MMAP_THRESHOLD = 1 << 20


def return_large_buffers() -> bool:
    """Have glibc map every buffer of 1 MB or more on its own, so that freeing it returns the memory.

    Why: after the first large free glibc raises its mmap threshold (up to 32 MB), and from then on
    decoded images come from per-thread malloc arenas, each of which keeps its own peak. Measured
    with benchmarks/hostile.py: 16 attackers took the service to 1.18 GB with one decode at a time;
    520 MB with this. An explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment wins. Returns
    whether the setting was made (False off Linux or when the C library has no mallopt).
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    log.debug("mmap threshold %s", f"set to {MMAP_THRESHOLD} bytes" if done else "left as it was")
    return done
