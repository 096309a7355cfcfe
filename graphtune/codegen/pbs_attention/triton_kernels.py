"""Triton PBS attention: one program per (query tile, query head, batch), K/V read through the permutation.

Program ``(mt, h, b)`` owns query rows ``[mt * BLOCK_M, (mt + 1) * BLOCK_M)`` of head ``h`` and batch
``b`` (``BLOCK_M`` divides the PBS block ``blk``, so a tile lies in one query block ``i``, at absolute
block ``A = (N - M) / blk + i``) and reads kv head ``h // G`` (GQA: K/V are never repeated). It walks

1. the query block's selected off-diagonal blocks, ``plan.kv_index[b, h, i, :kv_count]``,
   ``BLOCK_N`` (a divisor of ``blk``) keys at a time, one flattened loop over (block, tile); key
   rows are read *through* the permutation, ``K[perm[b, h // G, j * blk + n]]``, so the permuted
   K'/V' of the paper are never materialised. Off-diagonal blocks are always full and precede
   every query of the tile: no mask. ``permute=False`` plans (identity ``perm``) skip the
   indirection (``PERMUTED``);
2. its own segment in original order, keys ``[seg_start, last query of the tile]``: tiles wholly
   before the tile's first query unmasked, the rest masked causally by absolute position,

through the shared online softmax (:mod:`graphtune.codegen.triton_blocks`) and writes ``out [B, Hq,
M, D]`` and the natural-log ``lse [B, Hq, M]``. Every query sees at least itself: no empty row.
Tables (``perm``, ``kv_count``, ``kv_index``, int32) go to the device once per plan (``plan.memo``).

Layout: kernel -> config space + prune -> device tables + launcher -> registry -> compile spec.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from graphtune.codegen.compile_spec import CompileSpec, register_compile_spec
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.codegen.triton_blocks import LOG2E, jit_deps, online_softmax_step, softmax_epilogue, softmax_init
from graphtune.codegen.triton_util import interpreting, kernel_for
from graphtune.errors import KernelError, PlanError, ShapeError
from graphtune.ir.args import softmax_scale

from graphtune.codegen.pbs_attention.key import PBS_OP
from graphtune.codegen.pbs_attention.plan import DEFAULT_CONFIG, PBSConfig, PBSPlan, check_qkv, plan_pbs

__all__ = [
    "pbs_attention_triton",
    "PBS_CONFIG_SPACE",
    "PBS_DEFAULT_CONFIG",
    "prune_pbs_configs",
    "pbs_configs",
    "pbs_default_config",
    "default_config",
    "device_tables",
    "pbs_compile_args",
    "pbs_compile_spec",
    "PBS_IMPL",
    "PBS_IMPL_NAME",
]

PBS_IMPL_NAME = "triton.pbs"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ======================================================================================
# Kernel
# ======================================================================================


@triton.jit
def _pbs_attn_kernel(
    Q, K, V, O, LSE,
    PERM, COUNT, INDEX,  # int32 [B, Hkv, N], int32 [B, Hq, nqb], int32 [B, Hq, nqb, C] (contiguous)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    HKV, G, M, N, D, NQB, C,
    BLK, SEG,  # PBS block and segment (SEG % BLK == 0, BLK % BLOCK_M == BLK % BLOCK_N == 0)
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PERMUTED: tl.constexpr,  # False: perm is the identity (permute=False plans), read no table
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong; fp32 dot of bf16 values is exact
):
    # grid: (cdiv(M, BLOCK_M), Hq, B)
    mt = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // G
    off = N - M  # absolute position of query 0
    r0 = mt * BLOCK_M
    p0 = off + r0  # first query position of the tile
    seg0 = (p0 // SEG) * SEG  # its segment's first key
    hi = off + tl.minimum(r0 + BLOCK_M, M)  # one past the tile's last query position

    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    pos = off + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    b64 = b.to(tl.int64)
    # rows past M load row M - 1 (no row mask: a predicate live until the epilogue spilled on sm_80)
    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + tl.minimum(rows, M - 1)[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    item = (b64 * HKV * G + h) * NQB + r0 // BLK  # (batch, query head, query block)
    cnt = tl.load(COUNT + item)
    idx_base = INDEX + item * C
    perm_base = PERM + (b64 * HKV + hk) * N
    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_D)

    # -- 1. selected off-diagonal blocks, rows through the permutation, no mask ----------------
    tiles = BLK // BLOCK_N  # tiles per block
    for t in range(0, cnt * tiles):
        j = tl.load(idx_base + t // tiles)  # permuted block
        pp = j * BLK + (t % tiles) * BLOCK_N + offs_n  # permuted positions, all < N (full block)
        if PERMUTED:
            kr = tl.load(perm_base + pp)  # original key rows
        else:
            kr = pp
        k = tl.load(k_base + kr[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT_UPCAST:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        v_ptrs = v_base + kr[:, None] * stride_vn + offs_d[None, :] * stride_vd
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk * qk_scale, v_ptrs, d_ok[None, :], False,
                                            DOT_PRECISION, DOT_UPCAST)

    # -- 2a. own segment, original order, tiles before the tile's first query: unmasked -------
    mlo = (p0 // BLOCK_N) * BLOCK_N  # >= seg0 (seg0 is a multiple of BLOCK_N)
    for start_n in range(seg0, mlo, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=d_ok[:, None], other=0.0)
        if DOT_UPCAST:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk * qk_scale, v_ptrs, d_ok[None, :], False,
                                            DOT_PRECISION, DOT_UPCAST)

    # -- 2b. the tiles holding the tile's queries: causal by absolute position ---------------
    for start_n in range(mlo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_UPCAST:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        qk = tl.where(cols[None, :] <= pos[:, None], qk * qk_scale, float("-inf"))
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk, v_ptrs, col_ok[:, None] & d_ok[None, :], False,
                                            DOT_PRECISION, DOT_UPCAST)

    # -- epilogue: normalise, natural-log lse ----------------------------------------------
    out, lse = softmax_epilogue(m_i, l_i, acc, False)
    tl.store(O + b64 * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + rows * stride_lm, lse, mask=row_ok)


# ======================================================================================
# Config space and pruning
# ======================================================================================


def _cfg(bm: int, bn: int, w: int, s: int) -> KernelConfig:
    return KernelConfig.make(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn)


PBS_CONFIG_SPACE: tuple[KernelConfig, ...] = tuple(
    _cfg(bm, bn, w, s) for bm in (16, 32, 64, 128) for bn in (16, 32, 64, 128) for w in (4, 8) for s in (1, 2, 3)
    if (w == 4 and bm * bn < 128 * 128) or (w == 8 and bm * bn >= 2048)
)
# The fixed fallback (16-bit inputs, head dim <= 128, any block that is a multiple of 64): no spills on
# sm_80/sm_90. Per problem, default_config() picks from the cross-compiled table (tests/codegen/pbs_attention).
PBS_DEFAULT_CONFIG = _cfg(64, 32, 4, 2)


def _pow2_divisor(block: int) -> int:
    return block & -block  # the largest power of two dividing the PBS block


def default_config(dtype: torch.dtype, head_dim: int, block: int = 128, m: int = 1 << 20) -> KernelConfig:
    """Untuned config for ``m`` queries at ``head_dim`` with PBS block ``block``, spill-free on sm_80 and sm_90.

    fp32 runs IEEE FMA dots (no tensor cores): 16 x 32 one-stage tiles. 16-bit inputs: 64 x 64 tiles
    up to head dim 64, 64 x 32 up to 128, 8 warps at 256; ``BLOCK_M`` is capped by ``next_pow2(m)``
    and both by the largest power of two dividing ``block``.

    >>> default_config(torch.float16, 64)
    KernelConfig(params=(('BLOCK_M', 64), ('BLOCK_N', 64)), num_warps=4, num_stages=2)
    >>> default_config(torch.bfloat16, 128, block=48)
    KernelConfig(params=(('BLOCK_M', 16), ('BLOCK_N', 16)), num_warps=4, num_stages=2)
    """
    cap = max(16, _pow2_divisor(block))
    if dtype == torch.float32:
        bm, bn, w, s = 16, 32, 4, 1
    elif head_dim <= 64:
        bm, bn, w, s = 64, 64, 4, 2
    else:
        bm, bn, w, s = 64, 32, 4 if head_dim <= 128 else 8, 2
    bm = min(bm, cap, max(16, triton.next_power_of_2(max(1, m))))
    return _cfg(bm, min(bn, cap), w if bm >= 64 else 4, s)


def prune_pbs_configs(configs, m: int, head_dim: int, dtype: torch.dtype, block: int) -> list[KernelConfig]:
    """Drop configs that cannot run or waste for ``m`` queries at ``head_dim`` with PBS block ``block``.

    Rules: ``BLOCK_M`` and ``BLOCK_N`` divide ``block``; ``BLOCK_M <= max(16, next_pow2(m))``; fp32
    (FMA dots) only at one stage; K/V stages plus the Q tile within sm_80's shared memory
    (163 KiB); at most 160 fp32 accumulator and score values per thread. Never empty.
    """
    bmax = max(16, triton.next_power_of_2(max(1, m)))
    bd = max(16, triton.next_power_of_2(max(1, head_dim)))
    el = 4 if dtype == torch.float32 else 2
    keep = []
    for c in configs:
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        if block % bm or block % bn or bm > bmax or (dtype == torch.float32 and c.num_stages > 1):
            continue
        smem = max(1, c.num_stages) * bn * 2 * bd * el + bm * bd * el
        regs = (bm * bd + bm * bn) / (32 * c.num_warps)
        if smem > 163 * 1024 or regs > 160:
            continue
        keep.append(c)
    return keep or [default_config(dtype, head_dim, block, m)]


def _problem(op_args: tuple) -> tuple[torch.dtype, int, int, int]:
    """``(dtype, M, D, block)`` of op arguments ``(q, k, v, pbs, scale)`` (meta tensors fine)."""
    q = op_args[0]
    pbs = op_args[3] if len(op_args) > 3 and isinstance(op_args[3], PBSConfig) else DEFAULT_CONFIG
    return q.dtype, int(q.shape[2]), int(q.shape[3]), pbs.block


def pbs_default_config(op_args: tuple) -> KernelConfig:
    """:func:`default_config` for op arguments ``(q, k, v, pbs, scale)``."""
    dtype, m, d, block = _problem(op_args)
    return default_config(dtype, d, block, m)


def pbs_configs(op_args: tuple) -> list[KernelConfig]:
    """Pruned config space for op arguments ``(q, k, v, pbs, scale)``; has the default."""
    dtype, m, d, block = _problem(op_args)
    keep = prune_pbs_configs(PBS_CONFIG_SPACE, m, d, dtype, block)
    dflt = default_config(dtype, d, block, m)
    return keep if dflt in keep else [dflt, *keep]


# ======================================================================================
# Device tables and launcher
# ======================================================================================


def device_tables(plan: PBSPlan, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(perm [B, Hkv, N], kv_count [B, Hq, nqb], kv_index [B, Hq, nqb, C])`` int32, contiguous on ``device``,
    uploaded once per plan (every layer's call with this plan reuses them)."""
    key = ("triton.tables", str(device))
    got = plan.memo.get(key)
    if got is None:
        def up(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=torch.int32).contiguous()

        got = plan.memo[key] = (up(plan.perm), up(plan.kv_count), up(plan.kv_index))
    return got


