"""Pure-torch reference of ``tree_attention``: dense masked attention, one row at a time.

Deliberately independent of :mod:`.plan`: the visibility is found by walking each token's parent
chain in plain Python, and the softmax is :func:`graphtune.ir.reference.attention_ref` (fp32, or
fp64 for fp64 inputs) over the row's gathered keys with a boolean mask.
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphtune.errors import PlanError, ShapeError
from graphtune.ir.reference import attention_ref

__all__ = ["tree_attention_ref", "row_visibility"]


def _ints(x) -> list[int]:
    return [int(v) for v in (x.tolist() if isinstance(x, Tensor) else x)]


def row_visibility(ctx: int, parents: list[int]) -> Tensor:
    """bool ``[n, ctx + n]``: query ``j`` of a row sees all ``ctx`` context keys and draft key ``m`` iff
    ``m`` is ``j`` or one of its ancestors (``parents``: the row's row-local parents, ``-1`` for a root).

    >>> row_visibility(2, [-1, 0, 0]).int().tolist()
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]]
    """
    n = len(parents)
    vis = torch.zeros(n, ctx + n, dtype=torch.bool)
    vis[:, :ctx] = True
    for j in range(n):
        m = j
        while m >= 0:  # j, its parent, its grandparent, ... up to a root
            vis[j, ctx + m] = True
            p = parents[m]
            if not -1 <= p < m:
                raise PlanError(f"tree attention: token {m} has parent {p}; need -1 <= parent < {m}")
            m = p
    return vis


def tree_attention_ref(q: Tensor, k: Tensor, v: Tensor, kv_start, ctx_len, cu_q, parent,
                       scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Tree (speculative verification) attention, computed densely per row in fp32 (fp64 for fp64 inputs).

    Parameters
    ----------
    q : Tensor
        ``[Hq, T, D]`` packed queries of all rows.
    k, v : Tensor
        ``[Hkv, S, D]`` the KV pool (``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``).
    kv_start, ctx_len : Tensor or sequence of int
        ``[B]``: row ``i``'s keys start at slot ``kv_start[i]``; its first ``ctx_len[i]`` keys are context.
    cu_q : Tensor or sequence of int
        ``[B + 1]``: row ``i``'s queries are ``q[:, cu_q[i]:cu_q[i+1]]``.
    parent : Tensor or sequence of int
        ``[T]`` row-local parent per token (``-1``: a root); row-local draft token ``j`` has its key at
        slot ``kv_start[i] + ctx_len[i] + j``.
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.

    Returns
    -------
    out : Tensor
        ``[Hq, T, D]`` in ``q.dtype``.
    lse : Tensor
        ``[Hq, T]`` fp32, natural log.

    Examples
    --------
    >>> q, k = torch.randn(4, 3, 8), torch.randn(2, 20, 8)
    >>> out, lse = tree_attention_ref(q, k, k, [0], [10], [0, 3], [-1, 0, 0])
    >>> out.shape, lse.shape
    (torch.Size([4, 3, 8]), torch.Size([4, 3]))
    """
    starts, ctxs, cu, par = _ints(kv_start), _ints(ctx_len), _ints(cu_q), _ints(parent)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ShapeError(f"tree attention: q, k, v must be [H, T, D] and [Hkv, S, D], got ranks "
                         f"{q.dim()}, {k.dim()}, {v.dim()}")
    if len(cu) != len(starts) + 1 or len(ctxs) != len(starts) or cu[0] != 0 or cu[-1] != q.shape[1] \
            or len(par) != q.shape[1]:
        raise PlanError(f"tree attention: B={len(starts)} rows, cu_q {cu[:8]}, T={q.shape[1]}, "
                        f"{len(par)} parents do not agree")
    outs, lses = [], []
    for i, (s, c) in enumerate(zip(starts, ctxs)):
        a, b = cu[i], cu[i + 1]
        vis = row_visibility(c, par[a:b])  # [n, c + n]
        if b <= a or s < 0 or s + c + (b - a) > k.shape[1]:
            raise PlanError(f"tree attention: row {i} (slots {s}..{s + c + b - a}, {b - a} queries) does not fit "
                            f"the pool of {k.shape[1]} slots")
        o, l = attention_ref(q[:, a:b], k[:, s:s + c + b - a], v[:, s:s + c + b - a], vis.to(q.device),
                             scale=scale, enable_gqa=True)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, 1)
