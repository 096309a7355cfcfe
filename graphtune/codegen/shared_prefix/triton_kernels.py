"""Triton fused suffix attention + merge for shared-prefix (Hydragen) decode and append.

The prefix part of the decomposition is an ordinary (folded-query) attention-with-LSE; what
remains per row is its own short suffix *and* the merge with the prefix result. This kernel does
both in one pass: each program starts its online softmax from the merged prefix state
``(o_p, lse_p)`` — one virtual key block of log-weight ``lse_p``, i.e. ``m = lse_p``, ``l = 1``,
``acc = o_p`` — then streams the row's suffix keys (ragged lengths, bottom-right causal for
``Lq > 1``). No separate suffix output, no separate merge launch.

A program covers one (row, kv head) and ``BLOCK_M`` of its ``G * Lq`` query rows: the GQA group
is folded into M, so decode (``Lq = 1``) with group 4 still fills a 16-row tile 25%, not 6%.

Layout: kernel -> config space + prune -> launcher -> public op -> registry -> compile spec.
On CPU the kernel runs only in the interpreter (``TRITON_INTERPRET=1`` before triton's import).
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
from graphtune.codegen.shared_prefix.decompose import suffix_merge_ref  # torch-only, one way
from graphtune.codegen.triton_blocks import (LOG2E, jit_deps, online_softmax_step, softmax_epilogue, softmax_init,
                                             softmax_init_from_lse)
from graphtune.codegen.triton_util import interpreting, kernel_for
from graphtune.errors import KernelError, ShapeError
from graphtune.ir.args import AttentionArgs, softmax_scale

__all__ = [
    "suffix_merge",
    "suffix_merge_configs",
    "prune_suffix_merge_configs",
    "SUFFIX_MERGE_CONFIG_SPACE",
    "SUFFIX_MERGE_DEFAULT_CONFIG",
    "SUFFIX_MERGE_IMPL",
    "suffix_merge_compile_spec",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ======================================================================================
# Kernel
# ======================================================================================


@triton.jit
def _suffix_merge_kernel(
    Q, K, V, LENS, PO, PLSE, O, LSE, M,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_pm, stride_pd,
    stride_plb, stride_plh, stride_plm,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hkv, Lq, Ls, D, qk_scale,
    G: tl.constexpr,
    HAS_LENS: tl.constexpr,
    HAS_PRIOR: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0: no mask; 1: bool as int8 (nonzero = attend); 2: additive (natural log)
    F32_DOT: tl.constexpr,  # fp32 inputs, or the interpreter (its bf16/fp16 tl.dot is wrong): exact fp32 dots
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Q, PO, O: [B, Hq, Lq, D]; K, V: [B, Hkv, Ls, D]; PLSE, LSE: [B, Hq, Lq] fp32; LENS: [B] int32;
    # M: the suffix mask broadcast to [B, Hq, Lq, Ls] (zero strides where it broadcasts)
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv

    # -- rows of this program: r = g * Lq + i (GQA group folded into M) ---------------------
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    g = r // Lq
    i = r % Lq
    row_ok = r < G * Lq
    hq = hk * G + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if HAS_LENS:
        n_len = tl.load(LENS + b)
    else:
        n_len = Ls

    # -- start from the prefix state: one virtual block with m = lse_p (log2), l = 1, acc = o_p
    if HAS_PRIOR:
        pl = tl.load(PLSE + b * stride_plb + hq * stride_plh + i * stride_plm, mask=row_ok, other=float("-inf"))
        po_ptrs = PO + b * stride_pb + hq[:, None] * stride_ph + i[:, None] * stride_pm + offs_d[None, :] * stride_pd
        po = tl.load(po_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i, acc = softmax_init_from_lse(po, pl)
    else:
        m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_D)

    # -- stream the row's suffix keys with online softmax (log2 domain) --------------------
    for start_n in range(0, n_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_len
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * qk_scale  # [BLOCK_M, BLOCK_N]
        valid = n_ok[None, :] & row_ok[:, None]
        if CAUSAL:  # bottom-right: query i is token n_len - Lq + i of the suffix
            valid = valid & (offs_n[None, :] <= (n_len - Lq + i)[:, None])
        if MASK_KIND != 0:
            mk = tl.load(M + b * stride_mb + hq[:, None] * stride_mh + i[:, None] * stride_mm
                         + offs_n[None, :] * stride_mn, mask=valid, other=0)
            if MASK_KIND == 1:
                valid = valid & (mk != 0)
            else:
                # additive mask, to the log2 domain. Clamped first so that a finite fill such as
                # finfo.min stays finite there (x log2 e would overflow to -inf and make the row
                # "empty"): a row at one huge fill then averages uniformly, as in SDPA.
                s = s + tl.maximum(mk.to(tl.float32), -2.3e38) * LOG2E
        s = tl.where(valid, s, float("-inf"))
        v_ptrs = V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v_ptrs, n_ok[:, None] & d_ok[None, :], False, "tf32",
                                            F32_DOT)

    # -- epilogue: normalize; rows with no key at all -> out 0, lse -inf ----------------------
    out, lse = softmax_epilogue(m_i, l_i, acc, False)
    tl.store(O + b * stride_ob + hq[:, None] * stride_oh + i[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * stride_lb + hq * stride_lh + i * stride_lm, lse, mask=row_ok)


# ======================================================================================
# Config space and pruning
# ======================================================================================


def _cfg(bm: int, bn: int, w: int, s: int) -> KernelConfig:
    return KernelConfig.make(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn)


SUFFIX_MERGE_CONFIG_SPACE: tuple[KernelConfig, ...] = tuple(
    _cfg(bm, bn, w, s) for bm in (16, 32, 64) for bn in (32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3))
SUFFIX_MERGE_DEFAULT_CONFIG = _cfg(16, 64, 4, 2)


def prune_suffix_merge_configs(configs: Sequence[KernelConfig], rows: int, keys: int, head_dim: int
                               ) -> list[KernelConfig]:
    """Drop configs too big for ``rows = G * Lq`` query rows, ``keys`` suffix keys, ``head_dim``.

    Rules: ``BLOCK_M <= max(16, next_pow2(rows))``; ``BLOCK_N <= max(32, next_pow2(keys))``;
    score + accumulator tiles at most 128 fp32 values per thread; stages > 1 only with more
    than one key block to pipeline. Never empty.
    """
    bd = max(16, triton.next_power_of_2(max(1, head_dim)))
    mcap = max(16, triton.next_power_of_2(max(1, rows)))
    ncap = max(32, triton.next_power_of_2(max(1, keys)))
    keep = []
    for c in configs:
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        if bm > mcap or bn > ncap:
            continue
        if (bm * bn + bm * bd) > 128 * 32 * c.num_warps:
            continue
        if c.num_stages > 1 and keys <= bn:
            continue
        keep.append(c)
    return keep or [SUFFIX_MERGE_DEFAULT_CONFIG]


def _suffix_args(op_args: tuple) -> tuple[AttentionArgs, Tensor | None, Tensor | None, Tensor | None]:
    """``(attention args, lens, prior_out, prior_lse)`` of op ``shared_prefix_suffix_merge``'s arguments
    ``(q, k, v, lens, prior_out, prior_lse, attn_mask, is_causal, scale, enable_gqa)`` (trailing ones optional)."""
    q, k, v, *rest = op_args
    lens, prior_out, prior_lse = (*rest[:3], None, None, None)[:3]
    return AttentionArgs.of((q, k, v, *rest[3:])), lens, prior_out, prior_lse


def _dims(op_args: tuple) -> tuple[int, int, int]:
    a = _suffix_args(op_args)[0]
    G = a.q.shape[1] // a.k.shape[1]
    return G * a.q.shape[2], a.k.shape[2], a.q.shape[3]


def suffix_merge_configs(op_args: tuple) -> list[KernelConfig]:
    """Pruned config space for ``(q, k, v, lens, prior_out, prior_lse, attn_mask, is_causal, scale, enable_gqa)``;
    has the default."""
    keep = prune_suffix_merge_configs(SUFFIX_MERGE_CONFIG_SPACE, *_dims(op_args))
    return keep if SUFFIX_MERGE_DEFAULT_CONFIG in keep else [SUFFIX_MERGE_DEFAULT_CONFIG, *keep]


# ======================================================================================
# Launcher and public op
# ======================================================================================


def suffix_merge(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lens: Tensor | None = None,
    prior: tuple[Tensor, Tensor] | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    config: KernelConfig | None = None,
    fallback: bool = True,
) -> tuple[Tensor, Tensor]:
    """Each row's attention over its own suffix, merged with a prior (prefix) state, in one kernel.

    Parameters
    ----------
    q : ``[B, Hq, Lq, D]``
    k, v : ``[B, Hkv, Ls, D]`` (views into a larger cache are fine: any strides)
    lens : ``[B]`` valid suffix keys per row, or None for all ``Ls``.
    prior : ``(out [B, Hq, Lq, D], lse [B, Hq, Lq] fp32)`` of the keys before the suffix
        (``lse = -inf`` where a row has none), or None.
    attn_mask : extra mask over the suffix keys, bool (True = attend) or additive (q's dtype or
        fp32), broadcastable to ``[B, Hq, Lq, Ls]``; combined with ``lens`` and ``is_causal``.
    is_causal : bottom-right causal inside the suffix (rows need ``lens >= Lq``).
    scale, enable_gqa : as in ``F.scaled_dot_product_attention``.
    config : ``BLOCK_M``, ``BLOCK_N``, warps, stages; default :data:`SUFFIX_MERGE_DEFAULT_CONFIG`.
    fallback : on kernel failure warn and compute with torch; ``False`` raises :class:`KernelError`.

    Returns
    -------
    ``(out [B, Hq, Lq, D] in q.dtype, lse [B, Hq, Lq] fp32)`` over prior keys + suffix.

    Examples
    --------
    >>> import os; os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: run in the interpreter
    '1'
    >>> import torch
    >>> q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16)
    >>> out, lse = suffix_merge(q, k, k, lens=torch.tensor([5, 3]), enable_gqa=True)
    >>> out.shape, lse.shape
    (torch.Size([2, 4, 1, 16]), torch.Size([2, 4, 1]))
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ShapeError(f"suffix_merge: q [B, Hq, Lq, D] and k = v [B, Hkv, Ls, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Lq, D = q.shape
    Hkv, Ls = k.shape[1], k.shape[2]
    if Hq % Hkv or (Hq != Hkv and not enable_gqa):
        raise ShapeError(f"suffix_merge: {Hq} query heads vs {Hkv} kv heads needs enable_gqa=True and a multiple")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ShapeError(f"suffix_merge: dtypes {q.dtype}/{k.dtype}/{v.dtype}; need one of {_DTYPES}")
    if prior is not None and (prior[0].shape != q.shape or prior[1].shape != q.shape[:-1]):
        raise ShapeError(f"suffix_merge: prior must be out {tuple(q.shape)} and lse {tuple(q.shape[:-1])}")
    if lens is not None and lens.shape != (B,):
        raise ShapeError(f"suffix_merge: lens must be [B={B}], got {tuple(lens.shape)}")
    mask, mask_kind = _mask_view(attn_mask, B, Hq, Lq, Ls, q.dtype)
    cfg = config if config is not None else SUFFIX_MERGE_DEFAULT_CONFIG
    G = Hq // Hkv
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    lens32 = lens.to(device=q.device, dtype=torch.int32) if lens is not None else out  # dummy pointer if unused
    mask_ptr, mask_strides = (mask, mask.stride()) if mask is not None else (out, (0, 0, 0, 0))
    po, pl = prior if prior is not None else (out, lse)
    pl = pl.float()
    s = softmax_scale(scale, D)
    grid = (B * Hkv, triton.cdiv(G * Lq, cfg["BLOCK_M"]))
    if B == 0 or Lq == 0:
        return out, lse
    try:
        kernel_for(_suffix_merge_kernel, q.device, "suffix_merge")[grid](
            q, k, v, lens32, po, pl, out, lse, mask_ptr,
            *q.stride(), *k.stride(), *v.stride(), *po.stride(), *pl.stride(), *out.stride(), *lse.stride(),
            *mask_strides, Hkv, Lq, Ls, D, s * LOG2E.value,
            G=G, HAS_LENS=lens is not None, HAS_PRIOR=prior is not None, CAUSAL=bool(is_causal and Lq > 1),
            MASK_KIND=mask_kind,
            F32_DOT=q.dtype == torch.float32 or q.device.type == "cpu",
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=max(16, triton.next_power_of_2(D)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    except Exception as e:  # compile error, OutOfResources, no device/interpreter...
        err = e if isinstance(e, KernelError) else KernelError(f"suffix_merge[{cfg}] failed: {type(e).__name__}: {e}")
        if not fallback:
            raise err from e
        warnings.warn(f"{err}; falling back to the torch path", RuntimeWarning, stacklevel=2)
        return suffix_merge_ref(q, k, v, lens, *(prior or (None, None)), attn_mask, is_causal, scale, enable_gqa)
    return out, lse


def _mask_view(mask: Tensor | None, B: int, Hq: int, Lq: int, Ls: int, dtype: torch.dtype
               ) -> tuple[Tensor | None, int]:
    """The suffix mask as a ``[B, Hq, Lq, Ls]`` view (zero strides where it broadcasts) and its MASK_KIND."""
    if mask is None:
        return None, 0
    want = (B, Hq, Lq, Ls)
    ms = tuple(mask.shape)
    if not 1 <= len(ms) <= 4 or any(m != 1 and m != w for m, w in zip(ms, want[4 - len(ms):])):
        raise ShapeError(f"suffix_merge: attn_mask {ms} does not broadcast to [B, Hq, Lq, Ls] = {want}")
    if mask.dtype == torch.bool:
        mask, kind = mask.view(torch.int8), 1  # same bytes; the kernel tests != 0
    elif mask.dtype in (dtype, torch.float32):
        kind = 2
    else:
        raise ShapeError(f"suffix_merge: attn_mask dtype {mask.dtype} must be bool, float32 or {dtype}")
    return mask.reshape((1,) * (4 - len(ms)) + ms).expand(want), kind


# ======================================================================================
# Registry and cross-compilation spec
# ======================================================================================


def _op_fn(q, k, v, lens=None, prior_out=None, prior_lse=None, attn_mask=None, is_causal=False, scale=None,
           enable_gqa=False, *, config=None):
    prior = None if prior_out is None else (prior_out, prior_lse)
    return suffix_merge(q, k, v, lens, prior, attn_mask, is_causal, scale, enable_gqa, config=config, fallback=False)


def _supports(args: tuple) -> bool:
    a = _suffix_args(args)[0]
    q = a.q
    dev_ok = q.device.type == "cuda" or (q.device.type == "cpu" and interpreting())
    return (dev_ok and q.dtype in _DTYPES and q.dim() == 4 and a.k.dim() == 4
            and (q.shape[1] == a.k.shape[1] or bool(a.enable_gqa)))


SUFFIX_MERGE_IMPL = register_impl(Impl(
    op="shared_prefix_suffix_merge",
    name="triton.shared_prefix_suffix_merge",
    device="cuda",
    fn=_op_fn,
    default=SUFFIX_MERGE_DEFAULT_CONFIG,
    configs=suffix_merge_configs,
    source_hash=source_hash(_suffix_merge_kernel.fn, *jit_deps(_suffix_merge_kernel)),
    supports=_supports,
))


def suffix_merge_compile_spec(op_args: tuple, config: KernelConfig) -> CompileSpec:
    """Launch arguments for ``op_args = (q, k, v, lens, prior_out, prior_lse, attn_mask, is_causal, scale,
    enable_gqa)`` (meta tensors fine; trailing arguments optional)."""
    a, lens, prior_out, _ = _suffix_args(op_args)
    q, k, mask, is_causal = a.q, a.k, a.attn_mask, bool(a.is_causal)
    B, Hq, Lq, D = (int(x) for x in q.shape)
    Hkv, Ls = int(k.shape[1]), int(k.shape[2])
    G = Hq // Hkv
    bd = max(16, triton.next_power_of_2(D))
    qs = (Hq * Lq * D, Lq * D, D, 1)  # contiguous [B, Hq, Lq, D]
    ks = (Hkv * Ls * D, Ls * D, D, 1)
    ls = (Hq * Lq, Lq, 1)
    dt = q.dtype
    mask_kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    mdt = {0: dt, 1: torch.int8, 2: mask.dtype if mask is not None else dt}[mask_kind]
    ms = (0, 0, 0, 0) if mask is None else (0, 0, Ls, 1)  # a [1, 1, Lq, Ls] mask broadcast over rows and heads
    args = (dt, dt, dt, torch.int32, dt, torch.float32, dt, torch.float32, mdt,
            *qs, *ks, *ks, *qs, *ls, *qs, *ls, *ms,
            Hkv, Lq, Ls, D, 0.18)
    kwargs = dict(G=G, HAS_LENS=lens is not None, HAS_PRIOR=prior_out is not None, CAUSAL=is_causal and Lq > 1,
                  MASK_KIND=mask_kind,
                  F32_DOT=dt == torch.float32, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_D=bd)
    rows = G * Lq
    programs = B * Hkv * triton.cdiv(rows, config["BLOCK_M"])
    eff = (rows / (triton.cdiv(rows, config["BLOCK_M"]) * config["BLOCK_M"])) * (D / bd)
    return CompileSpec(_suffix_merge_kernel, args, kwargs, programs=programs, tile_efficiency=eff)


register_compile_spec(SUFFIX_MERGE_IMPL.name, suffix_merge_compile_spec)
