"""retain_freed_memory: glibc keeps freed large blocks for reuse (a fresh 154 MB tensor was 8x slower to
fill than memory kept on our VMs), and an environment switch leaves the allocator alone. Each case runs in
its own process, since the setting is process-wide and cannot be undone."""

from __future__ import annotations

import platform

import pytest
from conftest import run_isolated

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")


MMAPPED = """
import ctypes
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def mmapped_bytes_of_a_64mib_tensor():
    import torch
    before = libc.mallinfo2().hblkhd
    t = torch.empty(64 * 2**20, dtype=torch.uint8)  # above glibc's 32 MiB mmap threshold
    return libc.mallinfo2().hblkhd - before
"""


@glibc
def test_large_blocks_come_from_the_reusable_heap():
    run_isolated(MMAPPED + """
import dsg_ext
assert mmapped_bytes_of_a_64mib_tensor() >= 64 * 2**20  # glibc's own: a fresh mapping, faulted in anew
assert dsg_ext.retain_freed_memory() is True
assert dsg_ext.retain_freed_memory() is True  # once is enough; again changes nothing
assert mmapped_bytes_of_a_64mib_tensor() == 0
""")


@glibc
def test_the_switch_leaves_the_allocator_alone():
    run_isolated(MMAPPED + """
import os
os.environ["DSG_EXT_RETAIN_MEMORY"] = "0"
import dsg_ext
assert dsg_ext.retain_freed_memory() is False
assert mmapped_bytes_of_a_64mib_tensor() >= 64 * 2**20
""")


def test_the_dsg_command_retains_memory(monkeypatch):
    import dsg_ext.cli as cli
    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["info"]) == 0
    assert calls == [1]
