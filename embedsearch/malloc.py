"""glibc's malloc settings: the two policies embedsearch applies, and which one a process has.

- :func:`return_large_buffers` (the HTTP service): every buffer of 1 MB or more is mapped on its
  own, so that freeing it returns the memory. After the first large free glibc raises its mmap
  threshold (up to 32 MB), and from then on decoded images come from per-thread malloc arenas,
  each of which keeps its own peak. Measured with benchmarks/hostile.py: 16 attackers took the
  service to 1.18 GB with one decode at a time; 520 MB with this.
- :func:`keep_freed_memory` (bulk runs and training): the opposite. A conv VAE's activations (6.4
  MB a layer at batch 256) went back to the kernel after every forward pass and were page-faulted
  in again on the next: in a bulk run of 20k 28x28 PNGs that cost 1.2-1.8 s of system time of a
  5-6 s run (2026-12-04: 3.9-4.7 s against 5.4-6.2 s with the thresholds raised, alternately).

The service's policy wins: once it is applied, :func:`keep_freed_memory` leaves it. A user's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` wins over both. Off Linux (or with a C
library without ``mallopt``) nothing is set and both return False.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers of glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
#: The service: buffers of this size or more are mapped one by one and unmapped when freed.
MMAP_THRESHOLD = 1 << 20
#: Bulk work: blocks up to this size come from the heap (glibc's largest allowed value on 64-bit)...
KEEP_MMAP_BYTES = 32 << 20
#: ... and this much freed heap memory is kept before glibc gives it back to the kernel.
KEEP_TRIM_BYTES = 256 << 20

_policy: str | None = None  # "return" or "keep": what this process applied


def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return None


def policy() -> str | None:
    """Which policy this process applied: "return", "keep" or None."""
    return _policy


def return_large_buffers() -> bool:
    """The service's policy (see the module); whether the setting was made."""
    global _policy
    mallopt = _mallopt()
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    log.debug("mmap threshold %s", f"set to {MMAP_THRESHOLD} bytes" if done else "left as it was")
    if done:
        _policy = "return"
    return done


def keep_freed_memory() -> bool:
    """The bulk policy (see the module), once per process; False where it is not applied."""
    global _policy
    if _policy == "keep":
        return True
    if _policy == "return" or any(os.environ.get(n) for n in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_BYTES):
        _policy = "keep"
        return True
    log.debug("mallopt refused the thresholds; freed tensor memory goes back to the kernel")
    return False
