"""Lean-attention decode on the CPU: plan ranges run by real worker threads, then an exact merge.

A :class:`~graphtune.codegen.lean_decode.plan.LeanPlan` gives each worker a contiguous range of KV
tiles that may cross head and sequence boundaries. Here a worker's range becomes a short list
of calls to ATen's CPU flash kernel (which returns the LSE and releases the GIL), on *views*
of the unpadded keys — no gather, no padding work:

* consecutive whole outputs of one sequence fold into one call over a block of kv heads
  (the GQA group of each kv head are that call's query heads), and consecutive sequences whose
  every head is whole and that share length and first key fold into one batched call;
* a head cut by a worker boundary is one call over its key sub-range, writing a partial
  ``(out, lse)`` that :func:`graphtune.ir.reference.merge_states_ref` reduces exactly afterwards.

Modes (measured in ``benchmarks/bench_lean_decode.py``, see ``docs/ops/lean_decode.md``):
``"threads"`` runs each worker on a pool thread with ``torch.set_num_threads(1)`` (per-thread
OpenMP setting; the caller's thread count is untouched); ``"serial"`` runs the workers' calls
one after another on the calling thread, leaving parallelism to ATen's intra-op threads.

Registered with the autotuner as op ``lean_decode``, implementation ``cpu.lean``
(:func:`lean_decode_cpu`): knobs ``TILE`` (keys per tile), ``WORKERS`` (0 = ``GRAPHTUNE_NUM_THREADS``
or torch's threads) and ``SERIAL`` (1 = mode ``"serial"``). The default, ``TILE=256, WORKERS=0,
SERIAL=0``, is the runtime's untuned choice.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from graphtune import flags
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.errors import PlanError, ShapeError
from graphtune.ir.args import AttentionArgs
from graphtune.ir.reference import merge_lse, merge_states_ref

from graphtune.codegen.lean_decode.plan import LeanPlan, make_plan

__all__ = ["CpuCall", "CpuProgram", "build_cpu_program", "lean_attention_cpu", "MODES",
           "lean_decode_cpu", "lean_args_supported", "resolve_config", "DEFAULT_TILE", "DEFAULT_CONFIG", "LEAN_OP",
           "IMPL_NAME"]

MODES = ("threads", "serial")
LEAN_OP, IMPL_NAME = "lean_decode", "cpu.lean"
DEFAULT_TILE = 256
DEFAULT_CONFIG = KernelConfig.make(TILE=DEFAULT_TILE, WORKERS=0, SERIAL=0)
_flash = torch._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class CpuCall:
    """One flash-kernel call: kv heads ``[h0, h1)`` of sequences ``[seq, seq_end)`` over keys ``[key_lo, key_hi)``."""

    seq: int
    h0: int
    h1: int
    key_lo: int
    key_hi: int
    partial: int  # scratch slot (then h1 == h0 + 1 and one sequence), or -1: the call writes final outputs
    seq_end: int = -1  # -1: seq + 1

    @property
    def seq_hi(self) -> int:
        return self.seq + 1 if self.seq_end < 0 else self.seq_end


@dataclass(frozen=True)
class CpuProgram:
    """The plan lowered to per-worker call lists; build once per plan, run per layer."""

    plan: "LeanPlan"
    starts: tuple[int, ...] | None  # first real keys the calls were folded for (None: no cross-sequence folds)
    calls: tuple[tuple[CpuCall, ...], ...]  # per worker
    merges: tuple[tuple[int, int, tuple[int, ...]], ...]  # (seq, kv head, partial slots) per split output


def build_cpu_program(plan: "LeanPlan", starts: Sequence[int] | None = None) -> CpuProgram:
    """Lower a plan to per-worker flash calls, folding whole outputs into as few calls as possible.

    With ``starts`` (first real key per row), whole sequences of equal length and start also fold
    into one call over a block of rows; the program is then only valid for those starts.
    """
    hkv = plan.num_kv_heads
    calls: list[tuple[CpuCall, ...]] = []
    for w in range(plan.num_workers):
        mine: list[CpuCall] = []
        for s in plan.segments[plan.worker_segments[w]:plan.worker_segments[w + 1]]:
            prev = mine[-1] if mine else None
            if (s.partial < 0 and prev is not None and prev.partial < 0 and prev.seq == s.seq
                    and prev.h1 == s.head and prev.key_lo == s.key_lo and prev.key_hi == s.key_hi):
                mine[-1] = CpuCall(s.seq, prev.h0, s.head + 1, s.key_lo, s.key_hi, -1)
            else:
                mine.append(CpuCall(s.seq, s.head, s.head + 1, s.key_lo, s.key_hi, s.partial))
        if starts is not None:
            mine = _fold_sequences(mine, plan, starts, hkv)
        calls.append(tuple(mine))
    merges = []
    for o in plan.split_outputs:
        segs = plan.segments[plan.output_segments[o]:plan.output_segments[o + 1]]
        b, h = divmod(o, plan.num_kv_heads)
        merges.append((b, h, tuple(s.partial for s in segs)))
    return CpuProgram(plan, tuple(starts) if starts is not None else None, tuple(calls), tuple(merges))


def _fold_sequences(calls: list[CpuCall], plan: "LeanPlan", starts: Sequence[int], hkv: int) -> list[CpuCall]:
    out: list[CpuCall] = []
    for c in calls:
        p = out[-1] if out else None
        whole = c.partial < 0 and c.h0 == 0 and c.h1 == hkv
        if (whole and p is not None and p.partial < 0 and p.h0 == 0 and p.h1 == hkv and p.seq_hi == c.seq
                and plan.lengths[c.seq] == plan.lengths[p.seq] and starts[c.seq] == starts[p.seq]):
            out[-1] = CpuCall(p.seq, 0, hkv, p.key_lo, p.key_hi, -1, c.seq + 1)
        else:
            out.append(c)
    return out


_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _forget_pools_in_child() -> None:
    # A forked child has none of the parent's pool threads (a pool that looks full would queue work
    # that nothing runs) and may inherit _pool_lock held: start afresh, without shutting anything down.
    global _pool_lock
    _pools.clear()
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def _one_intra_op_thread(started: threading.Barrier) -> None:
    torch.set_num_threads(1)
    torch.get_num_threads()  # ATen fixes a thread's count at its first parallel query: do it now
    started.wait()


def _pool(n: int) -> ThreadPoolExecutor:
    # One persistent pool per size: thread start-up (~100 µs) would dominate small decode steps.
    with _pool_lock:
        p = _pools.get(n)
        if p is None:
            p = _pools[n] = _start_pool(n)
        return p


def _start_pool(n: int) -> ThreadPoolExecutor:
    """A pool of ``n`` threads, each running torch with one intra-op thread.

    Why the dance: ``torch.set_num_threads`` also sets the process default that every thread
    started later inherits (a serving thread pool created after warm-up would run torch on one
    thread). So all workers are started at once, each fixes its own count at 1, and then the
    caller restores the default for everyone else.
    """
    prev = torch.get_num_threads()
    pool = ThreadPoolExecutor(n, thread_name_prefix="graphtune-lean")
    started = threading.Barrier(n + 1)
    for _ in range(n):
        pool.submit(_one_intra_op_thread, started)
    started.wait()
    torch.set_num_threads(prev)
    return pool


def _check(q: Tensor, k: Tensor, v: Tensor, plan: "LeanPlan", starts: Sequence[int]) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"lean attention: q, k, v must be [B, H, L, D], got ranks {q.dim()}, {k.dim()}, {v.dim()}")
    B, hq, _, _ = q.shape
    if k.shape[0] != B or v.shape[0] != B or len(plan.lengths) != B or len(starts) != B:
        raise PlanError(f"lean attention: batch {B} of q, {k.shape[0]} of k, {len(plan.lengths)} in the plan "
                        f"and {len(starts)} starts must agree")
    if k.shape[1] != plan.num_kv_heads or hq % plan.num_kv_heads:
        raise PlanError(f"lean attention: plan has {plan.num_kv_heads} kv heads; k has {k.shape[1]}, q has {hq}")
    for b, (s, n) in enumerate(zip(starts, plan.lengths)):
        if s < 0 or s + n > k.shape[2]:
            raise PlanError(f"lean attention: sequence {b} keys [{s}, {s + n}) exceed the {k.shape[2]} cached keys")
    if q.shape[-1] != k.shape[-1] or v.shape[-1] != q.shape[-1] or k.shape[:3] != v.shape[:3]:
        raise ShapeError(f"lean attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"lean attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    return hq // plan.num_kv_heads


def lean_attention_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: "LeanPlan",
    starts: Sequence[int] | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    program: CpuProgram | None = None,
    mode: str = "threads",
) -> tuple[Tensor, Tensor]:
    """Decode attention over ragged KV, split by a lean plan, on CPU worker threads.

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, Lq, D]`` decode queries (``Lq`` small: 1 or a speculative width).
    k, v : Tensor
        ``[B, Hkv, S, D]`` key/value cache, possibly padded; sequence ``b``'s real keys are
        ``[starts[b], starts[b] + plan.lengths[b])``. ``Hq`` must be a multiple of ``Hkv`` (GQA).
    plan : LeanPlan
        From :func:`graphtune.codegen.lean_decode.plan.make_plan` (``plan.num_workers`` threads).
    starts : sequence of int, optional
        First real key of each row (left padding); default 0.
    is_causal : bool
        Bottom-right causal alignment (query ``i`` sees real keys ``j <= len - Lq + i``).
    scale : float, optional
        Softmax scale, default ``1/sqrt(D)``.
    program : CpuProgram, optional
        ``build_cpu_program(plan)``, to skip lowering on every layer.
    mode : {"threads", "serial"}
        Worker threads or the calling thread (see the module docstring).

    Returns
    -------
    (out, lse) : ``[B, Hq, Lq, D]`` in ``q.dtype`` and fp32 ``[B, Hq, Lq]`` natural-log LSE.

    Examples
    --------
    >>> import torch
    >>> from graphtune.codegen.lean_decode.plan import make_plan
    >>> q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 300, 16)
    >>> plan = make_plan([300, 7], num_kv_heads=2, tile=64, num_workers=2)
    >>> out, lse = lean_attention_cpu(q, k, k, plan, starts=[0, 293])
    >>> out.shape, lse.shape
    (torch.Size([2, 4, 1, 16]), torch.Size([2, 4, 1]))
    """
    if mode not in MODES:
        raise PlanError(f"lean attention: mode {mode!r} must be one of {MODES}")
    starts = tuple(starts) if starts is not None else (0,) * q.shape[0]
    G = _check(q, k, v, plan, starts)
    if program is None or program.plan is not plan:
        program = build_cpu_program(plan, starts)
    elif program.starts is not None and program.starts != starts:
        raise PlanError("lean attention: the program was built for other sequence starts than given")
    B, hq, lq, d = q.shape
    out = q.new_empty((B, hq, lq, v.shape[-1]))
    lse = torch.empty((B, hq, lq), dtype=torch.float32)
    parts: list[tuple[Tensor, Tensor] | None] = [None] * plan.num_partials

    def run_call(c: CpuCall) -> None:
        n, s0, b0, b1 = plan.lengths[c.seq], starts[c.seq], c.seq, c.seq_hi
        qs = q[b0:b1, c.h0 * G:c.h1 * G]  # [rows, G*(h1-h0), Lq, D]
        ks = k[b0:b1, c.h0:c.h1, s0 + c.key_lo:s0 + c.key_hi]  # [rows, h1-h0, keys, D]
        vs = v[b0:b1, c.h0:c.h1, s0 + c.key_lo:s0 + c.key_hi]
        mask, dead = None, 0
        if is_causal and lq > 1 and c.key_hi > n - lq + 1:
            # bottom-right causal: query i sees keys j <= n - lq + i; rows whose window ends
            # before key_lo see nothing here (flash gives lse 0 for them: fix to -inf below).
            i = torch.arange(lq)[:, None]
            j = torch.arange(c.key_lo, c.key_hi)[None, :]
            mask = torch.zeros((lq, c.key_hi - c.key_lo), dtype=q.dtype).masked_fill_(j > n - lq + i, float("-inf"))
            mask = mask[None, None]
            dead = max(0, min(lq, c.key_lo - (n - lq)))
        o, l = _flash(qs, ks, vs, 0.0, False, attn_mask=mask, scale=scale)
        if dead:
            l[..., :dead] = float("-inf")
            o[..., :dead, :] = 0
        if c.partial < 0:
            out[b0:b1, c.h0 * G:c.h1 * G].copy_(o)
            lse[b0:b1, c.h0 * G:c.h1 * G].copy_(l)
        else:
            parts[c.partial] = (o[0], l[0])

    def run_worker(calls: tuple[CpuCall, ...]) -> None:
        for c in calls:
            run_call(c)

    work = [c for c in program.calls if c]
    if mode == "threads" and len(work) > 1:
        futs = [_pool(len(work)).submit(run_worker, c) for c in work]
        for f in futs:
            f.result()  # re-raises a worker's exception here
    else:
        for c in work:
            run_worker(c)

    for b, h, slots in program.merges:
        o, l = merge_states_ref([parts[s][0] for s in slots], [parts[s][1] for s in slots])  # type: ignore[index]
        out[b, h * G:(h + 1) * G].copy_(o)
        lse[b, h * G:(h + 1) * G].copy_(l)
    return out, lse


# ----------------------------------------------------------------------------------------
# the lean CPU path as a tunable implementation of op "lean_decode"
# ----------------------------------------------------------------------------------------

def resolve_config(config: KernelConfig) -> tuple[int, int, str]:
    """``(tile, workers, mode)`` of a ``cpu.lean`` config (``WORKERS=0``: ``GRAPHTUNE_NUM_THREADS`` or torch's)."""
    workers = config.get("WORKERS", 0) or flags.get("NUM_THREADS") or torch.get_num_threads()
    return max(1, config.get("TILE", DEFAULT_TILE)), max(1, workers), "serial" if config.get("SERIAL", 0) else "threads"


# Plan once per batch, run per layer: the tuner times the per-layer run, so both the mask's row
# ranges (keyed by the mask object, kept alive so its id is not reused) and the programs are cached.
_ranges: "OrderedDict[tuple, tuple[Tensor, tuple[int, ...], tuple[int, ...], bool]]" = OrderedDict()
_programs: "OrderedDict[tuple, CpuProgram]" = OrderedDict()
_CACHE_SIZE = 16


def _lru_put(cache: OrderedDict, key: tuple, value: object) -> None:
    cache[key] = value
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _padding_of(mask: Tensor | None, B: int, lq: int, S: int) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """``(starts, lengths, causal)`` of a padding (+ bottom-right causal) mask; ShapeError for any other mask."""
    if mask is None:
        return (0,) * B, (S,) * B, False
    key = (id(mask), mask._version, B, lq, S)
    hit = _ranges.get(key)
    if hit is not None and hit[0] is mask:
        return hit[1], hit[2], hit[3]
    m = mask
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 3:
        raise ShapeError(f"lean_decode: mask must be [B, 1, q_len, S], got {tuple(mask.shape)}")
    if m.dtype == torch.bool:
        allowed = m
    else:  # additive: only 0 and "minus infinity" (HF uses finfo.min) are padding
        big = m <= torch.finfo(m.dtype).min / 2
        if not bool(((m == 0) | big).all()):
            raise ShapeError("lean_decode: the additive mask is a bias, not a padding mask")
        allowed = ~big
    allowed = allowed.expand(B, lq, S)
    last = allowed[:, -1]  # [B, S]: the last query sees every real key of its row
    lengths = last.sum(dim=1)
    starts = last.int().argmax(dim=1)
    j = torch.arange(S)[None, :]
    pad = (j >= starts[:, None]) & (j < (starts + lengths)[:, None])  # [B, S]
    if bool((lengths == 0).any()) or not torch.equal(pad, last):
        raise ShapeError("lean_decode: every mask row must allow one non-empty contiguous key range")
    causal = False
    if not torch.equal(allowed, pad[:, None].expand(B, lq, S)):
        # query i sees real keys j - start <= len - lq + i
        tri = (j[None] - starts[:, None, None]) <= (lengths[:, None, None] - lq + torch.arange(lq)[None, :, None])
        if not (torch.equal(allowed, pad[:, None] & tri) and int(lengths.min()) >= lq):
            raise ShapeError("lean_decode: the mask is neither padding nor padding + bottom-right causal")
        causal = True
    out = (tuple(int(x) for x in starts), tuple(int(x) for x in lengths), causal)
    _lru_put(_ranges, key, (mask, *out))
    return out


def _program_for(lengths: tuple[int, ...], starts: tuple[int, ...], hkv: int, tile: int, workers: int) -> CpuProgram:
    key = (lengths, starts, hkv, tile, workers)
    p = _programs.get(key)
    if p is None:
        p = build_cpu_program(make_plan(lengths, hkv, tile, workers), starts)
        _lru_put(_programs, key, p)
    return p


def lean_decode_cpu(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                    config: KernelConfig = DEFAULT_CONFIG):
    """The lean CPU path on attention's arguments, as implementation ``cpu.lean`` of op ``lean_decode``.

    ``attn_mask`` (bool or 0/-inf additive, ``[B, 1, q_len, S]``) must allow one contiguous range of
    real keys per row, optionally bottom-right causal among them; the result equals
    ``attention_ref(q, k, v, attn_mask, ...)`` (masked keys weigh 0) but skips the padding.
    ``config``: ``TILE``, ``WORKERS``, ``SERIAL`` (see :func:`resolve_config`). Returns ``(out, lse)``.

    Examples
    --------
    >>> from graphtune.ir.reference import attention_ref
    >>> q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 300, 16)
    >>> mask = (torch.arange(300) >= torch.tensor([0, 293])[:, None])[:, None, None]  # rows of 300 and 7 keys
    >>> cfg = KernelConfig.make(TILE=64, WORKERS=2, SERIAL=0)
    >>> out, lse = lean_decode_cpu(q, k, k, mask, enable_gqa=True, config=cfg)
    >>> torch.allclose(out, attention_ref(q, k, k, mask, enable_gqa=True)[0], atol=1e-5)
    True
    """
    if is_causal:
        raise ShapeError("lean_decode: top-left is_causal is not a decode mask; pass the padding mask")
    if q.dim() != 4 or k.dim() != 4:
        raise ShapeError(f"lean_decode: q and k must be [B, H, L, D], got ranks {q.dim()}, {k.dim()}")
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ShapeError(f"lean_decode: {q.shape[1]} query heads over {k.shape[1]} kv heads need enable_gqa=True")
    starts, lengths, causal = _padding_of(attn_mask, q.shape[0], q.shape[2], k.shape[2])
    tile, workers, mode = resolve_config(config)
    program = _program_for(lengths, starts, k.shape[1], tile, workers)
    return lean_attention_cpu(q, k, v, program.plan, starts, is_causal=causal, scale=scale, program=program, mode=mode)


def lean_args_supported(args: tuple) -> bool:
    """Whether op ``lean_decode``'s args are a call lean decode serves, on any device (the CPU and Triton impls)."""
    a = AttentionArgs.of(args)
    q, k, v, mask = a.q, a.k, a.v, a.attn_mask
    return (q.dim() == 4 and k.dim() == 4 and not a.is_causal and 1 <= q.shape[2] <= 16
            and k.shape[2] >= 1 and v.shape[-1] == q.shape[-1] and q.shape[1] % k.shape[1] == 0
            and (a.enable_gqa or q.shape[1] == k.shape[1])
            and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-1] == k.shape[2])))


