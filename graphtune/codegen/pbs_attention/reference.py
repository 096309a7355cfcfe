"""Pure-torch reference of PBS attention: the plan's selection as a dense mask by original key index.

The oracle every implementation is checked against. Query ``t`` (position ``N - M + t``) of query
block ``i`` sees

* the keys of every selected off-diagonal block (``plan.kv_index[b, h, i, :kv_count]``), mapped
  back to original indices through ``plan.perm``;
* the keys of its own segment up to its position (dense causal diagonal segment).

With ``tau >= 1`` every key of an earlier segment is selected, so the reference equals dense causal
attention for any permutation (tested).
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphtune.codegen.pbs_attention.plan import DEFAULT_CONFIG, PBSConfig, PBSPlan, plan_pbs
from graphtune.ir.args import softmax_scale

__all__ = ["pbs_mask", "pbs_attention_ref", "dense_causal_ref"]


def pbs_mask(plan: PBSPlan) -> Tensor:
    """``[B, Hq, M, N]`` bool: which original keys each query sees under ``plan``."""
    b, S = plan.config.block, plan.config.segment
    B, Hq, nqb, C = plan.kv_index.shape
    M, N, off = plan.m, plan.n, plan.q_offset
    dev = plan.perm.device
    keys = plan.off_diagonal_keys()  # [B, Hq, nqb, C*b] original indices
    valid = (torch.arange(C, device=dev)[:, None] < plan.kv_count[..., None, None].long()).expand(B, Hq, nqb, C, b)
    # pads repeat a valid block's keys with valid=False: add, so a pad never clears a selected key
    blk = torch.zeros(B, Hq, nqb, N, dtype=torch.uint8, device=dev).scatter_add_(
        3, keys, valid.reshape(B, Hq, nqb, C * b).to(torch.uint8)) > 0
    qpos = torch.arange(M, device=dev) + off  # [M]
    kpos = torch.arange(N, device=dev)
    diag = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] // S == qpos[:, None] // S)  # [M, N]
    return blk.repeat_interleave(b, 2)[:, :, :M] | diag


def pbs_attention_ref(q: Tensor, k: Tensor, v: Tensor, pbs: PBSConfig = DEFAULT_CONFIG, scale: float | None = None, *,
                      plan: PBSPlan | None = None) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, M, D] in q.dtype, lse [B, Hq, M] fp32)`` of PBS attention, in fp32, by a dense mask.

    >>> import torch
    >>> q, k, v = torch.randn(1, 2, 200, 16), torch.randn(1, 1, 200, 16), torch.randn(1, 1, 200, 16)
    >>> out, lse = pbs_attention_ref(q, k, v, PBSConfig(block=32, segment=64, tau=1.0))
    >>> ref, _ = dense_causal_ref(q, k, v)
    >>> torch.allclose(out, ref, atol=1e-5)
    True
    """
    if plan is None:
        plan = plan_pbs(q, k, pbs, scale, v)
    G = q.shape[1] // k.shape[1]
    mask = pbs_mask(plan)
    return _masked(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), mask, scale)


def dense_causal_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Dense bottom-right causal attention of the last ``M`` queries over ``N`` keys (fp32), with its LSE."""
    M, N = q.shape[2], k.shape[2]
    G = q.shape[1] // k.shape[1]
    mask = torch.arange(N, device=q.device)[None, :] <= (torch.arange(M, device=q.device) + N - M)[:, None]
    return _masked(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), mask, scale)


def _masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    # q: [B, H, M, D], k/v: [B, H, N, D], mask: broadcastable to [B, H, M, N] bool
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * softmax_scale(scale, q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
    return torch.matmul(p, v.float()).to(q.dtype), lse