def _check_plan(plan: PBSPlan, B: int, Hq: int, Hkv: int, M: int, N: int) -> None:
    b = plan.config.block
    nqb = -(-M // b)
    if (plan.n, plan.m) != (N, M):
        raise PlanError(f"PBS attention (triton): plan for {plan.m} queries over {plan.n} keys, got {M} over {N}")
    if (tuple(plan.perm.shape) != (B, Hkv, N) or tuple(plan.kv_count.shape) != (B, Hq, nqb)
            or plan.kv_index.dim() != 4 or tuple(plan.kv_index.shape[:3]) != (B, Hq, nqb)):
        raise PlanError(f"PBS attention (triton): plan tables perm {tuple(plan.perm.shape)}, kv_count "
                        f"{tuple(plan.kv_count.shape)}, kv_index {tuple(plan.kv_index.shape)} do not match "
                        f"B={B} Hq={Hq} Hkv={Hkv} N={N} and {nqb} query blocks of {b}")
    if b % 16:
        raise PlanError(f"PBS attention (triton): block {b} is not a multiple of 16 (the smallest MMA tile)")


def pbs_attention_triton(q: Tensor, k: Tensor, v: Tensor, pbs: PBSConfig = DEFAULT_CONFIG,
                         scale: float | None = None, *, plan: PBSPlan | None = None,
                         config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """PBS (permuted block-sparse) prefill attention as one Triton kernel; registered as ``triton.pbs``.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, M, D]`` the last ``M`` positions' queries, fp32/fp16/bf16, ``D <= 256``, any strides.
    k, v : Tensor
        ``[B, Hkv, N, D]``, unit stride on the head dim; ``N - M`` a multiple of ``pbs.block``.
    pbs : PBSConfig
        Block (a multiple of 16 here), segment, ``tau``, permutation, sink; not read when ``plan`` is given.
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.
    plan : PBSPlan, optional
        From :func:`~graphtune.codegen.pbs_attention.plan.plan_pbs`; its tables are uploaded once.
        Default: planned here.
    config : KernelConfig, optional
        ``BLOCK_M``, ``BLOCK_N`` (powers of two >= 16 dividing the block), warps, stages; default
        :func:`default_config`.

    Returns
    -------
    (out, lse) : ``[B, Hq, M, D]`` in ``q.dtype`` and fp32 ``[B, Hq, M]``.

    Examples
    --------
    On a CPU, run it in the interpreter: set ``TRITON_INTERPRET=1`` *before* triton is first imported.

    >>> q, k = torch.randn(1, 4, 96, 16, device="cuda"), torch.randn(1, 2, 96, 16, device="cuda")  # doctest: +SKIP
    >>> out, lse = pbs_attention_triton(q, k, k, PBSConfig(block=32, segment=64, tau=0.5))  # doctest: +SKIP
    >>> out.shape, lse.shape  # doctest: +SKIP
    (torch.Size([1, 4, 96, 16]), torch.Size([1, 4, 96]))
    """
    B, Hq, Hkv, M, N = check_qkv(q, k, v, plan.config if plan is not None else pbs)
    d = q.shape[3]
    if q.dtype not in _DTYPES or d > 256 or not q.dtype == k.dtype == v.dtype:
        raise ShapeError(f"PBS attention (triton): dtypes {q.dtype}/{k.dtype}/{v.dtype}, head dim {d} "
                         "(one of fp32/fp16/bf16, D <= 256)")
    if not q.device == k.device == v.device:
        raise ShapeError(f"PBS attention (triton): q, k, v on {q.device}, {k.device}, {v.device}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ShapeError("PBS attention (triton): k and v need a unit stride on the head dim")
    if plan is None:
        if pbs.block % 16:
            raise PlanError(f"PBS attention (triton): block {pbs.block} is not a multiple of 16 "
                            "(the smallest MMA tile)")
        plan = plan_pbs(q, k, pbs, scale, v)
    _check_plan(plan, B, Hq, Hkv, M, N)
    blk, seg = plan.config.block, plan.config.segment
    cfg = config if config is not None else default_config(q.dtype, d, blk, M)
    bm, bn = cfg.get("BLOCK_M"), cfg.get("BLOCK_N")
    if not all(isinstance(x, int) and x >= 16 and x & (x - 1) == 0 and blk % x == 0 for x in (bm, bn)):
        raise KernelError(f"PBS attention: config {cfg} needs power-of-two BLOCK_M, BLOCK_N >= 16 dividing block {blk}")
    perm, count, index = device_tables(plan, q.device)
    out = torch.empty((B, Hq, M, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, M), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(M, bm), Hq, B)
    kernel_for(_pbs_attn_kernel, q.device, "PBS attention")[grid](
        q, k, v, out, lse, perm, count, index,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        Hkv, Hq // Hkv, M, N, d, index.shape[2], index.shape[3], blk, seg,
        softmax_scale(scale, d) * LOG2E.value,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)), PERMUTED=bool(plan.config.permute),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


# ======================================================================================
# Registry: implementation "triton.pbs" of op "pbs_attention"
# ======================================================================================


def _op_fn(q, k, v, pbs=DEFAULT_CONFIG, scale=None, *, plan=None, config: KernelConfig | None = None):
    try:
        return pbs_attention_triton(q, k, v, pbs, scale, plan=plan, config=config)
    except (ShapeError, PlanError, KernelError):
        raise
    except Exception as e:  # compile error, OutOfResources, no device/interpreter...
        raise KernelError(f"pbs_attention_triton[{config}] failed: {type(e).__name__}: {e}") from e


def _supports(args: tuple) -> bool:
    q, k, v = args[:3]
    pbs = args[3] if len(args) > 3 and isinstance(args[3], PBSConfig) else DEFAULT_CONFIG
    dev_ok = q.device.type == "cuda" or (q.device.type == "cpu" and interpreting())
    return (dev_ok and q.dtype in _DTYPES and q.dim() == 4 and k.dim() == 4 and k.shape == v.shape
            and k.shape[0] == q.shape[0] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
            and k.shape[3] == q.shape[3] <= 256 and q.dtype == k.dtype == v.dtype
            and k.stride(-1) == 1 and v.stride(-1) == 1 and pbs.block % 16 == 0
            and 1 <= q.shape[2] <= k.shape[2] and (k.shape[2] - q.shape[2]) % pbs.block == 0)


PBS_IMPL = register_impl(Impl(
    op=PBS_OP,
    name=PBS_IMPL_NAME,
    device="cuda",
    fn=_op_fn,
    default=PBS_DEFAULT_CONFIG,
    configs=pbs_configs,
    # the python sources of the kernel, the blocks it calls and the host side: same hash compiled or interpreted
    source_hash=source_hash(_pbs_attn_kernel.fn, *jit_deps(_pbs_attn_kernel), pbs_attention_triton, device_tables,
                            plan_pbs),
    supports=_supports,
    default_for=pbs_default_config,
))


# ======================================================================================
# Cross-compilation arguments (graphtune.codegen.crosscompile.compile_for_target)
# ======================================================================================


def pbs_compile_args(dtype: torch.dtype, group: int, head_dim: int, config: KernelConfig, *, block: int = 128,
                     segment: int = 256, num_kv_heads: int = 8, keys: int = 8192, queries: int | None = None,
                     permuted: bool = True) -> tuple:
    """``(fn, args, kwargs)`` to cross-compile the kernel, tensors as dtypes.

    Strides of contiguous ``q [B, Hq, M, D]``, ``k, v [B, Hkv, N, D]`` (unit last stride, as a real
    launch would specialise); ``queries`` defaults to ``keys`` (a whole prefill).
    """
    hkv, d, N = num_kv_heads, head_dim, keys
    M = N if queries is None else queries
    hq = hkv * group
    nqb = -(-M // block)
    args = (dtype, dtype, dtype, dtype, torch.float32, torch.int32, torch.int32, torch.int32,
            hq * M * d, M * d, d, 1,
            hkv * N * d, N * d, d, 1,
            hkv * N * d, N * d, d, 1,
            hq * M * d, M * d, d, 1,
            hq * M, M, 1,
            hkv, group, M, N, d, nqb, max(1, N // block), block, segment, 0.125 * LOG2E.value)
    kwargs = dict(BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_D=max(16, triton.next_power_of_2(d)),
                  PERMUTED=permuted, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_UPCAST=False)
    return _pbs_attn_kernel, args, kwargs


def pbs_compile_spec(op_args: tuple, config: KernelConfig) -> CompileSpec:
    """The kernel's launch for op arguments ``(q, k, v, pbs, scale)`` (meta tensors fine) and ``config``."""
    q, k = op_args[:2]
    pbs = op_args[3] if len(op_args) > 3 and isinstance(op_args[3], PBSConfig) else DEFAULT_CONFIG
    B, hq, M, d = (int(x) for x in q.shape)
    hkv, N = int(k.shape[1]), int(k.shape[2])
    fn, args, kwargs = pbs_compile_args(q.dtype, hq // hkv, d, config, block=pbs.block, segment=pbs.segment,
                                        num_kv_heads=hkv, keys=N, queries=M, permuted=pbs.permute)
    bm = config["BLOCK_M"]
    blocks = triton.cdiv(M, bm)
    eff = (M / (blocks * bm)) * (d / kwargs["BLOCK_D"])
    return CompileSpec(fn, args, kwargs, programs=B * hq * blocks, tile_efficiency=eff)


register_compile_spec(PBS_IMPL_NAME, pbs_compile_spec)