def _lean_supports(args: tuple) -> bool:
    a = AttentionArgs.of(args)
    return a.q.device.type == "cpu" and lean_args_supported(a)


def _lean_configs(args: tuple) -> list[KernelConfig]:
    # TILE: powers of two 64..2048, no larger than the padded length (beyond it every tile count is 1
    # per output, the same plan); WORKERS: 1..2x cores, no more than there are tiles; SERIAL only
    # means something with several workers.
    k = AttentionArgs.of(args).k
    B, hkv, S = k.shape[0], k.shape[1], k.shape[2]
    cores = os.cpu_count() or 1
    out = []
    tile = 64
    while tile <= 2048 and (tile == 64 or tile // 2 < S):
        n_tiles = B * hkv * -(-S // tile)
        for w in range(1, 2 * cores + 1):
            if w > n_tiles:
                break
            for serial in ((0, 1) if w > 1 else (0,)):
                out.append(KernelConfig.make(TILE=tile, WORKERS=w, SERIAL=serial))
        tile *= 2
    return out


register_impl(Impl(LEAN_OP, IMPL_NAME, "cpu", lean_decode_cpu, DEFAULT_CONFIG, _lean_configs,
                   source_hash(lean_decode_cpu, resolve_config, _padding_of, _program_for, build_cpu_program,
                               _fold_sequences, lean_attention_cpu, merge_states_ref, merge_lse),
                   _lean_supports))
