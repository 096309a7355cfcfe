"""Tuning keys shared by every op family: where a tuned problem lands in the tuning database.

The key of a tuning record has an *exact* part (``shape_key``: batch bucket, heads, kv heads,
head dims, dtype, mask kind, causality...) and a *bucketed* part searched by distance
(``q_bucket``, ``kv_bucket``: lengths rounded up to powers of two). Batch is bucketed to a power of
two and kept in the exact part: serving batch sizes vary continuously, the winner rarely flips
within a power-of-two band, and a decode kernel tuned for batch 1 says little about batch 64.

Each family's shape class (its ``key.py``: ``op``, ``key()``, ``make_args``, ``meta_args``,
``to_dict``) is named by its :class:`~graphtune.codegen.family.OpFamily` declaration.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphtune.errors import ShapeError

__all__ = ["ShapeKey", "pow2_bucket", "DTYPES", "MASKS", "dtype_name", "check_shape"]

MASKS = ("none", "bool", "additive")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: str | torch.dtype) -> str:
    """``torch.bfloat16`` / ``"bf16"`` -> ``"bfloat16"``."""
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    return str(dtype).removeprefix("torch.")


def pow2_bucket(n: int) -> int:
    """Smallest power of two ``>= n`` (``0 -> 0``): ``17 -> 32``, ``1 -> 1``."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class ShapeKey:
    """Where a shape lands in the tuning database."""

    op: str
    shape_key: str  # exact part
    q_bucket: int
    kv_bucket: int


def check_shape(shape: object, positive: tuple[str, ...], gqa: bool = True) -> None:
    """Validate a frozen shape dataclass in place: positive int fields, heads a multiple of
    kv_heads (``gqa``), a known dtype (normalized to its torch name). Raises :class:`ShapeError`."""
    name = type(shape).__name__
    for f in positive:
        v = getattr(shape, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ShapeError(f"{name}.{f} must be a positive int, got {v!r}")
    if gqa and shape.heads % shape.kv_heads:  # type: ignore[attr-defined]
        raise ShapeError(f"{name}: heads={shape.heads} is not a multiple of kv_heads={shape.kv_heads}")  # type: ignore[attr-defined]
    dt = shape.dtype  # type: ignore[attr-defined]
    if dt not in DTYPES:
        raise ShapeError(f"{name}.dtype {dt!r} is not one of {sorted(DTYPES)}")
    object.__setattr__(shape, "dtype", dtype_name(dt))
