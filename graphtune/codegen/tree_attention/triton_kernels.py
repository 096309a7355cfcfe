"""Triton tree attention: one program per (row, kv head, query block), GQA group folded into the query axis.

Program ``(b * Hkv + hk, mb)`` owns query rows ``r in [mb * BLOCK_M, (mb + 1) * BLOCK_M)`` of row ``b``
and kv head ``hk``: row ``r`` is query head ``hk * G + r // n_b`` at the row's token ``r % n_b``
(``G = Hq / Hkv``), so the ``G * n_b`` queries of a kv head share every K/V tile. It walks

1. the row's ``ctx_len_b`` context keys, ``BLOCK_N`` at a time, unmasked (only the tail tile is
   bounded), then
2. its ``n_b`` draft keys (slots ``kv_start_b + ctx_len_b + m``), ``DRAFT_N = min(BLOCK_N, 32)`` at
   a time, masked by the plan's ancestor mask packed into bits (:func:`ancestor_bits`: one int32
   word per query token and 32 draft keys, so a tile's mask is one ``[BLOCK_M]`` load and a shift,
   not a ``[BLOCK_M, BLOCK_N]`` gather: that gather's 64-bit address tile cost 30-60 registers
   and spilled at 64 x 64 tiles),

through the shared online softmax (:mod:`graphtune.codegen.triton_blocks`) and writes
``out [Hq, T, D]`` and the natural-log ``lse [Hq, T]``. Every query sees at least itself, so no
row is empty. Programs past a row's ``G * n_b`` queries (rows shorter than ``max_n``) skip both
loops and store nothing.

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

from graphtune.codegen.tree_attention.cpu import TREE_OP, check_args
from graphtune.codegen.tree_attention.plan import TreePlan, plan_for

__all__ = [
    "tree_attention_triton",
    "TREE_CONFIG_SPACE",
    "TREE_DEFAULT_CONFIG",
    "prune_tree_configs",
    "tree_configs",
    "tree_default_config",
    "default_config",
    "ancestor_bits",
    "device_tables",
    "tree_compile_args",
    "tree_compile_spec",
    "TREE_IMPL",
    "TREE_IMPL_NAME",
]

TREE_IMPL_NAME = "triton.tree_attention"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ======================================================================================
# Kernel
# ======================================================================================


@triton.jit
def _tree_attn_kernel(
    Q, K, V, O, LSE,
    KV_START, CTX_LEN, CU_Q, ANC,  # int64 [B], int64 [B], int64 [B + 1], int32 [T, cdiv(max_n, 32)] bits
    stride_qh, stride_qt, stride_qd,
    stride_kh, stride_kn, stride_kd,
    stride_vh, stride_vn, stride_vd,
    stride_oh, stride_ot, stride_od,
    stride_lh, stride_lt,
    stride_at,
    HKV, G, D,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DRAFT_N: tl.constexpr,  # min(BLOCK_N, 32)
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong; fp32 dot of bf16 values is exact
):
    # grid: (B * Hkv, cdiv(G * max_n, BLOCK_M))
    pid = tl.program_id(0)
    mb = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    t0 = tl.load(CU_Q + b).to(tl.int32)
    n = tl.load(CU_Q + b + 1).to(tl.int32) - t0  # >= 1
    s0 = tl.load(KV_START + b)
    ctx = tl.load(CTX_LEN + b)
    live = mb * BLOCK_M < G * n  # this block holds some of the row's queries
    ctx_hi = tl.where(live, ctx, 0)
    n_hi = tl.where(live, n, 0)

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # folded (query head in group, token) rows
    row_ok = rows < G * n
    t = t0 + rows % n  # global token of each row
    h = hk * G + rows // n  # query head of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + hk.to(tl.int64) * stride_kh + s0 * stride_kn
    v_base = V + hk.to(tl.int64) * stride_vh + s0 * stride_vn
    m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_D)

    # -- 1. context keys [0, ctx): visible to every query of the row ------------------------
    for start_n in range(0, ctx_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < ctx_hi
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT_UPCAST:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk, v_ptrs, col_ok[:, None] & d_ok[None, :], False,
                                            DOT_PRECISION, DOT_UPCAST)

    # -- 2. draft keys ctx + [0, n), DRAFT_N (a divisor of 32) at a time: key m is visible iff bit
    #       m % 32 of the query token's ancestor word m // 32 is set (the token itself or an ancestor)
    kd_base = k_base + ctx * stride_kn
    vd_base = v_base + ctx * stride_vn
    offs_w = tl.arange(0, DRAFT_N)
    for start_n in range(0, n_hi, DRAFT_N):
        cols = start_n + offs_w
        col_ok = cols < n_hi
        k = tl.load(kd_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, DRAFT_N]
        if DOT_UPCAST:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        bits = tl.load(ANC + t * stride_at + start_n // 32, mask=row_ok, other=0)  # [BLOCK_M] int32
        qk = tl.where(((bits[:, None] >> (start_n % 32 + offs_w)[None, :]) & 1) != 0, qk * qk_scale, float("-inf"))
        v_ptrs = vd_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk, v_ptrs, col_ok[:, None] & d_ok[None, :], False,
                                            DOT_PRECISION, DOT_UPCAST)

    # -- epilogue: normalise, natural-log lse ----------------------------------------------
    out, lse = softmax_epilogue(m_i, l_i, acc, False)
    tl.store(O + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h * stride_lh + t * stride_lt, lse, mask=row_ok)


# ======================================================================================
# Config space and pruning
# ======================================================================================


def _cfg(bm: int, bn: int, w: int, s: int) -> KernelConfig:
    return KernelConfig.make(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn)


TREE_CONFIG_SPACE: tuple[KernelConfig, ...] = tuple(
    _cfg(bm, bn, w, s) for bm in (16, 32, 64, 128) for bn in (16, 32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3)
)
# The fixed fallback (16-bit inputs, any row count, D <= 128): no spills on sm_80/sm_90. Per problem,
# default_config() picks from the same measured table (docs/ops/tree_attention.md).
TREE_DEFAULT_CONFIG = _cfg(64, 32, 4, 2)


def default_config(dtype: torch.dtype, rows: int, head_dim: int) -> KernelConfig:
    """Untuned config for ``rows = G * max_n`` folded queries at ``head_dim``, spill-free on sm_80 and sm_90.

    fp32 runs IEEE FMA dots (no tensor cores) and needs 16 x 16 one-stage tiles; 16-bit inputs take
    the smallest of 16/32/64 query rows that holds ``rows``, 64 keys per tile up to 32 rows at head
    dim <= 128, else 32 (8 warps at head dim 256 for 64 rows).

    >>> default_config(torch.float16, 3 * 4, 128)
    KernelConfig(params=(('BLOCK_M', 16), ('BLOCK_N', 64)), num_warps=4, num_stages=2)
    """
    if dtype == torch.float32:
        return _cfg(16, 16, 4, 1)
    bm = min(64, max(16, triton.next_power_of_2(max(1, rows))))
    if bm <= 32:
        return _cfg(bm, 64 if head_dim <= 128 else 32, 4, 2)
    return _cfg(64, 32, 4 if head_dim <= 128 else 8, 2)


def prune_tree_configs(configs, rows: int, head_dim: int, dtype: torch.dtype) -> list[KernelConfig]:
    """Drop configs that waste or cannot fit for ``rows = G * max_n`` folded queries per (row, kv head).

    Rules: ``BLOCK_M <= max(16, next_pow2(rows))`` (a larger block only adds masked rows);
    8 warps only for ``BLOCK_M >= 64``; K/V stages plus the Q tile within sm_80's
    shared memory (163 KiB); at most 160 fp32 accumulator and score values per thread
    (``(BLOCK_M * BLOCK_D + BLOCK_M * BLOCK_N) / (32 * num_warps)``). Never empty.
    """
    bmax = max(16, triton.next_power_of_2(max(1, rows)))
    bd = max(16, triton.next_power_of_2(max(1, head_dim)))
    el = 4 if dtype == torch.float32 else 2
    keep = []
    for c in configs:
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        if bm > bmax or (c.num_warps == 8 and bm < 64):
            continue
        smem = max(1, c.num_stages) * bn * 2 * bd * el + bm * bd * el
        regs = (bm * bd + bm * bn) / (32 * c.num_warps)
        if smem > 163 * 1024 or regs > 160:
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"] / c.num_warps)]


def _rows_of(op_args: tuple) -> tuple[int, int]:
    """``(G * max_n, D)`` of op arguments; meta index tensors (static mode) estimate ``max_n = ceil(T / B)``."""
    q, k, _, _, _, cu_q, *_ = op_args
    hq, T, d = (int(x) for x in q.shape)
    G = hq // max(1, int(k.shape[0]))
    if isinstance(cu_q, Tensor) and cu_q.device.type == "meta":
        max_n = -(-T // max(1, int(cu_q.shape[0]) - 1))
    else:
        cu = cu_q.tolist() if isinstance(cu_q, Tensor) else list(cu_q)
        max_n = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    return G * max_n, d


def tree_default_config(op_args: tuple) -> KernelConfig:
    """:func:`default_config` for op arguments ``(q, k, v, kv_start, ctx_len, cu_q, parent, scale)``."""
    rows, d = _rows_of(op_args)
    return default_config(op_args[0].dtype, rows, d)


def tree_configs(op_args: tuple) -> list[KernelConfig]:
    """Pruned config space for op arguments ``(q, k, v, kv_start, ctx_len, cu_q, parent, scale)``; has the default."""
    rows, d = _rows_of(op_args)
    keep = prune_tree_configs(TREE_CONFIG_SPACE, rows, d, op_args[0].dtype)
    dflt = tree_default_config(op_args)
    return keep if dflt in keep else [dflt, *keep]


# ======================================================================================
# Device tables and launcher
# ======================================================================================


def ancestor_bits(mask: Tensor) -> Tensor:
    """Pack a bool ancestor mask ``[T, max_n]`` into int32 words ``[T, cdiv(max_n, 32)]``: bit ``m % 32`` of word ``m // 32``.

    >>> ancestor_bits(torch.tensor([[True, False, True]])).tolist()
    [[5]]
    """
    T, n = mask.shape
    w = -(-n // 32)
    padded = torch.zeros(T, w * 32, dtype=torch.int64)
    padded[:, :n] = mask.to(torch.int64)
    words = (padded.view(T, w, 32) << torch.arange(32)).sum(-1)  # [T, w] in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def device_tables(plan: TreePlan, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(kv_start, ctx_len, cu_q int64, ancestor bits int32 [T, cdiv(max_n, 32)])`` on ``device``, uploaded once per plan."""
    def build() -> tuple[Tensor, ...]:
        i64 = dict(dtype=torch.int64, device=device)
        return (torch.tensor(plan.kv_start, **i64), torch.tensor(plan.ctx_len, **i64), torch.tensor(plan.cu_q, **i64),
                ancestor_bits(plan.mask).to(device))

    return plan.memo(("triton.tables", str(device)), build)


