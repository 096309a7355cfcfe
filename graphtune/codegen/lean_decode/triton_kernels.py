"""Lean-attention decode as Triton kernels: stream-K partial attention + exact reduction.

``_lean_partial_kernel`` is a persistent kernel: program ``w`` is worker ``w`` of a
:class:`~graphtune.codegen.lean_decode.plan.LeanPlan` and walks its segments (its contiguous range of
KV tiles, cut at output boundaries). Each segment is one (sequence, kv head) over a key
sub-range, with the GQA group's query heads *folded into rows* (row ``r`` = query head
``h * G + r // Lq`` at position ``r % Lq``), so K/V tiles are read once per group. A segment
that is a whole output writes the final ``(out, lse)``; a piece of a split output writes an
fp32 partial ``(out, lse)`` to scratch. ``_lean_reduce_kernel`` then merges each split
output's partials (contiguous scratch slots) exactly — ``merge_states`` semantics.

Why a second kernel rather than the host-CTA spin-wait of ROCm aiter's ``la_persistent``:
no inter-program synchronisation (which deadlocks under ``TRITON_INTERPRET=1``, where programs
run one after another), and the reduction only touches split outputs (< 2 per worker).

Semantics: :func:`graphtune.ir.reference.attention_ref` over each row's real keys
``[start_b, start_b + len_b)``, bottom-right causal when ``is_causal`` (query ``i`` sees real
keys ``j <= len - Lq + i``); rows that see no key get ``out = 0, lse = -inf``.

Registered as implementation ``triton.lean_decode`` of op ``lean_decode`` (the op arguments of the
CPU implementation ``cpu.lean``: attention's, with a padding mask the plan is built from).

Layout: kernels -> config space + prune -> tables + launcher -> public op -> registry -> compile spec.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from graphtune.codegen.compile_spec import CompileSpec, register_compile_spec
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.codegen.triton_blocks import (LOG2E, finite_or_zero, jit_deps, lse_merge_epilogue, lse_merge_step,
                                             online_softmax_step, softmax_epilogue, softmax_init)
from graphtune.codegen.triton_util import interpreting, kernel_for
from graphtune.errors import KernelError, PlanError, ShapeError
from graphtune.ir.args import AttentionArgs, softmax_scale

from graphtune.codegen.lean_decode.cpu import LEAN_OP, _padding_of, lean_args_supported
from graphtune.codegen.lean_decode.plan import LeanPlan, default_tile, gpu_num_workers, make_plan

__all__ = [
    "lean_attention_triton",
    "LeanTables",
    "build_tables",
    "LEAN_CONFIG_SPACE",
    "LEAN_DEFAULT_CONFIG",
    "prune_lean_configs",
    "lean_compile_args",
    "lean_decode_triton",
    "lean_configs",
    "gpu_plan",
    "lean_compile_spec",
    "LEAN_IMPL",
    "LEAN_IMPL_NAME",
]

_SEG_FIELDS = 6  # seq, kv head, key_lo, key_hi, partial slot, first real key (start)
_RED_FIELDS = 4  # seq, kv head, first slot, last slot + 1


# ======================================================================================
# Kernels
# ======================================================================================


@triton.jit
def _lean_partial_kernel(
    Q, K, V, O, LSE, OP, LSEP,
    SEG, WSEG, LENS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_ps, stride_pr, stride_pd,  # partial out [slots, G*Lq, D]
    stride_qs, stride_qr,  # partial lse [slots, G*Lq]
    G, LQ, D,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong; fp32 dot of bf16 values is exact
):
    # grid: (num_workers,) — persistent, one program per plan worker
    w = tl.program_id(0)
    seg_lo = tl.load(WSEG + w)
    seg_hi = tl.load(WSEG + w + 1)
    rows = tl.arange(0, BLOCK_M)  # folded GQA rows
    row_ok = rows < G * LQ
    i_pos = rows % LQ
    g = rows // LQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    for s in range(seg_lo, seg_hi):
        # -- segment: (b, kv head hk) over real keys [lo, hi), first real key at `start` ----
        b = tl.load(SEG + s * 6 + 0)
        hk = tl.load(SEG + s * 6 + 1)
        lo = tl.load(SEG + s * 6 + 2)
        hi = tl.load(SEG + s * 6 + 3)
        slot = tl.load(SEG + s * 6 + 4)
        start = tl.load(SEG + s * 6 + 5)
        n = tl.load(LENS + b)
        h = hk * G + g  # query head of each row
        q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i_pos[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        k_base = K + b * stride_kb + hk * stride_kh + start * stride_kn
        v_base = V + b * stride_vb + hk * stride_vh + start * stride_vn
        m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_D)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n  # [BLOCK_N] real-key index
            col_ok = cols < hi
            # -- compute qk (log2 domain) ---------------------------------------------------
            k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            if DOT_UPCAST:
                qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
            else:
                qk = tl.dot(q, k, input_precision=DOT_PRECISION)
            qk = qk * qk_scale
            visible = col_ok[None, :]
            if IS_CAUSAL:
                visible = visible & (cols[None, :] <= n - LQ + i_pos[:, None])
            qk = tl.where(visible, qk, float("-inf"))
            # -- online softmax: m, l, acc += P @ V; a row that has seen no key keeps m = -inf, l = 0
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, qk, v_ptrs, col_ok[:, None] & d_ok[None, :], False,
                                                DOT_PRECISION, DOT_UPCAST)
        # -- epilogue: normalise, lse to natural log; whole outputs go straight to O -------
        out, lse = softmax_epilogue(m_i, l_i, acc, False)
        if slot < 0:
            tl.store(O + b * stride_ob + h[:, None] * stride_oh + i_pos[:, None] * stride_om + offs_d[None, :] * stride_od,
                     out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            tl.store(LSE + b * stride_lb + h * stride_lh + i_pos * stride_lm, lse, mask=row_ok)
        else:
            tl.store(OP + slot * stride_ps + rows[:, None] * stride_pr + offs_d[None, :] * stride_pd, out,
                     mask=row_ok[:, None] & d_ok[None, :])
            tl.store(LSEP + slot * stride_qs + rows * stride_qr, lse, mask=row_ok)


@triton.jit
def _lean_reduce_kernel(
    OP, LSEP, O, LSE, RED,
    stride_ps, stride_pr, stride_pd,
    stride_qs, stride_qr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    G, LQ, D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (num split outputs,); each merges its partial slots [s_lo, s_hi)
    r = tl.program_id(0)
    b = tl.load(RED + r * 4 + 0)
    hk = tl.load(RED + r * 4 + 1)
    s_lo = tl.load(RED + r * 4 + 2)
    s_hi = tl.load(RED + r * 4 + 3)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < G * LQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # -- pass 1: max lse --------------------------------------------------------------------
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(s_lo, s_hi):
        m = tl.maximum(m, tl.load(LSEP + s * stride_qs + rows * stride_qr, mask=row_ok, other=float("-inf")))
    m_safe = finite_or_zero(m)
    # -- pass 2: out = sum_i exp(lse_i - m) o_i / sum_i exp(lse_i - m) (empty partials weigh 0) --
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(s_lo, s_hi):
        ls = tl.load(LSEP + s * stride_qs + rows * stride_qr, mask=row_ok, other=float("-inf"))
        o = tl.load(OP + s * stride_ps + rows[:, None] * stride_pr + offs_d[None, :] * stride_pd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc, den = lse_merge_step(acc, den, m_safe, ls, o, False)
    out, lse = lse_merge_epilogue(acc, den, m_safe)
    h = hk * G + rows // LQ
    i_pos = rows % LQ
    tl.store(O + b * stride_ob + h[:, None] * stride_oh + i_pos[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + i_pos * stride_lm, lse, mask=row_ok)


# ======================================================================================
# Config space and pruning
# ======================================================================================


def _cfg(bn: int, w: int, s: int) -> KernelConfig:
    return KernelConfig.make(num_warps=w, num_stages=s, BLOCK_N=bn)


LEAN_CONFIG_SPACE: tuple[KernelConfig, ...] = tuple(
    _cfg(bn, w, s) for bn in (32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3)
)
# Fallback: no spills on sm_80/sm_90 for head dims <= 128 (tests/codegen/lean_decode/test_lean_triton.py).
LEAN_DEFAULT_CONFIG = _cfg(64, 4, 2)


def prune_lean_configs(configs: Sequence[KernelConfig], rows: int, head_dim: int, dtype: torch.dtype,
                       tile: int) -> list[KernelConfig]:
    """Drop configs that cannot fit or cannot pay: ``BLOCK_N`` must divide the plan tile (so a
    segment never ends mid-block except at a sequence end), 8 warps only for >= 64-key blocks,
    and K/V stages plus the score tile within sm_80's shared memory and a register budget."""
    bm = max(16, triton.next_power_of_2(rows))
    bd = max(16, triton.next_power_of_2(head_dim))
    el = 4 if dtype == torch.float32 else 2
    keep = []
    for c in configs:
        bn = c["BLOCK_N"]
        if tile % bn or (c.num_warps == 8 and bn < 64):
            continue
        smem = max(1, c.num_stages) * bn * 2 * bd * el + bm * bd * el
        regs = (bm * bd + bm * bn) / (32 * c.num_warps)
        if smem > 163 * 1024 or regs > 160:
            continue
        keep.append(c)
    return keep or [LEAN_DEFAULT_CONFIG]


