"""Builders of small PBS-attention problems for the Triton kernel's interpreter tests, and their tolerances.

Tolerances against :func:`~graphtune.codegen.pbs_attention.reference.pbs_attention_ref` run on float64
copies of the same (rounded) inputs (it computes in fp32), ``(out atol, lse atol)``: fp32 -> summation
order only (2e-5); fp16 -> P and the output rounded to 10 mantissa bits (2e-3); bf16 -> 7 bits
(2e-2); the LSE is accumulated in fp32 everywhere (2e-4 for 16-bit inputs).
"""
from __future__ import annotations

import torch

from graphtune.codegen.pbs_attention.plan import PBSConfig, PBSPlan, plan_pbs
from graphtune.codegen.pbs_attention.reference import dense_causal_ref, pbs_attention_ref

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-4), torch.bfloat16: (2e-2, 2e-4)}


def make_case(*, batch=2, hq=3, hkv=1, n=117, m=None, d=16, block=16, segment=32, tau=0.5, permute=True,
              dtype=torch.float32, seed=0) -> tuple[tuple, PBSPlan]:
    """``((q, k, v), plan)``: random ``q [B, Hq, m, D]``, ``k, v [B, Hkv, n, D]`` in ``dtype`` and their plan.

    A few heavy keys per head (a shared direction the queries lean towards) keep the selection
    uneven, as in real attention; ``m`` defaults to ``n`` (a whole prefill).
    """
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(batch, hq, m, d, generator=g)
    k = torch.randn(batch, hkv, n, d, generator=g)
    v = torch.randn(batch, hkv, n, d, generator=g)
    u = torch.randn(d, generator=g)
    heavy = torch.rand(batch, hkv, n, generator=g) < 0.05
    k = k + heavy[..., None] * 2.0 * u / u.norm()
    q = q + u / u.norm()
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return (q, k, v), plan_pbs(q, k, PBSConfig(block, segment, tau, permute))


def shuffle_segments(plan: PBSPlan, seed: int = 1) -> None:
    """Write a random permutation within every segment but the last (never off-diagonal) into ``plan.perm``."""
    g = torch.Generator().manual_seed(seed)
    S, n = plan.config.segment, plan.n
    B, hkv, _ = plan.perm.shape
    for s0 in range(0, (n - 1) // S * S, S):
        for b in range(B):
            for h in range(hkv):
                plan.perm[b, h, s0:s0 + S] = s0 + torch.randperm(S, generator=g)


def oracle(qkv: tuple, plan: PBSPlan, scale=None):
    """The reference on float64 copies of the inputs: ``(out, lse)``."""
    q, k, v = (t.double() for t in qkv)
    return pbs_attention_ref(q, k, v, scale=scale, plan=plan)


def dense_oracle(qkv: tuple, scale=None):
    """Dense bottom-right causal attention on float64 copies (what ``tau >= 1`` must give)."""
    q, k, v = (t.double() for t in qkv)
    return dense_causal_ref(q, k, v, scale)


def assert_close(got, want, dtype, what=""):
    out_tol, lse_tol = TOL[dtype]
    o, l = got
    assert o.dtype == dtype and l.dtype == torch.float32, what
    torch.testing.assert_close(o.double(), want[0].double(), atol=out_tol, rtol=0, msg=lambda s: f"{what} out: {s}")
    torch.testing.assert_close(l.double(), want[1].double(), atol=lse_tol, rtol=0, msg=lambda s: f"{what} lse: {s}")