def tree_attention_triton(q: Tensor, k: Tensor, v: Tensor, kv_start, ctx_len, cu_q, parent,
                          scale: float | None = None, *, plan: TreePlan | None = None,
                          config: KernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """Tree (speculative verification) attention as one Triton kernel; registered as ``triton.tree_attention``.

    Parameters
    ----------
    q : Tensor
        ``[Hq, T, D]`` packed queries, fp32/fp16/bf16, ``D <= 256``, any strides.
    k, v : Tensor
        ``[Hkv, S, D]`` the KV pool, any strides (e.g. one layer's view of a larger pool).
    kv_start, ctx_len, cu_q, parent : Tensor or sequence of int
        The step's rows and trees (:func:`~graphtune.codegen.tree_attention.plan.plan_tree`); not
        read when ``plan`` is given.
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.
    plan : TreePlan, optional
        Built once per step; its device tables are uploaded once and reused by every layer.
        Default: :func:`~graphtune.codegen.tree_attention.plan.plan_for`.
    config : KernelConfig, optional
        ``BLOCK_M``, ``BLOCK_N``, warps, stages; default :func:`default_config`.

    Returns
    -------
    (out, lse) : ``[Hq, T, D]`` in ``q.dtype`` and fp32 ``[Hq, T]``.

    Examples
    --------
    On a CPU, run it in the interpreter: set ``TRITON_INTERPRET=1`` *before* triton is first imported.

    >>> q, k = torch.randn(4, 5, 16, device="cuda"), torch.randn(2, 64, 16, device="cuda")  # doctest: +SKIP
    >>> out, lse = tree_attention_triton(q, k, k, [0, 30], [20, 10], [0, 3, 5], [-1, 0, 0, -1, 0])  # doctest: +SKIP
    >>> out.shape, lse.shape  # doctest: +SKIP
    (torch.Size([4, 5, 16]), torch.Size([4, 5]))
    """
    plan = plan if plan is not None else plan_for(kv_start, ctx_len, cu_q, parent)
    G = check_args(q, k, v, plan)
    if q.dtype not in _DTYPES or q.shape[2] > 256:
        raise ShapeError(f"tree attention (triton): dtype {q.dtype} / head dim {q.shape[2]} (fp32/fp16/bf16, D <= 256)")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ShapeError("tree attention (triton): k and v need a unit stride on the head dim")
    hq, T, d = q.shape
    hkv = k.shape[0]
    cfg = config if config is not None else default_config(q.dtype, G * plan.max_n, q.shape[2])
    bm, bn = cfg.get("BLOCK_M"), cfg.get("BLOCK_N")
    if not all(isinstance(x, int) and x >= 16 and x & (x - 1) == 0 for x in (bm, bn)):
        raise KernelError(f"tree attention: config {cfg} needs power-of-two BLOCK_M, BLOCK_N >= 16")
    starts, ctxs, cus, anc = device_tables(plan, q.device)
    out = torch.empty((hq, T, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, T), dtype=torch.float32, device=q.device)
    grid = (plan.batch * hkv, triton.cdiv(G * plan.max_n, bm))
    kernel_for(_tree_attn_kernel, q.device, "tree attention")[grid](
        q, k, v, out, lse, starts, ctxs, cus, anc,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), anc.stride(0),
        hkv, G, d, softmax_scale(scale, d) * LOG2E.value,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)), DRAFT_N=min(bn, 32),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


