"""Keeping freed tensor memory in the process, so that each batch does not page-fault it back in.

torch's CPU tensors come from ``malloc``. glibc returns a freed block of more than its mmap
threshold to the kernel at once, and trims the heap top once more than its trim threshold is free,
so a network whose activations are a few MB a batch (a conv VAE at batch 256: 6.4 MB a layer) gets
fresh pages from the kernel on every forward pass and zero-fills them: in a bulk run of 20k 28x28
PNGs through a conv VAE that cost 1.2-1.8 s of system time of a 5-6 s run (measured 2026-12-04,
with ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` set and not, alternately: 3.9-4.7 s
against 5.4-6.2 s). Raising both thresholds keeps up to :data:`TRIM_BYTES` of freed memory mapped.

Bulk runs (:meth:`NeuralEncoder.sharing_cores`) and training call it; loading a model does not:
the HTTP service sets the opposite on purpose (:func:`embedsearch.http.memory.return_large_buffers`,
so that a hostile client's decodes are given back), and must keep it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers of glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (glibc's largest allowed value on 64-bit is 32 MB).
MMAP_BYTES = 32 << 20
#: Freed heap memory kept before glibc gives it back to the kernel.
TRIM_BYTES = 256 << 20

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where there is no glibc
    (macOS, musl) or the user set them through the environment (``MALLOC_*_THRESHOLD_``)."""
    global _done
    if _done:
        return True
    if any(os.environ.get(name) for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    except OSError:
        mallopt = None
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    if not ok:
        log.debug("mallopt refused the thresholds; freed tensor memory goes back to the kernel")
    _done = ok
    return ok
