"""Lean-attention decode on the CPU: plan ranges run by real worker threads, then an exact merge.

A :class:`~graphtune.runtime.lean_plan.LeanPlan` gives each worker a contiguous range of KV
tiles that may cross head and sequence boundaries. Here a worker's range becomes a short list
of calls to ATen's CPU flash kernel (which returns the LSE and releases the GIL), on *views*
of the unpadded keys — no gather, no padding work:

* consecutive whole outputs of one sequence fold into one call over a block of kv heads
  (the GQA group of each kv head are that call's query heads), and consecutive sequences whose
  every head is whole and that share length and first key fold into one batched call;
* a head cut by a worker boundary is one call over its key sub-range, writing a partial
  ``(out, lse)`` that :func:`merge_partials` reduces exactly afterwards.

Modes (measured in ``benchmarks/bench_lean_decode.py``, see ``docs/lean-decode.md``):
``"threads"`` runs each worker on a pool thread with ``torch.set_num_threads(1)`` (per-thread
OpenMP setting; the caller's thread count is untouched); ``"serial"`` runs the workers' calls
one after another on the calling thread, leaving parallelism to ATen's intra-op threads.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from graphtune.errors import PlanError, ShapeError

if TYPE_CHECKING:  # the plan format only; no runtime import upward (ir -> codegen -> runtime)
    from graphtune.runtime.lean_plan import LeanPlan

__all__ = ["CpuCall", "CpuProgram", "build_cpu_program", "lean_attention_cpu", "merge_partials", "MODES"]

MODES = ("threads", "serial")
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


def merge_partials(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact merge of partial attentions over disjoint key sets (``merge_states`` semantics).

    ``outs[i]``: ``[..., L, D]``, ``lses[i]``: fp32 ``[..., L]``; empty partials have ``lse=-inf``.
    """
    lse = torch.stack(list(lses))  # [N, ..., L]
    m = lse.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)  # [N, ..., L]
    denom = w.sum(dim=0)
    acc = (w.unsqueeze(-1) * torch.stack([o.float() for o in outs])).sum(dim=0)
    out = acc / torch.where(denom > 0, denom, torch.ones_like(denom)).unsqueeze(-1)
    new_lse = torch.where(denom > 0, m + torch.log(denom), torch.full_like(m, float("-inf")))
    return out.to(outs[0].dtype), new_lse


_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    # One persistent pool per size: thread start-up (~100 µs) would dominate small decode steps.
    with _pool_lock:
        p = _pools.get(n)
        if p is None:
            p = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="graphtune-lean",
                                               initializer=torch.set_num_threads, initargs=(1,))
        return p


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
        From :func:`graphtune.runtime.lean_plan.make_plan` (``plan.num_workers`` threads).
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
    >>> from graphtune.runtime.lean_plan import make_plan
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
        o, l = merge_partials([parts[s][0] for s in slots], [parts[s][1] for s in slots])  # type: ignore[index]
        out[b, h * G:(h + 1) * G].copy_(o)
        lse[b, h * G:(h + 1) * G].copy_(l)
    return out, lse