# ======================================================================================
# Registry: implementation "triton.tree_attention" of op "tree_attention"
# ======================================================================================


def _op_fn(q, k, v, kv_start, ctx_len, cu_q, parent, scale=None, *, config: KernelConfig | None = None):
    try:
        return tree_attention_triton(q, k, v, kv_start, ctx_len, cu_q, parent, scale, config=config)
    except (ShapeError, PlanError, KernelError):
        raise
    except Exception as e:  # compile error, OutOfResources, no device/interpreter...
        raise KernelError(f"tree_attention_triton[{config}] failed: {type(e).__name__}: {e}") from e


def _supports(args: tuple) -> bool:
    q, k, v = args[:3]
    dev_ok = q.device.type == "cuda" or (q.device.type == "cpu" and interpreting())
    return (dev_ok and q.dtype in _DTYPES and q.dim() == 3 and k.dim() == 3 and k.shape == v.shape
            and k.shape[0] > 0 and q.shape[0] % k.shape[0] == 0 and k.shape[2] == q.shape[2] <= 256
            and q.dtype == k.dtype == v.dtype and k.stride(-1) == 1 and v.stride(-1) == 1)


TREE_IMPL = register_impl(Impl(
    op=TREE_OP,
    name=TREE_IMPL_NAME,
    device="cuda",
    fn=_op_fn,
    default=TREE_DEFAULT_CONFIG,
    configs=tree_configs,
    # the python sources of the kernel, the blocks it calls and the host side: same hash compiled or interpreted
    source_hash=source_hash(_tree_attn_kernel.fn, *jit_deps(_tree_attn_kernel), tree_attention_triton, device_tables,
                            ancestor_bits,
                            plan_for),
    supports=_supports,
    default_for=tree_default_config,
))


