"""The entry point the engine's verification step calls: :func:`tree_attention`, one per layer, with one plan per step.

CPU tensors run :func:`~graphtune.codegen.tree_attention.cpu.tree_attention_cpu`, CUDA tensors the
Triton kernel (:func:`~graphtune.codegen.tree_attention.triton_kernels.tree_attention_triton`,
imported on first use, so a CPU-only install never imports Triton). Each implementation's default
config, unless ``config`` names one.

Plan once per step, pass it to every layer::

    plan = plan_tree(kv_start, ctx_len, cu_q, parent)      # host work, once
    for layer in layers:
        out, lse = tree_attention(q, k, v, kv_start, ctx_len, cu_q, parent, plan=plan)

Without ``plan=`` the call finds the plan with :func:`~.plan.plan_for` (cached by the identity of the
index tensors), so passing the same four tensors to every layer also plans once.
"""
from __future__ import annotations

from torch import Tensor

from graphtune.codegen.registry import KernelConfig
from graphtune.errors import ShapeError

from graphtune.codegen.tree_attention.plan import TreePlan, ancestor_mask, plan_tree

__all__ = ["tree_attention", "plan_tree", "ancestor_mask", "TreePlan"]


def tree_attention(q: Tensor, k: Tensor, v: Tensor, kv_start, ctx_len, cu_q, parent, scale: float | None = None, *,
                   plan: TreePlan | None = None, config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Speculative-verification attention over a KV pool; returns ``(out [Hq, T, D], lse [Hq, T] fp32)``.

    Parameters
    ----------
    q : Tensor
        ``[Hq, T, D]`` packed queries of all rows (``T = sum n_i``).
    k, v : Tensor
        ``[Hkv, S, D]`` the pool (views fine, unit stride on ``D``); ``Hq % Hkv == 0``, query head
        ``h`` reads kv head ``h // (Hq // Hkv)``.
    kv_start, ctx_len : Tensor or sequence of int
        ``[B]``: row ``i``'s slots ``[kv_start_i, kv_start_i + ctx_len_i)`` are its context, seen by
        all of its queries (``ctx_len_i`` may be 0).
    cu_q : Tensor or sequence of int
        ``[B + 1]``: row ``i``'s queries are ``q[:, cu_q[i]:cu_q[i+1]]``, ``n_i >= 1`` of them: the
        tree root, then the draft tokens in tree order.
    parent : Tensor or sequence of int
        ``[T]`` row-local parent of each token (``-1``: a root; ``parent[j] < j``). Token ``j``'s
        key is at slot ``kv_start_i + ctx_len_i + j``; query ``j`` sees draft key ``m`` iff ``m`` is
        ``j`` or an ancestor of ``j``.
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.
    plan : TreePlan, optional
        ``plan_tree(kv_start, ctx_len, cu_q, parent)``, built once per step (the index arguments are
        then not read; they must be the ones the plan was built from).
    config : KernelConfig, optional
        The implementation's config (``BATCH`` on the CPU; tiles and warps on CUDA).

    Returns
    -------
    out : Tensor
        ``[Hq, T, D]`` in ``q.dtype``.
    lse : Tensor
        ``[Hq, T]`` fp32 natural-log log-sum-exp of each query's scaled scores.

    Examples
    --------
    >>> import torch
    >>> from graphtune.codegen.tree_attention.reference import tree_attention_ref
    >>> q, k, v = torch.randn(6, 5, 16), torch.randn(2, 64, 16), torch.randn(2, 64, 16)
    >>> idx = ([0, 32], [20, 9], [0, 3, 5], [-1, 0, 0, -1, 0])  # a root with two drafts; a chain of 2
    >>> plan = plan_tree(*idx)
    >>> out, lse = tree_attention(q, k, v, *idx, plan=plan)
    >>> torch.allclose(out, tree_attention_ref(q, k, v, *idx)[0], atol=1e-5)
    True
    """
    if q.device.type == "cpu":
        from graphtune.codegen.tree_attention.cpu import CPU_DEFAULT_CONFIG, tree_attention_cpu

        return tree_attention_cpu(q, k, v, kv_start, ctx_len, cu_q, parent, scale, plan=plan,
                                  config=config if config is not None else CPU_DEFAULT_CONFIG)
    if q.device.type == "cuda":
        from graphtune.codegen.tree_attention.triton_kernels import tree_attention_triton

        return tree_attention_triton(q, k, v, kv_start, ctx_len, cu_q, parent, scale, plan=plan, config=config)
    raise ShapeError(f"tree attention: no implementation for device {q.device}")
