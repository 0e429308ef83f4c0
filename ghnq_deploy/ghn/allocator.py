"""Keep freed memory in the process for reuse (glibc malloc), for a process that only trains.

A training step allocates and frees activations of tens of MB per op. glibc serves blocks
above its mmap threshold (at most 32 MB) with fresh mmaps and returns freed heap tops to the
OS, so such tensors are page-faulted in again on every op: measured on a 2-core Xeon VM,
one thread, a SiLU over a 32x288x32x32 float32 tensor took 51 ms with the defaults and 28 ms
with this setting. The price: the process's resident memory stays at its peak.
It changes the whole process, so ``ghnq-deploy train`` calls it, not the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1  # mallopt takes a C int
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}  # glibc's (also ends its dynamic threshold)


def _mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        return libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


def keep_freed_memory(enable: bool = True) -> bool:
    """Serve large blocks from the heap and never trim it (``enable=False``: glibc's defaults).

    Returns whether the allocator took the setting (False where the C library has no mallopt).
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    values = {_M_TRIM_THRESHOLD: _KEEP_BYTES, _M_MMAP_MAX: 0} if enable else _DEFAULTS
    took = all(mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in values.items())
    if not enable:
        _trim()  # hand back what the setting kept, so leaving it ends its price too
    return took


def _trim() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass
