"""The entry point the runtime calls: :func:`pbs_attention`, one per layer (each layer plans its own permutation).

CPU tensors run :func:`~graphtune.codegen.pbs_attention.cpu.pbs_attention_cpu` (ATen flash over
gathered blocks), CUDA tensors the Triton kernel
(:func:`~graphtune.codegen.pbs_attention.triton_kernels.pbs_attention_triton`, imported on first
use, so a CPU-only install never imports Triton).
"""
from __future__ import annotations

from torch import Tensor

from graphtune.codegen.pbs_attention.plan import DEFAULT_CONFIG, PBSConfig, PBSPlan, plan_pbs
from graphtune.codegen.registry import KernelConfig
from graphtune.errors import ShapeError

__all__ = ["pbs_attention", "plan_pbs", "PBSConfig", "PBSPlan"]


def pbs_attention(q: Tensor, k: Tensor, v: Tensor, pbs: PBSConfig = DEFAULT_CONFIG, scale: float | None = None, *,
                  plan: PBSPlan | None = None, config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Permuted block-sparse causal prefill attention; returns ``(out [B, Hq, M, D], lse [B, Hq, M] fp32)``.

    Approximate unless ``pbs.tau >= 1`` (then exactly dense causal attention, whatever the
    permutation). Opt-in through the runtime selector (``optimize(model, sparse_prefill="pbs")``).

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, M, D]``: the queries of the last ``M`` positions (``N - M`` a multiple of
        ``pbs.block``; ``M = N`` for a whole prefill).
    k, v : Tensor
        ``[B, Hkv, N, D]``; ``Hq % Hkv == 0`` (GQA: query head ``h`` reads kv head ``h // (Hq/Hkv)``,
        never repeated).
    pbs : PBSConfig
        Block, segment, coverage ``tau``, permutation on/off, sink block.
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.
    plan : PBSPlan, optional
        A plan from :func:`plan_pbs` for these ``q, k`` (then ``pbs`` is not read).
    config : KernelConfig, optional
        The implementation's config (``BUCKET`` on the CPU; tiles and warps on CUDA).

    Returns
    -------
    out : Tensor
        ``[B, Hq, M, D]`` in ``q.dtype``.
    lse : Tensor
        ``[B, Hq, M]`` fp32 natural-log log-sum-exp over the keys each query computed.

    Examples
    --------
    >>> import torch
    >>> from graphtune.codegen.pbs_attention.reference import dense_causal_ref
    >>> q, k, v = torch.randn(1, 4, 512, 32), torch.randn(1, 2, 512, 32), torch.randn(1, 2, 512, 32)
    >>> out, lse = pbs_attention(q, k, v, PBSConfig(block=64, segment=128, tau=1.0))
    >>> torch.allclose(out, dense_causal_ref(q, k, v)[0], atol=1e-5)
    True
    >>> plan = plan_pbs(q, k, PBSConfig(block=64, segment=128, tau=0.8))
    >>> out, lse = pbs_attention(q, k, v, plan=plan)
    >>> float(plan.density().mean()) < 1.0
    True
    """
    if q.device.type == "cpu":
        from graphtune.codegen.pbs_attention.cpu import CPU_DEFAULT_CONFIG, pbs_attention_cpu

        return pbs_attention_cpu(q, k, v, pbs, scale, plan=plan,
                                 config=config if config is not None else CPU_DEFAULT_CONFIG)
    if q.device.type == "cuda":
        from graphtune.codegen.pbs_attention.triton_kernels import pbs_attention_triton

        return pbs_attention_triton(q, k, v, pbs, scale, plan=plan, config=config)
    raise ShapeError(f"PBS attention: no implementation for device {q.device}")