# ======================================================================================
# Plan tables and launcher
# ======================================================================================


class LeanTables:
    """A plan's segment table, worker CSR and reduction map as int32 device tensors (plan once)."""

    def __init__(self, plan: "LeanPlan", starts: Sequence[int], device: torch.device | str) -> None:
        seg = [(s.seq, s.head, s.key_lo, s.key_hi, s.partial, starts[s.seq]) for s in plan.segments]
        red = []
        for o in plan.split_outputs:
            segs = plan.segments[plan.output_segments[o]:plan.output_segments[o + 1]]
            slots = [s.partial for s in segs]
            assert slots == list(range(slots[0], slots[0] + len(slots))), "partials of an output are contiguous"
            red.append((segs[0].seq, segs[0].head, slots[0], slots[-1] + 1))
        self.plan = plan
        self.starts = tuple(starts)
        self.seg = torch.tensor(seg or [(0,) * _SEG_FIELDS], dtype=torch.int32, device=device).reshape(-1)
        self.wseg = torch.tensor(plan.worker_segments, dtype=torch.int32, device=device)
        self.lens = torch.tensor(plan.lengths, dtype=torch.int32, device=device)
        self.red = torch.tensor(red or [(0,) * _RED_FIELDS], dtype=torch.int32, device=device).reshape(-1)
        self.num_red = len(red)


