"""Pure-torch reference implementations of graphtune's ops.

Every kernel (Triton or CPU fast path) is tested against these. They favour clarity and
fp32 accuracy over speed and define the semantics the fast paths must reproduce.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphtune.errors import DTypeError, ShapeError

__all__ = ["attention_ref", "merge_states_ref", "causal_mask", "bool_to_additive", "sdpa_shapes", "FLOAT_DTYPES"]

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _differ(a: object, b: object) -> bool:
    # Real calls see ints. Under fake tensors with symbolic sizes only a provable difference counts:
    # comparing SymInts would add guards from inside a backend (and k/v caches get distinct symbols).
    if isinstance(a, int) and isinstance(b, int):
        return a != b
    return bool(statically_known_true(a != b))


def _is_one(a: object) -> bool:
    return a == 1 if isinstance(a, int) else bool(statically_known_true(a == 1))


def _broadcast(a: Sequence, b: Sequence, what: str) -> tuple:
    """``torch.broadcast_shapes`` that never guards on symbolic sizes; ShapeError naming ``what``."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        if _is_one(x):
            out.append(y)
        elif _is_one(y) or not _differ(x, y):
            out.append(x)
        else:
            hint = " (pass enable_gqa=True for grouped-query attention)" if i == n - 1 and what == "q and k" else ""
            raise ShapeError(f"attention: the batch dims of {what} do not broadcast: {tuple(a)} vs {tuple(b)}, "
                             f"dim {i - n}{hint}")
    return tuple(out)


