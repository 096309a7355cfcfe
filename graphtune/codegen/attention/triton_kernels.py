"""Triton attention forward with log-sum-exp output (FlashAttention-2 style online softmax).

One program computes ``BLOCK_M`` query rows of one (batch, kv head) against all visible keys,
``BLOCK_N`` keys at a time, keeping a running max ``m``, a running sum ``l`` and an fp32
accumulator. Query heads that share a kv head (GQA) are *folded into rows*: row ``r`` of kv
head ``hk`` is query head ``hk * GROUP + r // L`` at position ``r % L``. For decode (``L = 1``)
this fills a 16-row MMA tile with the group's heads instead of padding 15 of 16 rows, and K/V
are read once per group.

Semantics are exactly :func:`graphtune.ir.reference.attention_ref`: SDPA's ``is_causal``
(top-left) or bottom-right causal alignment, GQA, additive or bool masks broadcastable to
``[B, Hq, L, S]``, head dims up to 256 (non-powers of two padded with masked loads), fp32
accumulation, natural-log fp32 LSE, and ``out = 0, lse = -inf`` for rows that see no key (every
key ``-inf`` or ``False``; a row whose keys all carry one finite fill, e.g. HF's ``finfo.min``, is
SDPA's softmax of scores + fill: the mean of V).

Layout: kernel -> config space + prune -> launcher -> public op ->
registration in :mod:`graphtune.codegen.registry` -> cross-compilation spec.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from graphtune.codegen.compile_spec import CompileSpec, register_compile_spec
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.codegen.triton_blocks import LOG2E, jit_deps, online_softmax_step, softmax_epilogue, softmax_init
from graphtune.codegen.triton_util import interpreting, kernel_for
from graphtune.errors import KernelError, ShapeError
from graphtune.ir.args import AttentionArgs, softmax_scale
from graphtune.ir.ops import broadcast_attention_args
from graphtune.ir.reference import attention_ref

__all__ = [
    "attention_fwd",
    "attention_configs",
    "prune_attention_configs",
    "ATTN_CONFIG_SPACE",
    "ATTN_DEFAULT_CONFIG",
    "attention_default_config",
    "AttnProblem",
    "attention_compile_spec",
    "ATTENTION_IMPL",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


# ======================================================================================
# Kernel
# ======================================================================================


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H_KV, GROUP, L, S, D, DV,
    qk_scale,  # softmax scale, * log2(e) unless MASK_KIND == 1 (scores' domain, see the loop)
    causal_offset,  # key j is visible to query i iff j <= i + causal_offset
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0: none, 1: additive float, 2: bool (True = attend)
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong, fp32 dot of bf16 values is exact
):
    # grid: (B * H_KV, cdiv(GROUP * L, BLOCK_M)); axis 0 is the large one (65535 limit on axis 1)
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    # 64-bit per-program bases: b * stride_b overflows int32 for multi-GB KV caches; per-row
    # offsets below stay 32-bit (GROUP * L * D per kv head < 2^31)
    b = (pid_bh // H_KV).to(tl.int64)
    hk = (pid_bh % H_KV).to(tl.int64)
    h0 = hk * GROUP  # first query head of this kv head's group

    # -- rows of this program: the GQA group is folded into rows ---------------------------
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < GROUP * L
    g = rows // L  # query head of each row, relative to h0
    i_pos = rows % L  # query position of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = Q + b * stride_qb + h0 * stride_qh
    q_ptrs = q_base + g[:, None] * stride_qh + i_pos[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = MASK + b * stride_mb + h0 * stride_mh + g[:, None] * stride_mh + i_pos[:, None] * stride_mm  # [BLOCK_M, 1]

    # online-softmax state (graphtune.codegen.triton_blocks): running max, running sum, fp32 accumulator
    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_DV)

    # -- key range: causal rows never look past their last visible key --------------------
    hi = S
    if IS_CAUSAL:
        i_max = tl.max(tl.where(row_ok, i_pos, 0), 0)
        hi = tl.minimum(tl.maximum(i_max + causal_offset + 1, 0), S)

    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n  # [BLOCK_N] key positions
        col_ok = cols < S
        # -- scores: q @ K^T in fp32, log2 domain ----------------------------------------
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT_UPCAST:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        # -- user mask, broadcast through zero strides ------------------------------------
        # Without an additive mask, scores live in the log2 domain (qk_scale = scale * log2(e)) and
        # exp2 takes them directly. With one, they stay in the natural domain, s * scale + bias as
        # SDPA rounds it: bias * log2(e) overflows to -inf at finfo.min (a row of such fills, SDPA's
        # mean of V, came out empty), and s + fill must round like SDPA's for fills like -1e4.
        # The conversion to log2 then applies to differences from the row max only (always finite).
        if MASK_KIND == 1:
            bias = tl.load(m_base + cols[None, :] * stride_mn, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            qk = qk * qk_scale + bias.to(tl.float32)  # [BLOCK_M, BLOCK_N], natural domain
        else:
            qk = qk * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if MASK_KIND == 2:
            keep = tl.load(m_base + cols[None, :] * stride_mn, mask=row_ok[:, None] & col_ok[None, :], other=0)
            qk = tl.where(keep != 0, qk, float("-inf"))
        # -- out-of-range keys and the causal mask ---------------------------------------
        visible = col_ok[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= i_pos[:, None] + causal_offset)
        qk = tl.where(visible, qk, float("-inf"))
        # -- online softmax: m, l, acc += P @ V; a row that has seen no key keeps m = -inf, l = 0
        # (a row whose keys all carry one finite fill has m = fill, p = 1 per key: not empty)
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd  # [BLOCK_N, BLOCK_DV]
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk, v_ptrs, col_ok[:, None] & (offs_dv[None, :] < DV),
                                            MASK_KIND == 1, DOT_PRECISION, DOT_UPCAST)

    # -- epilogue: normalize; empty rows (every key -inf) -> out 0, lse -inf; natural-log lse --
    out, lse = softmax_epilogue(m_i, l_i, acc, MASK_KIND == 1)
    o_base = O + b * stride_ob + h0 * stride_oh
    o_ptrs = o_base + g[:, None] * stride_oh + i_pos[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b * stride_lb + h0 * stride_lh + g * stride_lh + i_pos * stride_lm, lse, mask=row_ok)


# ======================================================================================
# Problem description, config space and pruning
# ======================================================================================


@dataclass(frozen=True)
class AttnProblem:
    """Static description of one attention call (works from real, fake or meta tensors).

    Rows per (batch, kv head) are ``group * q_len`` because the GQA group is folded into rows.
    """

    batch: int
    hq: int
    hkv: int
    q_len: int
    kv_len: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    mask_kind: int  # 0 none, 1 additive, 2 bool
    is_causal: bool

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def rows(self) -> int:
        return self.group * self.q_len

    @property
    def block_d(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim))

    @property
    def block_dv(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim_v))

    @classmethod
    def from_args(cls, args: tuple) -> "AttnProblem":
        """From the op's argument tuple ``(q, k, v, attn_mask, is_causal, scale, enable_gqa)`` (trailing ones
        optional)."""
        a = AttentionArgs.of(args)
        q, k, v, attn_mask, is_causal = a.q, a.k, a.v, a.attn_mask, bool(a.is_causal)
        qs, ks, vs = tuple(q.shape), tuple(k.shape), tuple(v.shape)
        hq = qs[-3] if len(qs) >= 3 else 1
        hkv = ks[-3] if len(ks) >= 3 else 1
        batch = math.prod(qs[:-3]) if len(qs) > 3 else 1
        kind = 0 if attn_mask is None else (2 if attn_mask.dtype == torch.bool else 1)
        return cls(int(batch), int(hq), int(hkv), int(qs[-2]), int(ks[-2]), int(qs[-1]), int(vs[-1]),
                   q.dtype, kind, is_causal)


def _cfg(bm: int, bn: int, w: int, s: int) -> KernelConfig:
    return KernelConfig.make(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn)


# Full space; prune_attention_configs drops what cannot fit or cannot pay for a given problem.
# 8 warps need >= 2048-element score tiles to give every warp a share; a 128x128 tile with 4
# warps spills at every head dim (sm_80 sweep), so neither is in the space.
ATTN_CONFIG_SPACE: tuple[KernelConfig, ...] = tuple(
    _cfg(bm, bn, w, s)
    for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)
    if (w == 4 and bm * bn < 128 * 128) or (w == 8 and bm * bn >= 2048)
)
# Registry fallback (fp16/bf16 prefill, head dim <= 128); attention_default_config() refines it
# per problem. Resources measured by tests/codegen/test_crosscompile.py, numbers in docs/kernels.md.
ATTN_DEFAULT_CONFIG = _cfg(64, 32, 4, 2)

# Budget for the prune estimates; sm_80's opt-in per-block limit is the tighter of sm_80/sm_90.
_SMEM_LIMIT = 163 * 1024
_REG_BUDGET = 144  # estimated words/thread above which the sweep saw 255 registers or spills
_REG_BUDGET_1STAGE = 100


def _smem_estimate(cfg: KernelConfig, p: AttnProblem) -> int:
    # Fitted to cross-compiled sm_80 fp16 kernels (exact or above for all 137 of a sweep; sm_90's
    # wgmma kernels take up to 50 KiB more, within its 64 KiB larger limit): K and V tiles buffered
    # num_stages - 1 times (one tile at one stage) + the Q operand + the P tile for the second MMA.
    el = 4 if p.dtype == torch.float32 else 2
    bn = cfg["BLOCK_N"]
    s = cfg.num_stages
    kv = bn * max(p.block_d, p.block_dv) if s <= 1 else (s - 1) * bn * (p.block_d + p.block_dv)
    return (kv + cfg["BLOCK_M"] * (p.block_d + bn)) * el


def _reg_estimate(cfg: KernelConfig, p: AttnProblem) -> float:
    # 32-bit words per thread of acc + score tile + Q operand. ptxas needs ~2x this for
    # addresses, softmax state and the K/V operands; the budgets below come from the sm_80 sweep
    # in docs/kernels.md (fp32 has no tensor-core path and counts double).
    el = 4 if p.dtype == torch.float32 else 2
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    vals = bm * p.block_dv + bm * bn + bm * p.block_d * el / 4
    return vals / (32 * cfg.num_warps) * (2 if p.dtype == torch.float32 else 1)


def _reg_budget(cfg: KernelConfig) -> int:
    # without pipelining (1 stage) K/V tiles are loaded through registers: less headroom
    return _REG_BUDGET if cfg.num_stages >= 2 else _REG_BUDGET_1STAGE


def prune_attention_configs(configs: list[KernelConfig] | tuple[KernelConfig, ...], p: AttnProblem,
                            smem_limit: int = _SMEM_LIMIT) -> list[KernelConfig]:
    """Drop configs that cannot fit or cannot pay for problem ``p``.

    Rules: ``BLOCK_M <= max(16, next_pow2(rows))`` (decode: no 128-row tiles for one row);
    ``BLOCK_N <= max(32, next_pow2(kv_len))``; fp32 (FMA dots) only at 1 stage;
    shared-memory estimate (K/V stages + Q + P tiles) within ``smem_limit``; accumulator + score
    tile + Q words per thread within a register budget (tighter at 1 stage). Both estimates are
    fitted to cross-compiled sm_80 kernels (docs/kernels.md). Never returns an empty list.
    """
    rows_cap = max(16, triton.next_power_of_2(max(1, p.rows)))
    n_cap = max(32, triton.next_power_of_2(max(1, p.kv_len)))
    keep = []
    for c in configs:
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        if bm > rows_cap or bn > n_cap:
            continue
        if p.dtype == torch.float32 and c.num_stages > 1:
            continue  # fp32 FMA dots: pipelined variants spill on sm_90 at D >= 128 (docs/kernels.md)
        if _smem_estimate(c, p) > smem_limit or _reg_estimate(c, p) > _reg_budget(c):
            continue
        keep.append(c)
    if not keep:
        keep = [min(configs, key=lambda c: (_reg_estimate(c, p), _smem_estimate(c, p)))]
    return keep


def attention_default_config(op_args: tuple) -> KernelConfig:
    """Untuned fallback for these op arguments, chosen from cross-compiled sm_80/sm_90 resources.

    16-bit: 64x64 tiles up to head dim 64, 64x32 up to 128, 8 warps at 256 (4 warps spill on
    sm_80); decode (<= 16 folded rows) uses 16-row tiles. fp32 runs IEEE FMA dots with no tensor
    cores and needs small 1-stage tiles to stay spill-free on both sm_80 and sm_90. Always a member
    of :data:`ATTN_CONFIG_SPACE`.
    """
    p = AttnProblem.from_args(op_args)
    d = max(p.block_d, p.block_dv)
    if p.dtype == torch.float32:
        return _cfg(16, 32, 4, 1)
    if p.rows <= 16:
        return _cfg(16, 64 if d <= 128 else 32, 4, 2)
    if d <= 64:
        return _cfg(64, 64, 4, 2)
    if d <= 128:
        return _cfg(64, 32, 4, 2)
    return _cfg(64, 32, 8, 2)


def attention_configs(op_args: tuple) -> list[KernelConfig]:
    """Pruned config space for the op arguments ``(q, k, v, attn_mask, is_causal, scale, enable_gqa)``.

    Always contains :func:`attention_default_config` of the arguments (the tuning baseline).
    """
    keep = prune_attention_configs(ATTN_CONFIG_SPACE, AttnProblem.from_args(op_args))
    default = attention_default_config(op_args)
    return keep if default in keep else [default, *keep]


# ======================================================================================
# Launcher
# ======================================================================================


def _to_4d(t: Tensor) -> Tensor:
    # [..., H, L, D] -> [B, H, L, D]; a view whenever the leading dims allow it
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[None]
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:])


def _mask_4d(mask: Tensor, batch_shape: tuple, hq: int, L: int, S: int) -> Tensor:
    # broadcast to [*batch, Hq, L, S] (zero strides, no copy) then to 4d
    full = mask.expand(*batch_shape, hq, L, S)
    return _to_4d(full) if full.dim() != 4 else full


def _launch(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float,
            causal_offset: int, cfg: KernelConfig) -> tuple[Tensor, Tensor]:
    # q: [B, Hq, L, D]  k: [B, Hkv, S, D]  v: [B, Hkv, S, Dv]  mask: [B, Hq, L, S] or None
    B, Hq, L, D = q.shape
    Hkv, S, DV = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    o = torch.empty((B, Hq, L, DV), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if B * Hq * L == 0:
        return o, lse
    if mask is None:
        mask_kind, mask_t, ms = 0, q, (0, 0, 0, 0)  # dummy pointer, never read
    else:
        # bool -> uint8 has the same itemsize: a view at any strides (broadcast zeros kept)
        mask_t = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_kind, ms = (2 if mask.dtype == torch.bool else 1), tuple(mask_t.stride())
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (B * Hkv, triton.cdiv(group * L, bm))
    kernel = kernel_for(_attn_fwd_kernel, q.device, "attention")
    kernel[grid](
        q, k, v, mask_t, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *ms, *o.stride(), *lse.stride(),
        Hkv, group, L, S, D, DV,
        scale if mask_kind == 1 else scale * LOG2E.value, causal_offset,  # additive masks: natural domain
        BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
        IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


# ======================================================================================
# Public op
# ======================================================================================


def _check_supported(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ShapeError(f"attention_fwd: dtype {q.dtype} not supported (fp32, fp16, bf16)")
    if q.shape[-1] > _MAX_HEAD_DIM or v.shape[-1] > _MAX_HEAD_DIM:
        raise ShapeError(f"attention_fwd: head dims {q.shape[-1]}/{v.shape[-1]} exceed {_MAX_HEAD_DIM}")
    if not (q.device == k.device == v.device):
        raise ShapeError(f"attention_fwd: q, k, v on different devices ({q.device}, {k.device}, {v.device})")


def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    causal_bottom_right: bool = False,
    config: KernelConfig | None = None,
    fallback: bool = True,
) -> tuple[Tensor, Tensor]:
    """Attention forward with log-sum-exp, as one Triton kernel.

    Parameters
    ----------
    q, k, v : Tensor
        ``[..., Hq, L, D]``, ``[..., Hkv, S, D]``, ``[..., Hkv, S, Dv]``; fp32, fp16 or bf16,
        any strides. ``D, Dv <= 256``.
    attn_mask : Tensor, optional
        Additive (query dtype) or bool (True = attend) mask broadcastable to ``[..., Hq, L, S]``.
    is_causal : bool
        Causal masking; top-left aligned (SDPA) unless ``causal_bottom_right``.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    enable_gqa : bool
        Allow ``Hq`` to be a multiple of ``Hkv`` (grouped-query attention).
    causal_bottom_right : bool
        Align the last query with the last key (decode/append) instead of the first.
    config : KernelConfig, optional
        Tile config (``BLOCK_M``, ``BLOCK_N``, warps, stages); default
        :func:`attention_default_config` of the arguments.
    fallback : bool
        If the kernel fails to compile or run, warn and return
        :func:`~graphtune.ir.reference.attention_ref`'s result. ``False`` raises
        :class:`~graphtune.errors.KernelError` instead (what the tuner and runtime want).

    Returns
    -------
    out : Tensor
        ``[..., Hq, L, Dv]`` in the query dtype.
    lse : Tensor
        ``[..., Hq, L]`` fp32 natural-log log-sum-exp; ``-inf`` for rows that see no key.

    Examples
    --------
    >>> import os; os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: run in the interpreter
    '1'
    >>> import torch
    >>> from graphtune.codegen.attention.triton_kernels import attention_fwd
    >>> q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    >>> out, lse = attention_fwd(q, k, v, is_causal=True, enable_gqa=True, causal_bottom_right=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 3, 16]), torch.Size([1, 4, 3]))
    """
    # SDPA's broadcasting (batch 1 vs B, rank 3 vs 4, ...) made explicit: the kernel sees equal batches
    q, k, v, attn_mask, enable_gqa, out_batch = broadcast_attention_args(q, k, v, attn_mask, enable_gqa)
    o, lse = _attention_fwd_4d(q, k, v, attn_mask, is_causal, scale, enable_gqa, causal_bottom_right, config, fallback)
    if out_batch is not None:
        o, lse = o.reshape(*out_batch, q.shape[-2], v.shape[-1]), lse.reshape(*out_batch, q.shape[-2])
    return o, lse


def _attention_fwd_4d(q, k, v, attn_mask, is_causal, scale, enable_gqa, causal_bottom_right, config, fallback):
    _check_supported(q, k, v)
    if q.dim() < 3 and attn_mask is not None and attn_mask.dim() > 2:
        raise ShapeError(f"attention_fwd: mask of rank {attn_mask.dim()} for rank-2 inputs")
    cfg = config if config is not None else attention_default_config((q, k, v, attn_mask, is_causal))
    bm, bn = cfg.get("BLOCK_M"), cfg.get("BLOCK_N")
    if not all(isinstance(b, int) and b >= 16 and b & (b - 1) == 0 for b in (bm, bn)):
        raise KernelError(f"attention_fwd: config {cfg} needs power-of-two BLOCK_M, BLOCK_N >= 16")
    L, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    s = softmax_scale(scale, D)
    batch_shape = tuple(q.shape[:-3]) if q.dim() > 3 else ()
    hq = q.shape[-3] if q.dim() >= 3 else 1
    q4, k4, v4 = _to_4d(q), _to_4d(k), _to_4d(v)
    mask4 = None
    if attn_mask is not None:
        try:
            mask4 = _mask_4d(attn_mask, batch_shape, hq, L, S)
        except RuntimeError as e:
            raise ShapeError(f"attention_fwd: attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                             f"{(*batch_shape, hq, L, S)}") from e
    offset = S - L if causal_bottom_right else 0
    try:
        o, lse = _launch(q4, k4, v4, mask4, is_causal, s, offset, cfg)
    except Exception as e:  # compile error, OutOfResources, no device/interpreter...
        err = e if isinstance(e, KernelError) else KernelError(f"attention_fwd[{cfg}] failed: {type(e).__name__}: {e}")
        if not fallback:
            raise err from e
        warnings.warn(f"{err}; falling back to the reference attention", RuntimeWarning, stacklevel=3)
        return attention_ref(q, k, v, attn_mask, is_causal, scale, enable_gqa, bottom_right=causal_bottom_right)
    return o.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1])


# ======================================================================================
# Registry: the autotuner searches these configs for graphtune::attention_with_lse on CUDA
# ======================================================================================


def _op_fn(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *, config=None):
    # failures raise: the tuner scores them inf, the runtime falls back with its own warning
    return attention_fwd(q, k, v, attn_mask, is_causal, scale, enable_gqa, config=config, fallback=False)


def _supports(args: tuple) -> bool:
    a = AttentionArgs.of(args)
    q, v = a.q, a.v
    dev_ok = q.device.type == "cuda" or (q.device.type == "cpu" and interpreting())
    return (dev_ok and q.dtype in _SUPPORTED_DTYPES and q.dim() >= 2
            and q.shape[-1] <= _MAX_HEAD_DIM and v.shape[-1] <= _MAX_HEAD_DIM)


ATTENTION_IMPL = register_impl(Impl(
    op="attention_with_lse",
    name="triton.attention_fwd",
    device="cuda",
    fn=_op_fn,
    default=ATTN_DEFAULT_CONFIG,
    configs=attention_configs,
    # the python sources of the kernel and the blocks it calls: same hash compiled or interpreted
    source_hash=source_hash(_attn_fwd_kernel.fn, *jit_deps(_attn_fwd_kernel)),
    supports=_supports,
    default_for=attention_default_config,  # per problem: never a spilling tile (fp32, head dim 256)
))


# ======================================================================================
# Cross-compilation spec (graphtune.codegen.crosscompile)
# ======================================================================================


def attention_compile_spec(op_args: tuple, config: KernelConfig) -> CompileSpec:
    """Launch arguments of :func:`attention_fwd` for ``op_args`` (meta/fake tensors fine) and ``config``.

    Tensors become their dtypes; strides are the contiguous ones (the common case the runtime
    passes), so the cross-compiled code is specialized like a real launch.
    """
    p = AttnProblem.from_args(op_args)

    def strides(*shape: int) -> tuple[int, ...]:
        out, acc = [], 1
        for n in reversed(shape):
            out.append(acc)
            acc *= max(1, n)
        return tuple(reversed(out))

    qs = strides(p.batch, p.hq, p.q_len, p.head_dim)
    ks = strides(p.batch, p.hkv, p.kv_len, p.head_dim)
    vs = strides(p.batch, p.hkv, p.kv_len, p.head_dim_v)
    os_ = strides(p.batch, p.hq, p.q_len, p.head_dim_v)
    ms = strides(p.batch, p.hq, p.q_len, p.kv_len) if p.mask_kind else (0, 0, 0, 0)
    mdt = torch.uint8 if p.mask_kind == 2 else p.dtype
    args = (p.dtype, p.dtype, p.dtype, mdt, p.dtype, torch.float32,
            *qs, *ks, *vs, *ms, *os_, *strides(p.batch, p.hq, p.q_len),
            p.hkv, p.group, p.q_len, p.kv_len, p.head_dim, p.head_dim_v,
            1.0, 0 if not p.is_causal else max(0, p.kv_len - p.q_len))
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    kwargs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=p.block_d, BLOCK_DV=p.block_dv,
                  IS_CAUSAL=p.is_causal, MASK_KIND=p.mask_kind,
                  DOT_PRECISION="ieee" if p.dtype == torch.float32 else "tf32", DOT_UPCAST=False)
    m_blocks = triton.cdiv(max(1, p.rows), bm)
    n_blocks = triton.cdiv(max(1, p.kv_len), bn)
    eff = (max(1, p.rows) / (m_blocks * bm)) * (max(1, p.kv_len) / (n_blocks * bn)) * (p.head_dim / p.block_d)
    # K/V are loaded once per BLOCK_M rows: up to 64 rows per tile the traffic per row keeps
    # falling (beyond, MMA throughput, not memory, bounds FA-style kernels)
    rows = max(1, p.rows)
    reuse = min(bm, rows, 64) / min(rows, 64)
    return CompileSpec(_attn_fwd_kernel, args, kwargs, programs=p.batch * p.hkv * m_blocks, tile_efficiency=eff,
                       reuse=reuse)


register_compile_spec(ATTENTION_IMPL.name, attention_compile_spec)
