"""Per-head accuracy of a PBS plan against dense causal attention: recall, density, output error.

* **recall**: the fraction of the true (dense, causal) attention mass that falls on keys the plan
  computes, averaged over queries — 1.0 means nothing that mattered was skipped;
* **density**: computed key blocks over causal key blocks (:meth:`~.plan.PBSPlan.density`);
* **rel_err**: ``||out_pbs - out_dense|| / ||out_dense||`` per head (Frobenius over queries), the
  sparse output from the CPU implementation, the dense one from ATen's flash kernel.

:func:`oracle_plan` selects blocks by their true mass (:func:`true_mass`): the ceiling of any
block estimate, for measurements.

Recall is summed per key block (the dense probabilities gathered in the plan's permuted order),
one head and one chunk of queries at a time, so an 8K x 8K score matrix is never held for all
heads at once and no ``[M, N]`` mask is built.

>>> import torch
>>> from graphtune.codegen.pbs_attention.plan import PBSConfig, plan_pbs
>>> q, k, v = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
>>> st = head_stats(q, k, v, plan_pbs(q, k, PBSConfig(block=32, segment=64, tau=1.0)))
>>> [round(x, 4) for x in st.recall[0].tolist()], [round(x, 4) for x in st.rel_err[0].tolist()]
([1.0, 1.0], [0.0, 0.0])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from graphtune.codegen.pbs_attention.cpu import pbs_attention_cpu
from graphtune.codegen.pbs_attention.plan import PBSConfig, PBSPlan, plan_pbs, select_by_mass
from graphtune.ir.args import softmax_scale
from graphtune.ir.ops import flash_cpu

__all__ = ["HeadStats", "head_stats", "kept_mass", "true_mass", "oracle_plan"]


@dataclass
class HeadStats:
    """``[B, Hq]`` tensors: recall, density, rel_err (see the module docstring)."""

    recall: Tensor
    density: Tensor
    rel_err: Tensor

    def summary(self) -> dict[str, float]:
        return {"recall": float(self.recall.mean()), "recall_min": float(self.recall.min()),
                "density": float(self.density.mean()), "rel_err": float(self.rel_err.mean()),
                "rel_err_max": float(self.rel_err.max())}


@torch.no_grad()
def kept_mass(q: Tensor, k: Tensor, plan: PBSPlan, scale: float | None = None, chunk: int = 1024) -> Tensor:
    """``[B, Hq, M]`` dense causal attention mass on the keys ``plan`` computes, per query."""
    B, Hq, M, D = q.shape
    N = k.shape[2]
    G = Hq // k.shape[1]
    b, S = plan.config.block, plan.config.segment
    nkb = -(-N // b)
    sc = softmax_scale(scale, D)
    nqb = plan.q_blocks
    # sel[bb, h, i, j]: query block i computes permuted off-diagonal block j
    valid = (torch.arange(plan.kv_index.shape[-1]) < plan.kv_count[..., None].long()).to(torch.uint8)
    sel = torch.zeros(B, Hq, nqb, nkb, dtype=torch.uint8).scatter_add_(3, plan.kv_index.long(), valid) > 0
    kpos = torch.arange(N)
    out = torch.zeros(B, Hq, M)
    for bb, h, a, e, p in _causal_probs(q, k, sc, max(b, chunk // b * b)):
        qpos = torch.arange(a, e) + N - M
        diag = (kpos[None, :] // S == qpos[:, None] // S)  # own segment (causal already in p)
        dm = (p * diag).sum(-1)
        pp = torch.nn.functional.pad(p.gather(1, plan.perm[bb, h // G][None, :].expand(e - a, N)), (0, nkb * b - N))
        bm = pp.view(e - a, nkb, b).sum(-1)  # [c, nkb] mass per permuted block
        rows = sel[bb, h, torch.arange(a, e) // b]  # [c, nkb]
        out[bb, h, a:e] = dm + (bm * rows).sum(-1)
    return out


def _causal_probs(q: Tensor, k: Tensor, sc: float, chunk: int):
    # yields (batch, query head, a, e, p [e - a, N]): the dense causal softmax of queries a..e-1
    B, Hq, M, _ = q.shape
    N = k.shape[2]
    G = Hq // k.shape[1]
    kpos = torch.arange(N)
    for bb in range(B):
        for h in range(Hq):
            kh = k[bb, h // G].float()
            for a in range(0, M, chunk):
                e = min(M, a + chunk)
                qpos = torch.arange(a, e) + N - M
                s = torch.matmul(q[bb, h, a:e].float(), kh.T) * sc  # [c, N]
                s.masked_fill_(kpos[None, :] > qpos[:, None], float("-inf"))
                yield bb, h, a, e, torch.softmax(s, -1)


@torch.no_grad()
def true_mass(q: Tensor, k: Tensor, perm: Tensor, config: PBSConfig, scale: float | None = None,
              chunk: int = 1024) -> Tensor:
    """``[B, Hq, nqb, nkb]`` each query block's mean dense causal attention mass on each permuted key block."""
    B, Hq, M, D = q.shape
    N = k.shape[2]
    G = Hq // k.shape[1]
    b = config.block
    nkb, nqb = -(-N // b), -(-M // b)
    rows_in = torch.full((nqb,), float(b))
    rows_in[-1] = M - (nqb - 1) * b
    out = torch.zeros(B, Hq, nqb, nkb)
    for bb, h, a, e, p in _causal_probs(q, k, softmax_scale(scale, D), max(b, chunk // b * b)):
        pp = torch.nn.functional.pad(p.gather(1, perm[bb, h // G][None, :].expand(e - a, N)), (0, nkb * b - N))
        out[bb, h].index_add_(0, torch.arange(a, e) // b, pp.view(e - a, nkb, b).sum(-1))
    return out / rows_in[:, None]


@torch.no_grad()
def oracle_plan(q: Tensor, k: Tensor, config: PBSConfig, scale: float | None = None) -> PBSPlan:
    """The plan ``config``'s permutation gets when blocks are ranked by their *true* attention mass.

    Not an implementation (it computes the full softmax): the ceiling any block estimate can reach
    at ``config``'s block size, with the sampled estimator's coverage rule (own segment included).
    """
    plan = plan_pbs(q, k, config, scale)
    count, index = select_by_mass(true_mass(q, k, plan.perm, config, scale), plan.perm, config, k.shape[2], q.shape[2])
    return PBSPlan(config, plan.n, plan.m, plan.perm, count, index)


@torch.no_grad()
def head_stats(q: Tensor, k: Tensor, v: Tensor, plan: PBSPlan, scale: float | None = None,
               chunk: int = 1024) -> HeadStats:
    """Recall, density and output error of ``plan`` per head (``q [B,Hq,M,D]``, ``k, v [B,Hkv,N,D]``)."""
    recall = kept_mass(q, k, plan, scale, chunk).mean(-1)
    o, _ = pbs_attention_cpu(q.float(), k.float(), v.float(), plan.config, scale, plan=plan)
    if q.shape[2] == k.shape[2]:
        r, _ = flash_cpu(q.float(), k.float(), v.float(), None, True, scale)
    else:
        from graphtune.codegen.pbs_attention.reference import dense_causal_ref

        r, _ = dense_causal_ref(q, k, v, scale)
    err = ((o - r.float()) ** 2).sum((-1, -2)).sqrt() / (r.float() ** 2).sum((-1, -2)).sqrt().clamp_min(1e-30)
    return HeadStats(recall, plan.density().cpu(), err)
