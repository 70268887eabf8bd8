"""The C allocator's settings for the daemon process (glibc only).

Large payloads (a 64 KiB frame, its bytes, the buffer it was read into) are
allocated and freed by the thousand every second, and they outgrow pymalloc:
they come from glibc's malloc. By default glibc gives the top of its heap back
to the kernel as soon as 128 KiB of it are free, and maps anything of 128 KiB
or more afresh, so under that traffic the heap shrinks and grows on every few
jobs and each regrowth faults its pages in again, zeroed: in a profile of the
64 KiB bench cell that was about 13% of the broker's CPU (README, Figures).
`keep_freed_memory` raises both thresholds once at start-up, so freed blocks
are reused instead; the cost is that up to TRIM_THRESHOLD_BYTES of freed heap
stays in the process's RSS after a burst.

The CLI calls it for `serve`; library users of `Broker` decide for themselves.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Final

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory"]

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

# Free heap kept for reuse before any is given back to the kernel.
TRIM_THRESHOLD_BYTES: Final = 64 * 1024 * 1024
# Blocks below this come from the heap: above max_frame_bytes' default (8 MiB),
# so a frame and its payload are never mapped afresh.
MMAP_THRESHOLD_BYTES: Final = 16 * 1024 * 1024

# glibc's own environment variables: if the operator set either, theirs stand.
_ENVIRONMENT: Final = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds (see the module docstring).

    False, and nothing changed, when this is not glibc on Linux or the
    operator set the thresholds through glibc's environment variables.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent from musl
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first, as setting either
    # turns glibc's own adjustment of both off.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
