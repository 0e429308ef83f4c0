"""ghn/allocator.py: with the setting on, glibc serves a large tensor from the heap, not a fresh mmap."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from ghnq_deploy.ghn.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                reason="glibc's mallopt / mallinfo2 only")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_bytes() -> int:
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    return mallinfo2().hblkhd


def _mmapped_while_holding(nbytes: int) -> int:
    before = _mmapped_bytes()
    block = torch.empty(nbytes // 4)
    during = _mmapped_bytes()
    del block
    return during - before


_CHECK = """
import sys
sys.path.insert(0, {tests!r})
from test_train_speed_allocator import _mmapped_while_holding
from ghnq_deploy.ghn.allocator import keep_freed_memory
size = 64 * 2**20  # above glibc's largest mmap threshold (32 MB)
assert _mmapped_while_holding(size) >= size  # glibc's defaults: a fresh mmap
assert keep_freed_memory() is True
assert _mmapped_while_holding(size) < size  # kept: from the heap
assert keep_freed_memory(False) is True
# Defaults again. Twice the size: the 64 MB block freed above may still sit free in the heap,
# and glibc hands out a fitting free chunk whatever the setting; a larger one must be mmapped.
assert _mmapped_while_holding(2 * size) >= 2 * size
print("ok")
"""


def test_large_blocks_come_from_the_heap_only_while_the_setting_is_on():
    """In a fresh process: a long test process's heap may already hold a free 64 MB chunk, which
    glibc would hand out whatever the setting, so the behaviour is only measurable from a clean heap."""
    import subprocess
    import sys
    from pathlib import Path

    code = _CHECK.format(tests=str(Path(__file__).resolve().parent))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
