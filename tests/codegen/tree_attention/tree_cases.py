"""Shared builders of tree-attention test problems (a pool, rows laid out in it, trees) and the fp64 oracle.

Tolerances against the float64 reference computed from the same (rounded) inputs, ``(out atol,
lse atol)``: fp32 -> summation order only (2e-5); fp16 -> P and the output are rounded to 10
mantissa bits (2e-3); bf16 -> 7 bits (2e-2); LSE is accumulated in fp32 everywhere (2e-4 for
16-bit inputs, whose scores are products of rounded values but are summed in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from graphtune.codegen.tree_attention.reference import tree_attention_ref

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-4), torch.bfloat16: (2e-2, 2e-4)}


def parents(n: int, kind: str, g: torch.Generator) -> list[int]:
    """Row-local parents: ``chain``, ``tree`` (one root, random parents), ``forest`` (several roots)."""
    if kind == "chain":
        return list(range(-1, n - 1))
    lo = -1 if kind == "forest" else 0
    return [-1] + [int(torch.randint(lo, j, (), generator=g)) for j in range(1, n)]


def make_case(ctxs, ns, kinds="tree", *, hq=6, hkv=2, d=16, dtype=torch.float32, layout="spaced", seed=0,
              pool="contiguous"):
    """Op arguments ``(q, k, v, kv_start, ctx_len, cu_q, parent)`` for rows of ``ctxs`` context keys and ``ns`` tokens.

    ``layout``: ``"spaced"`` (row ``i`` at ``i * step``, one step: the CPU path batches equal rows),
    ``"packed"`` (rows back to back, uneven), ``"shuffled"`` (rows in reverse order in the pool).
    ``pool``: ``"contiguous"``, ``"layer"`` (one layer of a ``[L, Hkv, S, 2, D]`` buffer: strided
    slots) or ``"slot_major"`` (a ``[S, Hkv, D]`` buffer transposed).
    """
    g = torch.Generator().manual_seed(seed)
    kinds = [kinds] * len(ns) if isinstance(kinds, str) else list(kinds)
    par = [p for n, kd in zip(ns, kinds) for p in parents(n, kd, g)]
    cu = [0]
    for n in ns:
        cu.append(cu[-1] + n)
    sizes = [c + n for c, n in zip(ctxs, ns)]
    if layout == "spaced":
        step = max(sizes) + 3
        starts = [2 + i * step for i in range(len(ns))]
    else:
        order = list(range(len(ns)))[::-1] if layout == "shuffled" else list(range(len(ns)))
        starts, s = [0] * len(ns), 1
        for i in order:
            starts[i], s = s, s + sizes[i] + 1
    S = max(s + z for s, z in zip(starts, sizes)) + 4
    q = torch.randn(hq, cu[-1], d, generator=g).to(dtype)
    if pool == "layer":
        buf = torch.randn(2, hkv, S, 2, d, generator=g).to(dtype)
        k, v = buf[1, :, :, 0], buf[1, :, :, 1]
    elif pool == "slot_major":
        k = torch.randn(S, hkv, d, generator=g).to(dtype).transpose(0, 1)
        v = torch.randn(S, hkv, d, generator=g).to(dtype).transpose(0, 1)
    else:
        k, v = (torch.randn(hkv, S, d, generator=g).to(dtype) for _ in range(2))
    i64 = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return q, k, v, i64(starts), i64(list(ctxs)), i64(cu), i64(par)


def poisoned_case(**kw):
    """:func:`make_case` with every pool slot outside the rows' key ranges set to NaN (reading one shows)."""
    q, k, v, starts, ctxs, cu, par = make_case(**kw)
    used = torch.zeros(k.shape[1], dtype=torch.bool)
    for i in range(len(starts)):
        used[int(starts[i]):int(starts[i] + ctxs[i] + cu[i + 1] - cu[i])] = True
    k[:, ~used], v[:, ~used] = float("nan"), float("nan")
    return q, k, v, starts, ctxs, cu, par


def causal_oracle(args, scale):
    """For chain drafts: per row, bottom-right causal attention over context + chain by torch's SDPA (float64).

    Independent of graphtune's reference: returns ``(out [Hq, T, D] fp64, lse [Hq, T] fp64)``, the LSE
    from ``torch.logsumexp`` of the causally masked scores.
    """
    q, k, v, starts, ctxs, cu, _ = args
    outs, lses = [], []
    for i in range(len(starts)):
        s, c, a, b = int(starts[i]), int(ctxs[i]), int(cu[i]), int(cu[i + 1])
        n = b - a
        qd, kd, vd = q[:, a:b].double(), k[:, s:s + c + n].double(), v[:, s:s + c + n].double()
        causal = torch.ones(n, c + n, dtype=torch.bool).tril(c)  # query j sees keys <= c + j
        outs.append(F.scaled_dot_product_attention(qd[None], kd[None], vd[None], attn_mask=causal, scale=scale,
                                                   enable_gqa=True)[0])
        scores = torch.einsum("hnd,hsd->hns", qd, kd.repeat_interleave(q.shape[0] // k.shape[0], 0)) * scale
        lses.append(torch.logsumexp(scores.masked_fill(~causal, float("-inf")), -1))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def oracle(args, scale=None):
    """The reference in float64 from the same rounded inputs: ``(out fp64, lse fp32)``."""
    q, k, v, *idx = args
    return tree_attention_ref(q.double(), k.double(), v.double(), *idx, scale)


def assert_close(got, want, dtype, what=""):
    out_tol, lse_tol = TOL[dtype]
    o, l = got
    assert o.dtype == dtype and l.dtype == torch.float32, what
    torch.testing.assert_close(o.double(), want[0].double(), atol=out_tol, rtol=0, msg=lambda m: f"{what} out: {m}")
    torch.testing.assert_close(l.double(), want[1].double(), atol=lse_tol, rtol=0, msg=lambda m: f"{what} lse: {m}")
