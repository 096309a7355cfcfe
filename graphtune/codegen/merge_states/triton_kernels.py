"""Triton ``merge_states``: combine N partial attentions ``(out_i, lse_i)`` over disjoint key sets.

For each row: ``m = max_i lse_i``, ``w_i = exp(lse_i - m)``, ``out = sum_i w_i out_i / sum_i w_i``,
``lse = m + log(sum_i w_i)`` (natural log, fp32). Partials with ``lse = -inf`` (no keys) get
weight 0; a row whose partials are all empty gets ``out = 0``, ``lse = -inf``, exactly like
:func:`graphtune.ir.reference.merge_states_ref`.

One program merges ``BLOCK_R`` rows x the whole (padded) head dim, in two passes over the
partials: the max of the LSEs (tiny), then the weighted sum of the outputs (read once).

Layout: kernel -> config space + prune -> launcher -> public op -> registry -> compile spec.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from graphtune.codegen.compile_spec import CompileSpec, register_compile_spec
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.codegen.triton_blocks import finite_or_zero, jit_deps, lse_merge_epilogue, lse_merge_step
from graphtune.codegen.triton_util import interpreting, kernel_for
from graphtune.errors import KernelError, ShapeError
from graphtune.ir.reference import merge_states_ref

__all__ = [
    "merge_states",
    "merge_states_stacked",
    "merge_configs",
    "prune_merge_configs",
    "MERGE_CONFIG_SPACE",
    "MERGE_DEFAULT_CONFIG",
    "merge_compile_spec",
    "MERGE_IMPL",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ======================================================================================
# Kernel
# ======================================================================================


@triton.jit
def _merge_states_kernel(
    OUTS, LSES, O, LSE_OUT,
    stride_on, stride_or, stride_od,
    stride_ln, stride_lr,
    stride_oor, stride_ood,
    N, R, D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # OUTS: [N, R, D]; LSES: [N, R] fp32; O: [R, D]; LSE_OUT: [R] fp32
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_ok = rows < R
    offs_d = tl.arange(0, BLOCK_D)

    # -- pass 1: running max of the partial LSEs (-inf for empty partials) -----------------
    # pointers advance by one partial per step (64-bit pointer adds: no int32 n * stride overflow)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    lse_ptrs = LSES + rows * stride_lr
    for _ in range(0, N):
        lse_n = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
        m = tl.maximum(m, lse_n.to(tl.float32))
        lse_ptrs += stride_ln
    m_safe = finite_or_zero(m)  # all-empty rows: avoid (-inf) - (-inf)

    # -- pass 2: weights exp(lse_n - m) and the weighted sum of outputs (empty partials weigh 0)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([BLOCK_R], dtype=tl.float32)
    d_ok = offs_d < D
    lse_ptrs = LSES + rows * stride_lr
    o_ptrs = OUTS + rows[:, None] * stride_or + offs_d[None, :] * stride_od
    for _ in range(0, N):
        lse_n = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
        o_n = tl.load(o_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc, denom = lse_merge_step(acc, denom, m_safe, lse_n, o_n, True)
        lse_ptrs += stride_ln
        o_ptrs += stride_on

    # -- epilogue: normalize; all-empty rows -> out 0, lse -inf ---------------------------
    out, lse = lse_merge_epilogue(acc, denom, m_safe)
    tl.store(O + rows[:, None] * stride_oor + offs_d[None, :] * stride_ood, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_OUT + rows, lse, mask=row_ok)


# ======================================================================================
# Config space and pruning
# ======================================================================================


def _cfg(br: int, w: int) -> KernelConfig:
    return KernelConfig.make(num_warps=w, num_stages=1, BLOCK_R=br)


# The loop over partials carries no reuse worth pipelining, so num_stages stays 1. Configs that
# would idle most lanes even at head dim 256 (1 row on 4 or 8 warps) are not in the space.
MERGE_CONFIG_SPACE: tuple[KernelConfig, ...] = tuple(
    _cfg(br, w) for br in (1, 4, 16, 64) for w in (1, 2, 4, 8) if br * 256 >= 128 * w
)
MERGE_DEFAULT_CONFIG = _cfg(4, 4)


def prune_merge_configs(configs: Sequence[KernelConfig], rows: int, head_dim: int) -> list[KernelConfig]:
    """Drop configs that waste threads or registers for ``rows`` x ``head_dim``.

    Rules: ``BLOCK_R <= next_pow2(rows)``; at least 4 elements per thread
    (``BLOCK_R * BLOCK_D >= 128 * num_warps``) except the 1-warp configs; at most 64 fp32
    accumulator values per thread (``BLOCK_R * BLOCK_D <= 2048 * num_warps``). Never empty.
    """
    bd = max(16, triton.next_power_of_2(max(1, head_dim)))
    rcap = triton.next_power_of_2(max(1, rows))
    keep = []
    for c in configs:
        tile = c["BLOCK_R"] * bd
        if c["BLOCK_R"] > rcap:
            continue
        if c.num_warps > 1 and tile < 128 * c.num_warps:
            continue
        if tile > 2048 * c.num_warps:
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c["BLOCK_R"] * bd / c.num_warps)]


def _rows_dim(op_args: tuple) -> tuple[int, int]:
    outs, _ = op_args  # (outs, lses)
    o = outs[0]
    rows = 1
    for s in o.shape[:-1]:
        rows *= int(s)
    return rows, int(o.shape[-1])


def merge_configs(op_args: tuple) -> list[KernelConfig]:
    """Pruned config space for the op arguments ``(outs, lses)``; always contains the default."""
    keep = prune_merge_configs(MERGE_CONFIG_SPACE, *_rows_dim(op_args))
    return keep if MERGE_DEFAULT_CONFIG in keep else [MERGE_DEFAULT_CONFIG, *keep]


# ======================================================================================
# Launcher
# ======================================================================================


def merge_states_stacked(out: Tensor, lse: Tensor, *, config: KernelConfig | None = None,
                         fallback: bool = True) -> tuple[Tensor, Tensor]:
    """Merge partials stacked along dim 0: ``out [N, ..., L, D]``, ``lse [N, ..., L]``.

    Returns ``(out [..., L, D] in out.dtype, lse [..., L] fp32)``. See :func:`merge_states`.
    """
    if out.dim() < 2 or lse.shape != out.shape[:-1] or out.shape[0] == 0:
        raise ShapeError(f"merge_states: stacked out {tuple(out.shape)} and lse {tuple(lse.shape)} must be "
                         f"[N >= 1, ..., D] and [N, ...]")
    if out.dtype not in _SUPPORTED_DTYPES:
        raise ShapeError(f"merge_states: dtype {out.dtype} not supported (fp32, fp16, bf16)")
    if out.device != lse.device:
        raise ShapeError(f"merge_states: out on {out.device} but lse on {lse.device}")
    cfg = config if config is not None else MERGE_DEFAULT_CONFIG
    N, D = out.shape[0], out.shape[-1]
    rest = tuple(out.shape[1:-1])
    o3 = out.reshape(N, -1, D)  # [N, R, D], a view for stacked/contiguous partials
    l2 = lse.reshape(N, -1)  # [N, R]
    if l2.dtype != torch.float32:
        l2 = l2.float()
    R = o3.shape[1]
    res = torch.empty((R, D), dtype=out.dtype, device=out.device)
    res_lse = torch.empty((R,), dtype=torch.float32, device=out.device)
    br = cfg.get("BLOCK_R")
    if not (isinstance(br, int) and br >= 1 and br & (br - 1) == 0):
        raise KernelError(f"merge_states: config {cfg} needs a power-of-two BLOCK_R")
    if R == 0 or D == 0 or N == 0:
        return merge_states_ref(list(out), list(lse))
    try:
        kernel_for(_merge_states_kernel, out.device, "merge_states")[(triton.cdiv(R, br),)](
            o3, l2, res, res_lse,
            *o3.stride(), *l2.stride(), *res.stride(),
            N, R, D,
            BLOCK_R=br, BLOCK_D=max(16, triton.next_power_of_2(D)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    except Exception as e:  # compile error, OutOfResources, no device/interpreter...
        err = e if isinstance(e, KernelError) else KernelError(f"merge_states[{cfg}] failed: {type(e).__name__}: {e}")
        if not fallback:
            raise err from e
        warnings.warn(f"{err}; falling back to the reference merge", RuntimeWarning, stacklevel=2)
        return merge_states_ref(list(out), list(lse))
    return res.reshape(*rest, D), res_lse.reshape(rest)


def merge_states(outs: Sequence[Tensor], lses: Sequence[Tensor], *,
                 config: KernelConfig | None = None, fallback: bool = True) -> tuple[Tensor, Tensor]:
    """Combine N partial attention states over disjoint key sets into one.

    Parameters
    ----------
    outs : sequence of Tensor
        ``N >= 1`` partial outputs, each ``[..., L, D]`` (fp32, fp16 or bf16, same shape).
    lses : sequence of Tensor
        Their natural-log LSEs, each ``[..., L]``; ``-inf`` marks a partial with no keys.
    config : KernelConfig, optional
        ``BLOCK_R`` rows per program and ``num_warps``; default :data:`MERGE_DEFAULT_CONFIG`.
    fallback : bool
        If the kernel fails, warn and return :func:`~graphtune.ir.reference.merge_states_ref`'s
        result; ``False`` raises :class:`~graphtune.errors.KernelError` (for the tuner/runtime).

    Returns
    -------
    out : Tensor
        ``[..., L, D]`` in the dtype of ``outs[0]``; 0 for rows where every partial is empty.
    lse : Tensor
        ``[..., L]`` fp32; ``-inf`` for rows where every partial is empty.

    Examples
    --------
    >>> import os; os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: run in the interpreter
    '1'
    >>> import torch
    >>> from graphtune.codegen.merge_states.triton_kernels import merge_states
    >>> o1, o2 = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    >>> l1, l2 = torch.randn(2, 5), torch.full((2, 5), float("-inf"))
    >>> out, lse = merge_states([o1, o2], [l1, l2])  # partial 2 is empty: result is partial 1
    >>> torch.allclose(out, o1) and torch.allclose(lse, l1)
    True
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ShapeError(f"merge_states: need as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape or l.shape != o.shape[:-1]:
            raise ShapeError(f"merge_states: partial {i} has out {tuple(o.shape)} and lse {tuple(l.shape)}; "
                             f"expected out {tuple(outs[0].shape)} and lse {tuple(outs[0].shape[:-1])}")
    dtype = outs[0].dtype
    # one copy into [N, ..., D]: Triton takes one base pointer, not a list
    out = torch.stack([o if o.dtype == dtype else o.to(dtype) for o in outs])
    lse = torch.stack([l.float() for l in lses])
    return merge_states_stacked(out, lse, config=config, fallback=fallback)


# ======================================================================================
# Registry and cross-compilation spec
# ======================================================================================


def _op_fn(outs, lses, *, config=None):
    return merge_states(outs, lses, config=config, fallback=False)


def _supports(args: tuple) -> bool:
    outs, _ = args  # (outs, lses)
    if len(outs) == 0:
        return False
    o = outs[0]
    dev_ok = o.device.type == "cuda" or (o.device.type == "cpu" and interpreting())
    return dev_ok and o.dtype in _SUPPORTED_DTYPES and o.dim() >= 1


MERGE_IMPL = register_impl(Impl(
    op="merge_states",
    name="triton.merge_states",
    device="cuda",
    fn=_op_fn,
    default=MERGE_DEFAULT_CONFIG,
    configs=merge_configs,
    # the python sources of the kernel and the blocks it calls: same hash compiled or interpreted
    source_hash=source_hash(_merge_states_kernel.fn, *jit_deps(_merge_states_kernel)),
    supports=_supports,
))


def merge_compile_spec(op_args: tuple, config: KernelConfig) -> CompileSpec:
    """Launch arguments of :func:`merge_states` for ``op_args = (outs, lses)`` (meta tensors fine)."""
    outs, _ = op_args
    n = len(outs)
    rows, d = _rows_dim(op_args)
    dtype = outs[0].dtype
    bd = max(16, triton.next_power_of_2(max(1, d)))
    br = config["BLOCK_R"]
    args = (dtype, torch.float32, dtype, torch.float32,
            rows * d, d, 1,  # stacked [N, R, D], contiguous
            rows, 1,
            d, 1,
            n, rows, d)
    programs = triton.cdiv(max(1, rows), br)
    eff = (max(1, rows) / (programs * br)) * (max(1, d) / bd)
    return CompileSpec(_merge_states_kernel, args, dict(BLOCK_R=br, BLOCK_D=bd), programs=programs,
                       tile_efficiency=eff)


register_compile_spec(MERGE_IMPL.name, merge_compile_spec)
