"""Pure-torch reference implementations of graphtune's ops.

Every kernel (Triton or CPU fast path) is tested against these. They favour clarity and
fp32 accuracy over speed and define the semantics the fast paths must reproduce; the LSE merge
(:func:`merge_lse`, :func:`merge_states_ref`) is also the one torch merge every CPU path calls,
and :func:`additive_mask` the one conversion of SDPA's masks to the additive form.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from graphtune.errors import DTypeError, ShapeError
from graphtune.ir.args import softmax_scale
from graphtune.ir.sizes import size_compat, size_eq

__all__ = ["attention_ref", "merge_states_ref", "merge_lse", "causal_mask", "additive_mask", "sdpa_shapes",
           "FLOAT_DTYPES"]

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_NEG_INF = float("-inf")


def _broadcast(a: Sequence, b: Sequence, what: str) -> tuple:
    """``torch.broadcast_shapes`` that never guards on symbolic sizes; ShapeError naming ``what``."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for i, (x, y) in enumerate(zip(a, b)):
        # symbolic sizes (fake tensors): only a provable difference counts, see graphtune.ir.sizes
        if size_eq(x, 1):
            out.append(y)
        elif size_eq(y, 1) or size_compat(x, y):
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
    if not size_compat(q.shape[-1], k.shape[-1]):
        raise ShapeError(f"attention: q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if not size_compat(k.shape[-2], v.shape[-2]):
        raise ShapeError(f"attention: k has {k.shape[-2]} keys but v has {v.shape[-2]} values")
    qb, kb, vb = tuple(q.shape[:-2]), tuple(k.shape[:-2]), tuple(v.shape[:-2])
    if enable_gqa:
        if q.dim() < 3 or k.dim() < 3 or v.dim() < 3:
            raise ShapeError(f"attention: enable_gqa needs a heads dim (rank >= 3), got ranks "
                             f"{q.dim()}, {k.dim()}, {v.dim()}")
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        for name, h in (("key", hk), ("value", hv)):
            if not size_compat(hq, h) and ((isinstance(h, int) and h == 0) or not size_compat(hq % h, 0)):
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
                not size_eq(m, 1) and not size_compat(m, w) for m, w in zip(ms, want[len(want) - len(ms):])):
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


def additive_mask(attn_mask: Tensor | None, is_causal: bool, q_len: int, kv_len: int, dtype: torch.dtype, *,
                  rank: int = 0, device: torch.device | str | None = None) -> Tensor | None:
    """SDPA's ``attn_mask`` and top-left ``is_causal`` as one additive float mask (None: neither).

    A bool mask (True = attend) becomes ``0`` / ``-inf`` in ``dtype``; a float mask is already
    additive and is kept as it is (its dtype too); causality adds a ``[q_len, kv_len]`` ``0`` /
    ``-inf`` mask in ``dtype``. The result broadcasts like the inputs (to ``[..., q_len, kv_len]``);
    ``rank`` prepends size-1 dims up to that rank (4 for ATen's flash kernel). ``device``: where a
    causal-only mask is made (default: the mask's device, else the CPU).

    >>> additive_mask(torch.tensor([True, False]), True, 2, 2, torch.float32, rank=4).shape
    torch.Size([1, 1, 2, 2])
    """
    out = attn_mask
    if out is not None and out.dtype == torch.bool:
        out = torch.zeros(out.shape, dtype=dtype, device=out.device).masked_fill_(~out, _NEG_INF)
    if is_causal:
        dev = device if device is not None else (out.device if out is not None else "cpu")
        c = torch.zeros((q_len, kv_len), dtype=dtype, device=dev).masked_fill_(~causal_mask(q_len, kv_len, dev),
                                                                            _NEG_INF)
        out = c if out is None else out + c
    if out is not None and out.dim() < rank:
        out = out.reshape((1,) * (rank - out.dim()) + tuple(out.shape))
    return out


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
    s = softmax_scale(scale, q.shape[-1])
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


# -- the LSE merge: the one torch implementation --------------------------------------------


def merge_lse(out: Tensor, lse: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Exact merge of ``N >= 1`` partial attentions stacked along ``dim``; returns ``(out, lse)`` in fp32
    (``out`` in fp64 for fp64 partials).

    ``out``: ``[..., N, ..., L, D]`` (any float dtype), ``lse``: the same without ``D``
    (``0 <= dim < lse.dim()``). The merged LSE is the log-sum-exp of the partials' LSEs, and each
    partial weighs ``exp(lse_i - lse)`` (the weights sum to 1): a constant number of ops whatever
    ``N``. Partials with ``lse = -inf`` (no keys) weigh 0; rows where every partial is empty get
    ``lse = -inf`` and (``-inf - -inf`` is nan, read as weight 0) ``out = 0``.

    >>> o, l = torch.randn(3, 2, 4), torch.tensor([[0.0, float("-inf")]] * 3)
    >>> out, lse = merge_lse(o, l)
    >>> out.shape, lse.tolist(), bool((out[1] == 0).all())
    (torch.Size([2, 4]), [1.0986123085021973, -inf], True)
    """
    lse = lse.float()
    new = torch.logsumexp(lse, dim, keepdim=True)  # -inf where every partial is empty
    w = torch.exp(lse - new).nan_to_num_(nan=0.0)  # [.., N, .., L]; all-empty rows: nan -> 0
    return (w.unsqueeze(-1) * out).sum(dim), new.squeeze(dim)


def merge_states_ref(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact merge of partial attentions over disjoint key sets (:func:`merge_lse` of the stacked lists).

    ``outs[i]``: ``[..., L, D]``; ``lses[i]``: ``[..., L]`` fp32. Returns the attention over the
    union of the key sets (in ``outs[0]``'s dtype) and its fp32 LSE. Partials with ``lse = -inf``
    (no keys) contribute nothing; a row where every partial is empty gets ``out = 0``, ``lse = -inf``.
    """
    dtype = outs[0].dtype
    out, lse = merge_lse(torch.stack([o if o.dtype == dtype else o.to(dtype) for o in outs]),
                         torch.stack([x.float() for x in lses]))
    return out.to(dtype), lse
