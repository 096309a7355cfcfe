"""Tree attention on the CPU: ATen's flash kernel over each row's keys, the GQA group folded into the queries.

Row ``i``'s keys, context then drafts, are one contiguous range of the pool,
``[kv_start_i, kv_start_i + ctx_len_i + n_i)``, so a row is a single flash call over a view of the
pool with an additive mask that is 0 on the context and the ancestor mask on the draft columns.
The row's queries are folded to ``[Hkv, G * n, D]`` (the ``G = Hq / Hkv`` query heads of a kv
head become query rows), so the kernel reads each kv head's keys once per group rather than once
per query head: 1.2-1.5x at ``n = 4`` (``docs/ops/tree_attention.md``).

Knob ``BATCH`` (the config space):

* ``0``: one masked flash call per row (a row with ``n = 1`` needs no mask);
* ``1`` (default): the plan's :class:`~.plan.RowGroup` s (rows with equal ``ctx_len`` and ``n``,
  evenly spaced ``kv_start``: their keys are one strided view of the pool) run as one call. If the
  rows share one tree (chains of equal length, say) that is one masked call over ``ctx + n`` keys
  with one broadcast mask. Rows with different trees get one masked call with their masks stacked
  (as ``3``) while the stack stays under :data:`STACKED_MASK_BYTES`, else the group is *split*
  (as ``2``): one unmasked call over the contexts, the ``n x n`` draft blocks in plain torch (fp32)
  with each row's ancestor mask, and the one LSE merge (:func:`graphtune.ir.reference.merge_lse`);
* ``2``: groups always split (even when they share a tree);
* ``3``: groups always one masked call; rows with different trees get their own masks, stacked
  ``[r, 1, G*n, ctx + n]`` (built once per plan: ``r * G * n * (ctx + n)`` floats).

Measured on one thread (``docs/ops/tree_attention.md``): stacked masks beat the split by up to
1.3x for distinct trees at small contexts and tie at 2K keys, where the stack would grow to
megabytes per group; hence the budget of the default. The tuner picks per shape.

Masks are built once per plan and key (:meth:`~.plan.TreePlan.memo`), in fp32 (the flash kernel
takes an fp32 mask for every input dtype), so a layer's call builds nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.errors import PlanError, ShapeError
from graphtune.ir.args import softmax_scale
from graphtune.ir.reference import merge_lse

from graphtune.codegen.tree_attention.plan import RowGroup, TreePlan, plan_for

__all__ = ["tree_attention_cpu", "TREE_OP", "CPU_IMPL_NAME", "CPU_DEFAULT_CONFIG", "check_args", "BATCH_MODES",
           "STACKED_MASK_BYTES"]

TREE_OP, CPU_IMPL_NAME = "tree_attention", "cpu.tree_attention"
BATCH_MODES = (0, 1, 2, 3)
CPU_DEFAULT_CONFIG = KernelConfig.make(BATCH=1)
# BATCH=1 stacks per-row masks of a group with distinct trees up to this size, then splits instead
STACKED_MASK_BYTES = 4 << 20
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_args(q: Tensor, k: Tensor, v: Tensor, plan: TreePlan) -> int:
    """Shape checks shared by the implementations (no host sync); returns the GQA group ``G``."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ShapeError(f"tree attention: q [Hq, T, D], k, v [Hkv, S, D], got ranks {q.dim()}, {k.dim()}, {v.dim()}")
    hq, T, d = q.shape
    if k.shape != v.shape or k.shape[2] != d or k.shape[0] == 0 or hq % k.shape[0]:
        raise ShapeError(f"tree attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"tree attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if T != plan.total:
        raise PlanError(f"tree attention: q has {T} tokens, the plan {plan.total}")
    if plan.kv_end > k.shape[1]:
        raise PlanError(f"tree attention: the rows read pool slots up to {plan.kv_end}, the pool has {k.shape[1]}")
    return hq // k.shape[0]


def _rows_view(x: Tensor, kv0: int, step: int, rows: int, lo: int, length: int) -> Tensor:
    """``[rows, Hkv, length, D]`` view of pool ``x [Hkv, S, D]``: row ``r``'s slots ``kv0 + r*step + lo + [0, length)``."""
    sh, ss, sd = x.stride()
    return x.as_strided((rows, x.shape[0], length, x.shape[2]), (step * ss, sh, ss, sd),
                        x.storage_offset() + (kv0 + lo) * ss)


def _row_mask(plan: TreePlan, row: int, G: int, ctx: int) -> Tensor:
    """fp32 additive ``[1, 1, G*n, ctx + n]``: 0 on the context, the ancestor mask on the drafts (memoized)."""
    n, t0 = plan.n(row), plan.cu_q[row]

    def build() -> Tensor:
        m = torch.zeros(G, n, ctx + n)
        m[:, :, ctx:].masked_fill_(~plan.mask[t0:t0 + n, :n], float("-inf"))
        return m.reshape(1, 1, G * n, ctx + n)

    # rows with the same tree and ctx share a mask
    return plan.memo(("cpu.row_mask", G, ctx, plan.parent[t0:t0 + n]), build)


def _group_masks(plan: TreePlan, grp: RowGroup, G: int) -> Tensor:
    """fp32 additive ``[r, 1, G*n, ctx + n]``: each row's :func:`_row_mask` stacked (memoized; ``r (ctx+n) G n`` floats)."""
    return plan.memo(("cpu.group_masks", grp.rows, G),
                     lambda: torch.cat([_row_mask(plan, row, G, grp.ctx) for row in grp.rows]))


def _draft_masks(plan: TreePlan, grp: RowGroup) -> Tensor:
    """fp32 additive ``[r, 1, 1, n, n]`` per-row draft masks of a group (memoized)."""
    def build() -> Tensor:
        tok = torch.tensor(grp.tokens).view(len(grp.rows), grp.n)
        vis = plan.mask[tok][..., :grp.n]  # [r, n, n]
        return torch.zeros(vis.shape).masked_fill_(~vis, float("-inf"))[:, None, None]

    return plan.memo(("cpu.draft_masks", grp.rows), build)


def _tokens(plan: TreePlan, grp: RowGroup) -> Tensor:
    """The group's query tokens as an index tensor (groups whose tokens are not one range; memoized)."""
    return plan.memo(("cpu.tokens", grp.rows), lambda: torch.tensor(grp.tokens))


def _group_q(q: Tensor, plan: TreePlan, grp: RowGroup, hkv: int, G: int) -> Tensor:
    """The group's queries folded: ``[r, Hkv, G*n, D]`` (one copy)."""
    r, n, d = len(grp.rows), grp.n, q.shape[2]
    qs = q[:, grp.t0:grp.t0 + r * n] if grp.t0 >= 0 else q.index_select(1, _tokens(plan, grp))  # [Hq, r*n, D]
    return qs.reshape(hkv, G, r, n, d).permute(2, 0, 1, 3, 4).reshape(r, hkv, G * n, d)


def _put_group(out: Tensor, lse: Tensor, o: Tensor, l: Tensor, plan: TreePlan, grp: RowGroup) -> None:
    """Write a group's folded ``o [r, Hkv, G*n, D]``, ``l [r, Hkv, G*n]`` back to ``out [Hq, T, D]``, ``lse [Hq, T]``."""
    r, n = len(grp.rows), grp.n
    hq, d = out.shape[0], out.shape[2]
    o = o.reshape(r, hq, n, d).transpose(0, 1).reshape(hq, r * n, d)  # [Hq, r*n, D]
    l = l.reshape(r, hq, n).transpose(0, 1).reshape(hq, r * n)
    if grp.t0 >= 0:
        out[:, grp.t0:grp.t0 + r * n] = o
        lse[:, grp.t0:grp.t0 + r * n] = l
    else:
        idx = _tokens(plan, grp)
        out.index_copy_(1, idx, o.to(out.dtype))
        lse.index_copy_(1, idx, l.float())


def _one_row(q, k, v, out, lse, plan, row, G, scale) -> None:
    # one masked flash call over the row's context + draft keys
    hkv, d = k.shape[0], q.shape[2]
    s, c, t0, n = plan.kv_start[row], plan.ctx_len[row], plan.cu_q[row], plan.n(row)
    qf = q[:, t0:t0 + n].reshape(hkv, G * n, d)[None]  # [1, Hkv, G*n, D]
    mask = None if n == 1 else _row_mask(plan, row, G, c)  # n = 1: the root sees every key
    o, l = _FLASH(qf, k[None, :, s:s + c + n], v[None, :, s:s + c + n], 0.0, False, attn_mask=mask, scale=scale)
    out[:, t0:t0 + n] = o.reshape(-1, n, d)
    lse[:, t0:t0 + n] = l.reshape(-1, n)


def _group_masked(q, k, v, out, lse, plan, grp, G, scale) -> None:
    # rows sharing one tree: one masked flash call over r strided row views, one broadcast mask
    r, c, n = len(grp.rows), grp.ctx, grp.n
    qb = _group_q(q, plan, grp, k.shape[0], G)
    kb, vb = (_rows_view(x, grp.kv0, grp.step, r, 0, c + n) for x in (k, v))
    if n == 1:
        mask = None
    elif grp.shared_tree:
        mask = _row_mask(plan, grp.rows[0], G, c)
    else:
        mask = _group_masks(plan, grp, G)
    o, l = _FLASH(qb, kb, vb, 0.0, False, attn_mask=mask, scale=scale)
    _put_group(out, lse, o, l, plan, grp)


def _group_split(q, k, v, out, lse, plan, grp, G, scale) -> None:
    # unmasked flash over the r contexts + the r draft blocks in torch (fp32) + one LSE merge
    r, c, n, hkv = len(grp.rows), grp.ctx, grp.n, k.shape[0]
    qb = _group_q(q, plan, grp, hkv, G)  # [r, Hkv, G*n, D]
    ct = torch.promote_types(q.dtype, torch.float32)
    kd, vd = (_rows_view(x, grp.kv0, grp.step, r, c, n).to(ct) for x in (k, v))  # [r, Hkv, n, D]
    sc = torch.matmul(qb.to(ct), kd.transpose(-1, -2)).mul_(softmax_scale(scale, q.shape[2]))
    sc = sc.view(r, hkv, G, n, n).add_(_draft_masks(plan, grp)).view(r, hkv, G * n, n)
    l2 = torch.logsumexp(sc, -1)  # [r, Hkv, G*n]: finite, every token sees itself
    o2 = torch.matmul(torch.exp(sc.sub_(l2[..., None])), vd)
    if c == 0:
        _put_group(out, lse, o2, l2, plan, grp)
        return
    kb, vb = (_rows_view(x, grp.kv0, grp.step, r, 0, c) for x in (k, v))
    o1, l1 = _FLASH(qb, kb, vb, 0.0, False, scale=scale)
    o, l = merge_lse(torch.stack([o1.to(ct), o2]), torch.stack([l1.to(ct), l2]))
    _put_group(out, lse, o, l, plan, grp)


def _stack_fits(grp: RowGroup, G: int) -> bool:
    return len(grp.rows) * G * grp.n * (grp.ctx + grp.n) * 4 <= STACKED_MASK_BYTES


def tree_attention_cpu(q: Tensor, k: Tensor, v: Tensor, kv_start, ctx_len, cu_q, parent, scale: float | None = None,
                       *, plan: TreePlan | None = None,
                       config: KernelConfig = CPU_DEFAULT_CONFIG) -> tuple[Tensor, Tensor]:
    """Tree (speculative verification) attention on the CPU; registered as ``cpu.tree_attention``.

    Parameters
    ----------
    q : Tensor
        ``[Hq, T, D]`` packed queries (fp32, fp16, bf16 or fp64).
    k, v : Tensor
        ``[Hkv, S, D]`` the KV pool, any strides (views of a larger pool are fine).
    kv_start, ctx_len, cu_q, parent : Tensor or sequence of int
        The step's rows and trees (see :func:`~graphtune.codegen.tree_attention.plan.plan_tree`).
        Not read when ``plan`` is given.
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.
    plan : TreePlan, optional
        ``plan_tree(kv_start, ctx_len, cu_q, parent)``, built once per step; default: looked up
        with :func:`~graphtune.codegen.tree_attention.plan.plan_for`.
    config : KernelConfig
        ``BATCH`` (module docstring).

    Returns
    -------
    out : Tensor
        ``[Hq, T, D]`` in ``q.dtype``.
    lse : Tensor
        ``[Hq, T]`` fp32 natural-log LSE.

    Examples
    --------
    >>> from graphtune.codegen.tree_attention.reference import tree_attention_ref
    >>> q, k, v = torch.randn(4, 7, 16), torch.randn(2, 90, 16), torch.randn(2, 90, 16)
    >>> args = (q, k, v, [0, 40], [30, 20], [0, 4, 7], [-1, 0, 0, 1, -1, 0, 1])  # a tree and a chain
    >>> out, lse = tree_attention_cpu(*args)
    >>> torch.allclose(out, tree_attention_ref(*args)[0], atol=1e-5)
    True
    """
    plan = plan if plan is not None else plan_for(kv_start, ctx_len, cu_q, parent)
    G = check_args(q, k, v, plan)
    if q.device.type != "cpu" or q.dtype not in _CPU_DTYPES:
        raise ShapeError(f"tree attention (cpu): needs CPU tensors of {_CPU_DTYPES}, got {q.dtype} on {q.device}")
    batch = config.get("BATCH", 1)
    if batch not in BATCH_MODES:
        raise ShapeError(f"tree attention (cpu): BATCH={batch} is not one of {BATCH_MODES}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    for grp in plan.groups:
        if batch == 0 or len(grp.rows) == 1:
            for row in grp.rows:
                _one_row(q, k, v, out, lse, plan, row, G, scale)
        elif batch == 3 or (batch == 1 and (grp.shared_tree or _stack_fits(grp, G))):
            _group_masked(q, k, v, out, lse, plan, grp, G, scale)
        else:
            _group_split(q, k, v, out, lse, plan, grp, G, scale)
    return out, lse


# ----------------------------------------------------------------------------------------
# registry: implementation "cpu.tree_attention" of op "tree_attention"
# ----------------------------------------------------------------------------------------

def _op_fn(q, k, v, kv_start, ctx_len, cu_q, parent, scale=None, *, config=CPU_DEFAULT_CONFIG):
    return tree_attention_cpu(q, k, v, kv_start, ctx_len, cu_q, parent, scale, config=config)


def _supports(args: tuple) -> bool:
    q, k, v = args[:3]
    return (q.device.type == "cpu" and q.dtype in _CPU_DTYPES and q.dim() == 3 and k.dim() == 3
            and k.shape == v.shape and k.shape[0] > 0 and q.shape[0] % k.shape[0] == 0 and k.shape[2] == q.shape[2]
            and q.dtype == k.dtype == v.dtype)


def _configs(args: tuple) -> list[KernelConfig]:
    return [KernelConfig.make(BATCH=b) for b in BATCH_MODES]


CPU_IMPL = register_impl(Impl(
    TREE_OP, CPU_IMPL_NAME, "cpu", _op_fn, CPU_DEFAULT_CONFIG, _configs,
    source_hash(tree_attention_cpu, check_args, _rows_view, _row_mask, _group_masks, _draft_masks, _tokens, _group_q, _put_group,
                _one_row, _group_masked, _group_split, _stack_fits, merge_lse, plan_for, f"STACKED={STACKED_MASK_BYTES}"),
    _supports))
