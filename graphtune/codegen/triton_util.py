"""What every Triton kernel module needs to pick compiled vs interpreted execution."""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from graphtune.errors import KernelError

__all__ = ["interpreting", "kernel_for"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


def kernel_for(kernel: Any, device: torch.device, what: str) -> Any:
    """``kernel`` for tensors on ``device``: compiled on CUDA, interpreted on CPU.

    ``@triton.jit`` (ours and Triton's own ``tl.max``/``tl.sum``) picks compiled vs interpreted
    when the module is imported, so CPU runs need ``TRITON_INTERPRET=1`` before triton's import.
    """
    if device.type == "cuda":
        return kernel
    if not interpreting():
        raise KernelError(f"Triton {what} needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
    if isinstance(kernel, JITFunction) or isinstance(tl.standard.max, JITFunction):
        raise KernelError("TRITON_INTERPRET=1 must be set before triton is first imported "
                          "(e.g. at the top of tests/conftest.py)")
    return kernel
