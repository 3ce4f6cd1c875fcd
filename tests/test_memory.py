"""distill_diffusion.memory: the allocator setting that keeps freed pages (retain_freed_memory)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A child process (the setting is process-wide and cannot be undone): fill a 24 MiB buffer, free it, then fill a
# 16 MiB one and count that fill's page faults. glibc by default serves the first from a fresh mmap and unmaps it on
# free (raising its mmap threshold), so the second comes from newly grown heap: one fault per 4 KiB page. With freed
# memory retained, the first came from the heap and the second reuses its pages.
CHILD = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from distill_diffusion import memory
took = memory.retain_freed_memory() if sys.argv[1] == "on" else None
torch.empty(6 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(4 << 20).fill_(2.0)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), mode], capture_output=True, text=True,
                       check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    took, faults = r.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    took, retained = _faults("on")
    _, default = _faults("off")
    pages = (16 << 20) // 4096
    assert took == "True"
    assert default > pages // 2, default  # the test's premise: the default policy faults the buffer in again
    assert retained < pages // 20, (retained, default)