def sdpa_shapes(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, enable_gqa: bool = False
                ) -> tuple[tuple, tuple]:
    """``(score_batch, out_batch)``: the broadcast batch dims of SDPA's scores and output.

    ``F.scaled_dot_product_attention`` broadcasts the dims before ``[L, E]`` like ``matmul``:
    ``scores [*score_batch, L, S]`` from q and k (k's heads repeated to q's first with
    ``enable_gqa``), then ``out [*out_batch, L, Ev]`` with v. The mask must broadcast *into* the
    scores (it never enlarges them). Raises :class:`ShapeError` / :class:`DTypeError` for every
    input SDPA rejects, and for k and v with different key counts (which SDPA does not check).
    A mask of rank 1 (``[S]`` or ``[1]``) is accepted whatever the inputs' rank: SDPA takes it for
    3-D inputs but its 4-D kernels refuse it, though it broadcasts the same way.
    """
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ShapeError(f"attention: q, k, v must have rank >= 2, got {q.dim()}, {k.dim()}, {v.dim()}")
    if not (q.dtype == k.dtype == v.dtype):
        raise DTypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"attention: q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ShapeError(f"attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if _differ(q.shape[-1], k.shape[-1]):
        raise ShapeError(f"attention: q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if _differ(k.shape[-2], v.shape[-2]):
        raise ShapeError(f"attention: k has {k.shape[-2]} keys but v has {v.shape[-2]} values")
    qb, kb, vb = tuple(q.shape[:-2]), tuple(k.shape[:-2]), tuple(v.shape[:-2])
    if enable_gqa:
        if q.dim() < 3 or k.dim() < 3 or v.dim() < 3:
            raise ShapeError(f"attention: enable_gqa needs a heads dim (rank >= 3), got ranks "
                             f"{q.dim()}, {k.dim()}, {v.dim()}")
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        for name, h in (("key", hk), ("value", hv)):
            if _differ(hq, h) and ((isinstance(h, int) and h == 0) or _differ(hq % h, 0)):
                raise ShapeError(f"attention: {hq} query heads is not a multiple of {h} {name} heads")
        kb, vb = kb[:-1] + (hq,), vb[:-1] + (hq,)  # SDPA repeats k/v heads to q's
    score = _broadcast(qb, kb, "q and k")
    out = _broadcast(score, vb, "q, k and v")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype and attn_mask.dtype != torch.float32:
            raise DTypeError(f"attention: attn_mask dtype {attn_mask.dtype} must be bool, float32 or the query "
                             f"dtype {q.dtype}")
        if attn_mask.device != q.device:
            raise ShapeError(f"attention: attn_mask on {attn_mask.device} but q on {q.device}")
        want = (*score, q.shape[-2], k.shape[-2])
        ms = tuple(attn_mask.shape)
        if len(ms) < 1 or len(ms) > len(want) or any(
                not _is_one(m) and _differ(m, w) for m, w in zip(ms, want[len(want) - len(ms):])):
            raise ShapeError(f"attention: attn_mask {ms} does not broadcast to the scores {want} ([..., L, S])")
    return score, out


def causal_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu", bottom_right: bool = False) -> Tensor:
    """Boolean mask (True = attend) of causal attention, ``[q_len, kv_len]``.

    ``bottom_right=False`` is SDPA's ``is_causal`` (query i sees keys ``<= i``);
    ``bottom_right=True`` aligns the last query with the last key, as in decode/append.
    """
    offset = kv_len - q_len if bottom_right else 0
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= i + offset


def bool_to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """SDPA's bool mask (True = attend) as an additive float mask."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    bottom_right: bool = False,
) -> tuple[Tensor, Tensor]:
    """Softmax attention with ``F.scaled_dot_product_attention`` semantics, computed in fp32 (fp64 inputs: fp64).

    Returns ``(out, lse)``: ``out`` in ``q.dtype`` with shape ``[..., Hq, L, Ev]`` and the
    natural-log log-sum-exp of the scaled, masked scores, fp32 ``[..., Hq, L]``. Rows that
    attend to nothing get ``out = 0`` and ``lse = -inf`` (the convention ``merge_states`` relies on).
    """
    # q: [..., Hq, L, E]  k: [..., Hkv, S, E]  v: [..., Hkv, S, Ev]; batch dims broadcast as in SDPA
    _, out_batch = sdpa_shapes(q, k, v, attn_mask, enable_gqa)
    if enable_gqa:
        hq = q.shape[-3]
        k = k.repeat_interleave(hq // k.shape[-3], dim=-3) if k.shape[-3] != hq else k
        v = v.repeat_interleave(hq // v.shape[-3], dim=-3) if v.shape[-3] != hq else v
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1)) * s  # [*score_batch, L, S]
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        scores = scores.masked_fill(~causal_mask(L, S, q.device, bottom_right), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(ct)
    # softmax as max-shift, exp, normalise: exp(scores - lse) would lose the log of the key count
    # in rows at a huge finite fill (finfo.min masks: SDPA averages such a row uniformly)
    m = scores.amax(dim=-1, keepdim=True) if S > 0 else scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no key: all -inf
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p / torch.where(denom > 0, denom, torch.ones_like(denom)), v.to(ct))  # [*out_batch, L, Ev]
    lse = torch.where(denom > 0, m + torch.log(denom), torch.full_like(m, float("-inf"))).squeeze(-1).float()
    if tuple(lse.shape[:-1]) != tuple(out_batch):  # v's batch dims enlarged the output
        lse = lse.expand(*out_batch, L).contiguous()
    return out.to(q.dtype), lse


def merge_states_ref(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact merge of partial attentions over disjoint key sets.

    ``outs[i]``: ``[..., L, D]``; ``lses[i]``: ``[..., L]`` fp32. Returns the attention over the
    union of the key sets and its LSE. Partials with ``lse = -inf`` (no keys) contribute nothing;
    a row where every partial is empty gets ``out = 0``, ``lse = -inf``.
    """
    lse = torch.stack([x.float() for x in lses])  # [N, ..., L]
    o = torch.stack([x.float() for x in outs])  # [N, ..., L, D]
    m = lse.amax(dim=0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe)  # exp(-inf) = 0 for empty partials
    denom = w.sum(dim=0)
    out = (w[..., None] * o).sum(dim=0) / torch.where(denom > 0, denom, torch.ones_like(denom))[..., None]
    new_lse = torch.where(denom > 0, m_safe + torch.log(denom), torch.full_like(m, float("-inf")))
    return out.to(outs[0].dtype), new_lse
