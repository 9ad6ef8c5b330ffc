"""Allocator settings that keep an edge device's peak memory low; called once at `mist` / `mist-tuner` start.

glibc raises its mmap threshold after the first large free, after which tensor buffers come from the heap and are
rarely given back. A fixed 128 KiB threshold, measured in the CPU-torch edge environment (bench/edge.py): fine-tuning
800 ViT-B/16 images peaked at 412 MB instead of 481 MB, predicting at 251 MB instead of 255 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD_BYTES = 128 * 1024  # tensors above this get their own mapping, returned to the OS when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def limit_heap_growth() -> bool:
    """Fix glibc's mmap threshold; True when applied. A no-op off glibc or when MALLOC_MMAP_THRESHOLD_ is set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False  # the operator chose a value; glibc has already applied it
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
