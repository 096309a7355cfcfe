"""Comparing sizes that may be symbolic (``torch.SymInt``) without adding guards.

Real calls see ints. Captured graphs and fake tensors may carry symbolic sizes: comparing those
with ``==`` would add guards from inside a backend (and Dynamo gives the k and v caches distinct
symbols that are equal at run time). So only what is known without guarding counts, in one of two
directions: :func:`size_eq` (known equal) and :func:`size_compat` (not known to differ).

>>> size_eq(3, 3), size_compat(3, 4), shape_compat((2, 3), (2, 3))
(True, False, True)
"""
from __future__ import annotations

from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["size_eq", "size_compat", "shape_eq", "shape_compat"]


def size_eq(a: object, b: object) -> bool:
    """``a == b`` is known (ints, or provable without a guard)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def size_compat(a: object, b: object) -> bool:
    """``a != b`` is not known: sizes that must be equal are accepted unless provably different
    (the op re-checks real sizes on every call, so nothing wrong slips through)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return not bool(statically_known_true(a != b))


def shape_compat(a: tuple, b: tuple) -> bool:
    """Same rank and every dim :func:`size_compat`."""
    return len(a) == len(b) and all(size_compat(x, y) for x, y in zip(a, b))


def shape_eq(a: tuple, b: tuple) -> bool:
    """Same rank and every dim :func:`size_eq`."""
    return len(a) == len(b) and all(size_eq(x, y) for x, y in zip(a, b))