# ======================================================================================
# Cross-compilation arguments (graphtune.codegen.crosscompile.compile_for_target)
# ======================================================================================


def tree_compile_args(dtype: torch.dtype, group: int, max_n: int, head_dim: int, config: KernelConfig, *,
                      num_kv_heads: int = 8, pool_slots: int = 65536, tokens: int = 64) -> tuple:
    """``(fn, args, kwargs)`` to cross-compile the kernel, tensors as dtypes.

    Strides of contiguous ``q [Hq, T, D]`` and pool ``[Hkv, S, D]`` (unit last stride, as a real
    launch would specialise).
    """
    hkv, d, S, T = num_kv_heads, head_dim, pool_slots, tokens
    i64 = torch.int64
    args = (dtype, dtype, dtype, dtype, torch.float32, i64, i64, i64, torch.int32,
            T * d, d, 1,
            S * d, d, 1,
            S * d, d, 1,
            T * d, d, 1,
            T, 1,
            -(-max_n // 32),
            hkv, group, d, 0.125 * LOG2E.value)
    kwargs = dict(BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_D=max(16, triton.next_power_of_2(d)),
                  DRAFT_N=min(config["BLOCK_N"], 32),
                  DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_UPCAST=False)
    return _tree_attn_kernel, args, kwargs


def tree_compile_spec(op_args: tuple, config: KernelConfig) -> CompileSpec:
    """The kernel's launch for op arguments ``(q, k, v, kv_start, ctx_len, cu_q, parent, scale)`` (meta tensors
    fine: ``max_n`` is then estimated as ``ceil(T / B)``) and ``config``."""
    q, k, _, kv_start = op_args[:4]
    hq, T, d = (int(x) for x in q.shape)
    hkv, S = int(k.shape[0]), int(k.shape[1])
    B = int(kv_start.shape[0]) if isinstance(kv_start, Tensor) else len(kv_start)
    rows, _ = _rows_of(op_args)
    group = hq // hkv
    max_n = rows // group
    fn, args, kwargs = tree_compile_args(q.dtype, group, max_n, d, config, num_kv_heads=hkv, pool_slots=S, tokens=T)
    bm = config["BLOCK_M"]
    blocks = triton.cdiv(rows, bm)
    eff = (rows / (blocks * bm)) * (d / kwargs["BLOCK_D"])
    return CompileSpec(fn, args, kwargs, programs=B * hkv * blocks, tile_efficiency=eff)


register_compile_spec(TREE_IMPL_NAME, tree_compile_spec)
