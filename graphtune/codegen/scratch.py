"""Reusable per-thread scratch memory for CPU implementations' temporaries.

Why: a fresh multi-megabyte tensor on the CPU comes from ``mmap`` and page-faults on first touch.
Measured on this machine: an ``index_select`` of 20 MB of whole key blocks took 7.4 ms into a new
tensor and 0.43 ms into a reused one (17x). Implementations that copy gathered blocks per call
(PBS's off-diagonal blocks) write into :func:`scratch` views instead.

Rules: a scratch view is only valid until the same thread asks for the same ``name`` again, so
it must never be returned to a caller or kept; each thread has its own buffers (the engine and
tests run models on several threads). A buffer keeps its largest size until :func:`release`: the
memory a call's temporaries peaked at stays held for the next call (at 8K on SmolLM2, PBS holds
~100 MB this way, a layer at density 0.35).

>>> import torch
>>> a = scratch("doc", (2, 3))
>>> a.shape, a.dtype
(torch.Size([2, 3]), torch.float32)
>>> b = scratch("doc", (3,))  # the same memory, reused
>>> b.data_ptr() == a.data_ptr()
True
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["scratch", "release"]

_local = threading.local()


def scratch(name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> Tensor:
    """An uninitialized contiguous ``shape`` tensor backed by this thread's buffer ``name`` (grown as needed)."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    n = 1
    for s in shape:
        n *= int(s)
    key = (name, dtype, torch.device(device))
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        # grow by at least 1.25x: a slowly growing request does not reallocate every call
        size = n if buf is None else max(n, buf.numel() * 5 // 4)
        buf = bufs[key] = torch.empty(size, dtype=dtype, device=device)
    return buf[:n].view(*shape)


def release() -> None:
    """Free this thread's scratch buffers.

    >>> release()
    """
    _local.bufs = {}
