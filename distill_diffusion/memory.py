"""Memory of a training run, counted from the models and measured from the process.

Counted, for this process: bytes of the trainable tensors per role (a sharded run's own shards), of their gradients
(the loop frees a role's gradients after its update, so the peak is the largest role's), of the optimizers' states,
and of every frozen weight (base UNet, VAE, text encoders, EMA targets). Measured: the resident set's peak above a
baseline taken before the models load (CUDA's peak allocation where there is a GPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# glibc's mallopt parameters (malloc.h) and the values retain_freed_memory sets: the largest mmap threshold glibc
# accepts (HEAP_MAX_SIZE / 2 on 64-bit), and a trim threshold / top pad far above one step's turnover.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_RETAIN = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))


def retain_freed_memory() -> bool:
    """Let the C allocator keep freed memory for reuse instead of handing it back to the kernel; True if it took.

    Why: a CPU step allocates and frees activations of a few MB hundreds of times. glibc serves blocks above its
    mmap threshold (128 KiB, raised only as large blocks are freed) with fresh mmaps and trims the heap's top back to
    the kernel, so every such buffer is zero-filled page by page again on first touch, a page fault per 4 KiB
    (README, "Benchmarks", and BENCHMARKS.md's lean rows: what that cost here). Raising the mmap threshold to
    32 MiB, the trim threshold to 1 GiB and the top pad to 256 MiB keeps those pages mapped; the price is a resident
    set that does not shrink after a peak. A no-op (False) where the C library is not glibc. Arithmetic is untouched:
    same results, bit for bit."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _RETAIN)


def rss_bytes() -> int:
    """The current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def start_step_peak() -> int:
    """The peak resident set so far, then a new peak starts (Linux: writing 5 to /proc/self/clear_refs resets the
    high-water mark), so :func:`step_peak_rss_bytes` measures the training steps alone, not the set-up (which
    builds full copies before sharding them). Returns the set-up's peak so the overall one is not lost."""
    peak = peak_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return peak


def step_peak_rss_bytes() -> int | None:
    """The resident set's high-water mark since :func:`start_step_peak` (VmHWM), or None where /proc has none."""
    try:
        with open("/proc/self/status") as fh:
            line = next((x for x in fh if x.startswith("VmHWM:")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None


def _nbytes(t: torch.Tensor) -> int:
    """Bytes this process holds of ``t``: its own shard of an FSDP2 (DTensor) tensor."""
    from .sharding import local

    t = local(t)
    return t.numel() * t.element_size()


def counted(models: Any, extras: dict[str, nn.Module], params: dict[str, list[nn.Parameter]],
            optimizers: dict[str, torch.optim.Optimizer],
            nbytes: Callable[[torch.Tensor], int] = _nbytes) -> dict[str, Any]:
    """Bytes of parameters (trainable per role, frozen), gradients and optimizer states, each tensor counted once.

    ``nbytes``: what one tensor costs; the whole tensor here, one rank's shard of it in the memory planner's
    per-GPU figures (:mod:`distill_diffusion.plan`), which thus count with these very rules."""
    modules = [m for m in models.pipe.components.values() if isinstance(m, nn.Module)]
    modules += list(models._nets.values()) + list(extras.values())
    seen: dict[int, int] = {}
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            seen.setdefault(id(t), nbytes(t))
    trainable = {role: sum(nbytes(p) for p in ps) for role, ps in params.items()}
    trainable_ids = {id(p) for ps in params.values() for p in ps}
    frozen = sum(b for i, b in seen.items() if i not in trainable_ids)
    optim = {role: sum(nbytes(v) for st in o.state.values() for v in st.values() if torch.is_tensor(v))
             for role, o in optimizers.items()}
    grads = max(trainable.values(), default=0)
    total = sum(trainable.values()) + frozen + grads + sum(optim.values())
    return {"trainable_bytes": trainable, "frozen_bytes": frozen, "gradient_bytes_peak": grads,
            "optimizer_state_bytes": optim, "total_counted_bytes": total}
