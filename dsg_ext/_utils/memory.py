"""Freed memory kept in the process, so large tensors are not page-faulted in again every iteration.

glibc's malloc hands every block above 32 MiB to ``mmap`` and gives it back to the kernel when it is
freed, so each synthesis iteration on a CPU re-faults (and the kernel zeroes) every large activation
and gradient: on our 2-core VMs that was about half of an EfficientNet-Lite0 iteration (a 154 MB copy:
95 ms fresh, 12 ms into memory kept; docs/synthesis.md). ``retain_freed_memory`` turns glibc's mmap
path off and raises its trim threshold (``mallopt``), so freed blocks are reused; the process then keeps
its peak memory until it exits. The ``dsg`` command calls it at start (``DSG_EXT_RETAIN_MEMORY=0`` leaves
the allocator alone); a library user opts in. Elsewhere than glibc it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_state: Optional[bool] = None


def retain_freed_memory() -> bool:
    """Keep freed memory for reuse (glibc malloc: no mmap blocks, trim only above 2 GiB). Returns whether
    the allocator took the settings; calling it again changes nothing."""
    global _state
    if _state is None:
        _state = False
        if sys.platform.startswith("linux") and os.environ.get("DSG_EXT_RETAIN_MEMORY", "1") != "0":
            try:
                mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return _state
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _state = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _state


def available_memory(device: "str | object" = "cpu") -> Optional[int]:
    """Bytes that can still be allocated on ``device`` without swapping: the GPU's free memory, or the
    kernel's MemAvailable estimate (/proc/meminfo) for the CPU; None where neither can be read."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