def build_tables(plan: "LeanPlan", starts: Sequence[int] | None, device: torch.device | str) -> LeanTables:
    """Upload a plan's tables once per batch; every layer's launch reuses them."""
    return LeanTables(plan, starts if starts is not None else (0,) * len(plan.lengths), device)


def lean_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: "LeanPlan",
    starts: Sequence[int] | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    tables: LeanTables | None = None,
    config: KernelConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode attention over ragged KV as a persistent stream-K Triton kernel plus a reduction.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, Lq, D]`` queries, fp32/fp16/bf16, ``D <= 256``, ``Hq = G * Hkv``.
    k, v : Tensor
        ``[B, Hkv, S, D]`` (padded) cache; row ``b``'s real keys start at ``starts[b]``.
    plan : LeanPlan
        :func:`graphtune.codegen.lean_decode.plan.make_plan`; one program per worker. Its tile should be
        a multiple of ``BLOCK_N``.
    starts : sequence of int, optional
        First real key of each row (left padding), default 0.
    is_causal : bool
        Bottom-right causal over the real keys.
    scale : float, optional
        Softmax scale (default ``1/sqrt(D)``).
    tables : LeanTables, optional
        ``build_tables(plan, starts, device)``, built once per batch.
    config : KernelConfig, optional
        ``BLOCK_N``, warps, stages; default :data:`LEAN_DEFAULT_CONFIG`.

    Returns
    -------
    (out, lse) : ``[B, Hq, Lq, D]`` in ``q.dtype`` and fp32 ``[B, Hq, Lq]``.

    Examples
    --------
    On a CPU, run it in the interpreter: set ``TRITON_INTERPRET=1`` *before* triton is first
    imported (:func:`graphtune.codegen.triton_util.kernel_for` raises a ``KernelError`` otherwise).

    >>> import torch  # doctest: +SKIP
    >>> from graphtune.codegen.lean_decode.plan import make_plan  # doctest: +SKIP
    >>> q, k = torch.randn(2, 4, 1, 16, device="cuda"), torch.randn(2, 2, 100, 16, device="cuda")  # doctest: +SKIP
    >>> plan = make_plan([100, 9], num_kv_heads=2, tile=32, num_workers=3)  # doctest: +SKIP
    >>> out, lse = lean_attention_triton(q, k, k, plan, starts=[0, 91])  # doctest: +SKIP
    >>> out.shape  # doctest: +SKIP
    torch.Size([2, 4, 1, 16])
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"lean attention: q, k, v must be [B, H, L, D], got ranks {q.dim()}, {k.dim()}, {v.dim()}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"lean attention: dtypes {q.dtype}, {k.dtype}, {v.dtype} (need one of fp32/fp16/bf16)")
    B, hq, lq, d = q.shape
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != d or d > 256 or k.shape[:3] != v.shape[:3]:
        raise ShapeError(f"lean attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if len(plan.lengths) != B or k.shape[0] != B or k.shape[1] != plan.num_kv_heads or hq % plan.num_kv_heads:
        raise PlanError(f"lean attention: plan (B={len(plan.lengths)}, Hkv={plan.num_kv_heads}) does not fit "
                        f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    if tables is None or tables.plan is not plan:
        tables = build_tables(plan, starts, q.device)
    for b, (s0, n) in enumerate(zip(tables.starts, plan.lengths)):
        if s0 < 0 or s0 + n > k.shape[2]:
            raise PlanError(f"lean attention: sequence {b} keys [{s0}, {s0 + n}) exceed the {k.shape[2]} cached keys")
    cfg = config or LEAN_DEFAULT_CONFIG
    G = hq // plan.num_kv_heads
    rows = G * lq
    bm, bd = max(16, triton.next_power_of_2(rows)), max(16, triton.next_power_of_2(d))
    scale = softmax_scale(scale, d)
    out = torch.empty((B, hq, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, hq, lq), dtype=torch.float32, device=q.device)
    n_part = max(1, plan.num_partials)
    op = torch.empty((n_part, rows, d), dtype=torch.float32, device=q.device)
    lsep = torch.empty((n_part, rows), dtype=torch.float32, device=q.device)
    kernel_for(_lean_partial_kernel, q.device, "lean decode")[(plan.num_workers,)](
        q, k, v, out, lse, op, lsep, tables.seg, tables.wseg, tables.lens,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *op.stride(), *lsep.stride(),
        G, lq, d, scale * LOG2E.value,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, IS_CAUSAL=bool(is_causal and lq > 1),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if tables.num_red:
        kernel_for(_lean_reduce_kernel, q.device, "lean decode")[(tables.num_red,)](
            op, lsep, out, lse, tables.red,
            *op.stride(), *lsep.stride(), *out.stride(), *lse.stride(),
            G, lq, d, BLOCK_M=bm, BLOCK_D=bd, num_warps=4, num_stages=1,
        )
    return out, lse


# ======================================================================================
# Registry: implementation "triton.lean_decode" of op "lean_decode" (the CPU impl's op arguments)
# ======================================================================================

LEAN_IMPL_NAME = "triton.lean_decode"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the SM count the plan assumes for CPU tensors under the interpreter (as the runtime does)
_STAND_IN_SMS = 4


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _STAND_IN_SMS


def gpu_plan(lengths: Sequence[int], num_kv_heads: int, head_dim: int, num_sms: int) -> LeanPlan:
    """The GPU schedule of a batch: ORT's tile for the head dim (:func:`~.plan.default_tile`) and 2
    persistent programs per SM, fewer for little work (:func:`~.plan.gpu_num_workers`)."""
    tile = default_tile(head_dim)
    tiles = [-(-n // tile) for n in lengths]
    return make_plan(lengths, num_kv_heads, tile, gpu_num_workers(sum(tiles) * num_kv_heads, num_sms, max(tiles)))


@functools.lru_cache(maxsize=16)
def _tables_for(lengths: tuple[int, ...], starts: tuple[int, ...], num_kv_heads: int, head_dim: int,
                device: torch.device) -> LeanTables:
    # plan once per batch, run per layer: the tuner times the per-layer launch (like cpu.lean's caches)
    return build_tables(gpu_plan(lengths, num_kv_heads, head_dim, _num_sms(device)), starts, device)


def lean_decode_triton(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                       config: KernelConfig | None = None):
    """The lean Triton path on attention's arguments, as implementation ``triton.lean_decode`` of op ``lean_decode``.

    Same contract as :func:`graphtune.codegen.lean_decode.cpu.lean_decode_cpu`: ``attn_mask`` (bool
    or 0/-inf additive, ``[B, 1, q_len, S]``) allows one contiguous range of real keys per row,
    optionally bottom-right causal among them; the plan (:func:`gpu_plan`) and its device tables
    are built from it once and cached. ``config``: ``BLOCK_N``, warps, stages of the partial
    kernel. Bad arguments raise :class:`ShapeError`; a kernel failure raises :class:`KernelError`.
    """
    if not lean_args_supported((q, k, v, attn_mask, is_causal, scale, enable_gqa)):
        raise ShapeError(f"lean_decode: not a decode call lean decode serves: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"is_causal={is_causal}, enable_gqa={enable_gqa}, mask "
                         f"{None if attn_mask is None else tuple(attn_mask.shape)}")
    starts, lengths, causal = _padding_of(attn_mask, q.shape[0], q.shape[2], k.shape[2])
    tables = _tables_for(lengths, starts, k.shape[1], q.shape[-1], q.device)
    try:
        return lean_attention_triton(q, k, v, tables.plan, starts, is_causal=causal, scale=scale, tables=tables,
                                     config=config)
    except (ShapeError, PlanError, KernelError):
        raise
    except Exception as e:  # compile error, OutOfResources, no device/interpreter...
        raise KernelError(f"lean_decode_triton[{config}] failed: {type(e).__name__}: {e}") from e


def _supports(args: tuple) -> bool:
    a = AttentionArgs.of(args)
    q, k, v = a.q, a.k, a.v
    dev_ok = q.device.type == "cuda" or (q.device.type == "cpu" and interpreting())
    return (dev_ok and q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 4
            and q.shape[-1] <= 256 and lean_args_supported(args))


def lean_configs(op_args: tuple) -> list[KernelConfig]:
    """Pruned config space (:func:`prune_lean_configs`, plan tile of :func:`gpu_plan`) for the op
    arguments ``(q, k, v, attn_mask, is_causal, scale, enable_gqa)``; always has the default."""
    a = AttentionArgs.of(op_args)
    q, k = a.q, a.k
    rows = q.shape[1] // k.shape[1] * q.shape[2]
    keep = prune_lean_configs(LEAN_CONFIG_SPACE, rows, q.shape[-1], q.dtype, default_tile(q.shape[-1]))
    return keep if LEAN_DEFAULT_CONFIG in keep else [LEAN_DEFAULT_CONFIG, *keep]


LEAN_IMPL = register_impl(Impl(
    op=LEAN_OP,
    name=LEAN_IMPL_NAME,
    device="cuda",
    fn=lean_decode_triton,
    default=LEAN_DEFAULT_CONFIG,
    configs=lean_configs,
    # the python sources of both kernels, the blocks they call and the host planning: same hash compiled
    # or interpreted
    source_hash=source_hash(_lean_partial_kernel.fn, _lean_reduce_kernel.fn,
                            *dict.fromkeys(jit_deps(_lean_partial_kernel) + jit_deps(_lean_reduce_kernel)),
                            lean_decode_triton, gpu_plan, _padding_of, LeanTables),
    supports=_supports,
))


# ======================================================================================
# Cross-compilation arguments (graphtune.codegen.crosscompile.compile_for_target)
# ======================================================================================


def lean_compile_args(dtype: torch.dtype, group: int, q_len: int, head_dim: int, config: KernelConfig,
                      is_causal: bool = False, *, num_kv_heads: int = 8, kv_len: int = 4096) -> dict[str, tuple]:
    """``{kernel name: (fn, args, kwargs)}`` for cross-compiling both lean kernels, tensors as dtypes.

    Strides of a contiguous ``[B, H, S, D]`` layout (unit last stride, as a real launch would
    specialise), by default a 4K-key cache and 8 kv heads.
    """
    bm, bd = max(16, triton.next_power_of_2(group * q_len)), max(16, triton.next_power_of_2(head_dim))
    hkv, S, d, rows = num_kv_heads, kv_len, head_dim, group * q_len
    hq = group * hkv
    qs = (hq * q_len * d, q_len * d, d, 1)
    ks = (hkv * S * d, S * d, d, 1)
    os_ = qs
    ls = (hq * q_len, q_len, 1)
    ps, pl = (rows * d, d, 1), (rows, 1)
    i32, f32 = torch.int32, torch.float32
    partial = (
        (dtype, dtype, dtype, dtype, f32, f32, f32, i32, i32, i32, *qs, *ks, *ks, *os_, *ls, *ps, *pl,
         group, q_len, d, 0.125 * LOG2E.value),
        dict(BLOCK_M=bm, BLOCK_N=config["BLOCK_N"], BLOCK_D=bd, IS_CAUSAL=bool(is_causal and q_len > 1),
             DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", DOT_UPCAST=False),
    )
    reduce = (
        (f32, f32, dtype, f32, i32, *ps, *pl, *os_, *ls, group, q_len, d),
        dict(BLOCK_M=bm, BLOCK_D=bd),
    )
    return {"partial": (_lean_partial_kernel, *partial), "reduce": (_lean_reduce_kernel, *reduce)}


def lean_compile_spec(op_args: tuple, config: KernelConfig) -> CompileSpec:
    """The partial kernel's launch for op arguments ``(q, k, v, attn_mask, is_causal, scale, enable_gqa)``
    (meta tensors fine) and ``config`` (the reduction runs at a fixed ``w4, s1`` and is not tuned).

    Meta tensors have no mask values, so the real key ranges are unknown: the plan is modelled on
    the padded length ``S`` for every row, and ``q_len > 1`` with a mask is taken as bottom-right
    causal (HF's decode mask for several queries). ``programs``: :func:`gpu_plan`'s persistent
    workers on a 132-SM part (H100; the score's busy-SM term saturates there either way).
    """
    a = AttentionArgs.of(op_args)
    q, k, mask = a.q, a.k, a.attn_mask
    B, hq, lq, d = (int(x) for x in q.shape)
    hkv, S = int(k.shape[1]), int(k.shape[2])
    group = hq // hkv
    fn, args, kwargs = lean_compile_args(q.dtype, group, lq, d, config, is_causal=mask is not None and lq > 1,
                                         num_kv_heads=hkv, kv_len=S)["partial"]
    plan_workers = gpu_plan([max(1, S)] * B, hkv, d, 132).num_workers
    eff = (group * lq / kwargs["BLOCK_M"]) * (d / kwargs["BLOCK_D"])
    return CompileSpec(fn, args, kwargs, programs=plan_workers, tile_efficiency=eff)


register_compile_spec(LEAN_IMPL_NAME, lean_compile_spec)
