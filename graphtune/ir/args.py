"""Attention arguments by name: :class:`AttentionArgs`, and the one softmax-scale default.

Attention ops take ``(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False)``
(the schema of ``torch.ops.graphtune.attention``, see :mod:`graphtune.ir.ops`). Registry callbacks
(``Impl.fn``, ``supports``, ``configs``, ``default_for``) and runtime selectors receive that tuple;
they convert it once with :meth:`AttentionArgs.of` and read fields by name from then on.

Functions of the attention family that take extra tensors keep one argument order:
``(q, k, v, <family tensors: lens, prior_out, prior_lse, ...>, attn_mask, is_causal, scale,
enable_gqa)``.

Examples
--------
>>> import torch
>>> q = torch.randn(1, 2, 3, 16)
>>> a = AttentionArgs.of((q, q, q, None, True))
>>> a.is_causal, a.scale, a.enable_gqa, a.resolved_scale
(True, None, False, 0.25)
>>> len(a.op_args()), AttentionArgs.of(a.op_args()).op_args() == a.op_args()
(7, True)
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["AttentionArgs", "softmax_scale"]


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """``scale``, or SDPA's default ``1 / sqrt(head_dim)``: the one place that default is computed."""
    return scale if scale is not None else 1.0 / math.sqrt(head_dim)


@dataclass(frozen=True, slots=True, init=False, eq=False)
class AttentionArgs:
    """The arguments of one attention call, in the op schema's order.

    Frozen and slotted; built per call on the dispatch hot path, so the constructor validates
    nothing (the op checks shapes before any implementation sees them). ``of`` takes the op's
    argument tuple of any length 3..7 (missing trailing arguments take the schema defaults),
    keywords, a mapping, or a record (returned as is). Records compare by identity (their fields
    are tensors); compare ``op_args()`` to compare contents.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Tensor | None
    is_causal: bool
    scale: float | None
    enable_gqa: bool

    # placeholder for the signature and docs; replaced below by a faster one with the same parameters
    def __init__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                 scale: float | None = None, enable_gqa: bool = False) -> None:
        raise NotImplementedError  # pragma: no cover

    @classmethod
    def of(cls, args: "Sequence[Any] | Mapping[str, Any] | AttentionArgs" = (), /, **kwargs: Any) -> "AttentionArgs":
        """From an op argument tuple ``(q, k, v[, attn_mask[, is_causal[, scale[, enable_gqa]]]])``
        and/or keywords (or a mapping of them); an :class:`AttentionArgs` is returned unchanged."""
        if type(args) is tuple:
            return cls(*args, **kwargs) if kwargs else cls(*args)
        if isinstance(args, AttentionArgs) and not kwargs:
            return args
        if isinstance(args, Mapping):
            return cls(**args, **kwargs)
        return cls(*args, **kwargs)

    def op_args(self) -> tuple:
        """The op's argument tuple, all seven in schema order."""
        return (self.q, self.k, self.v, self.attn_mask, self.is_causal, self.scale, self.enable_gqa)

    @property
    def resolved_scale(self) -> float:
        """The softmax scale actually applied: ``scale``, or ``1 / sqrt(D)`` with ``D = q.shape[-1]``."""
        return softmax_scale(self.scale, self.q.shape[-1])

    @property
    def mask_kind(self) -> str:
        """``"none"``, ``"bool"`` (True = attend) or ``"additive"`` (a float mask added to the scores)."""
        m = self.attn_mask
        return "none" if m is None else ("bool" if m.dtype == torch.bool else "additive")

    def replace(self, **changes: Any) -> "AttentionArgs":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


_FIELDS = tuple(f.name for f in fields(AttentionArgs))


def _fast_init() -> Any:
    # A frozen dataclass's generated __init__ sets each field through object.__setattr__ (~0.5 µs for
    # seven fields); the slots' own descriptors, bound once, take about half that (measured with timeit).
    sq, sk, sv, sm, sc, ss, sg = (getattr(AttentionArgs, f).__set__ for f in _FIELDS)

    def __init__(self: AttentionArgs, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> None:
        sq(self, q)
        sk(self, k)
        sv(self, v)
        sm(self, attn_mask)
        sc(self, is_causal)
        ss(self, scale)
        sg(self, enable_gqa)

    __init__.__qualname__ = "AttentionArgs.__init__"
    __init__.__doc__ = AttentionArgs.__init__.__doc__
    return __init__


AttentionArgs.__init__ = _fast_init()  # type: ignore[method-assign]
