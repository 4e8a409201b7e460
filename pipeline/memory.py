"""The heap of long-lived workers (the stage-1 and refine actors).

glibc raises its mmap threshold after the first large block is freed, so from then on image views, token
batches and masks (0.15-10 MB each) come from the heap, where any small object that outlives them pins the pages
below it: a stage-1 actor reading a 10,000-image group in passes grew to 3.4 GB that way. A fixed threshold keeps
blocks of 128 KiB and more in their own mappings, returned to the system when freed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE = 128 * 1024


def keep_large_blocks_out_of_the_heap() -> bool:
    """Fixes glibc's mmap threshold at 128 KiB for this process. Returns False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to set
        log.debug("mallopt unavailable (%s): the heap keeps its default", name)
        return False
