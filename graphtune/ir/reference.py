"""Pure-torch reference implementations of graphtune's ops.

Every kernel (Triton or CPU fast path) is tested against these. They favour clarity and
fp32 accuracy over speed and define the semantics the fast paths must reproduce.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["attention_ref", "merge_states_ref", "causal_mask", "bool_to_additive"]


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
    """Softmax attention with ``F.scaled_dot_product_attention`` semantics, computed in fp32.

    Returns ``(out, lse)``: ``out`` in ``q.dtype`` with shape ``[..., Hq, L, Ev]`` and the
    natural-log log-sum-exp of the scaled, masked scores, fp32 ``[..., Hq, L]``. Rows that
    attend to nothing get ``out = 0`` and ``lse = -inf`` (the convention ``merge_states`` relies on).
    """
    # q: [..., Hq, L, E]  k: [..., Hkv, S, E]  v: [..., Hkv, S, Ev]
    if enable_gqa and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * s  # [..., Hq, L, S]
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        scores = scores.masked_fill(~causal_mask(L, S, q.device, bottom_right), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    lse = torch.logsumexp(scores, dim=-1)  # [..., Hq, L]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe[..., None])
    p = torch.where(torch.isfinite(lse)[..., None], p, torch.zeros_like(p))
    out = torch.matmul(p, v.float())
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
