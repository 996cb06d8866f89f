"""Peak resident memory of a call, for the benchmarks (Linux).

The kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``, the
call runs, and the new high-water mark minus the resident size before the call is the
peak extra memory the call needed. Where the reset is not allowed the result is ``None``.
Importing this module fixes glibc's mmap threshold (otherwise it grows after large frees
and freed buffers stay resident, which would count them as live).
"""

from __future__ import annotations

import ctypes
import gc
import re
from collections.abc import Callable
from pathlib import Path

_M_MMAP_THRESHOLD = -3
try:  # a fixed threshold: large buffers are mapped and unmapped, so resident size = live memory
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
except (OSError, AttributeError):
    pass


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Bytes of memory ``fn()`` needed at its peak beyond what was resident before it."""
    gc.collect()
    try:  # give freed heap pages back, so the call cannot reuse them unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
    except OSError:
        fn()
        return None
    result = fn()
    peak = _status("VmHWM")
    del result
    return max(0, peak - before)
