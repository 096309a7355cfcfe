"""Lean decode in the plan/run runtime: plan once per batch, pick the lean path per attention call.

The planner (run once per optimized forward by :func:`graphtune.runtime.context.batch_context`)
reads the HF ``[B, S]`` padding mask, finds each row's real key range and stores a
:class:`LeanBatch`. A mask without padding (one ``count_nonzero``, no scan) gets no plan at a decode
step under the measured rule — lean has nothing to skip there, and the selector then costs one dict
lookup per call (6 µs a forward instead of ~50 µs) — and, at a prefill, a plan marked ``unpadded``
whose only use is :func:`_unmasked_causal`: HF materializes the prompt's causal mask under Dynamo
(eagerly it passes none), and an exactly causal mask runs as SDPA ``is_causal``, which skips the
masked blocks. The selector (priority 5) sees every ``graphtune.attention`` /
``attention_with_lse`` call; on a decode-shaped call (``q_len <= 16``) of that batch whose
mask is exactly "padding (+ bottom-right causal for q_len > 1)" and where lean pays, it returns
the lean implementation, which attends over the real (unpadded) keys only — the same result as
the masked attention, since masked keys contribute nothing. CPU tensors run
:func:`graphtune.codegen.lean_decode.cpu.lean_attention_cpu` on worker threads; CUDA tensors run the
Triton kernels of :mod:`graphtune.codegen.lean_decode.triton_kernels` (tables uploaded once per batch).

When it pays (measured on this CPU, ``benchmarks/bench_lean_decode.py``, ``docs/ops/lean_decode.md``):
lean skips padding, so its gain is the padded/real work ratio ``S * B / sum(lengths)``; it costs
one kernel call per (worker, sequence) piece. ``GRAPHTUNE_LEAN_MIN_SKEW=-1`` (default) uses the
measured rule :func:`lean_pays`; a value >= 0 replaces it by "use lean iff padded/real >= value".

Tile and worker counts of the CPU path come from the tuning database (op ``lean_decode``, impl
``cpu.lean``, tuned with ``graphtune tune --lean ...``; key :func:`graphtune.autotune.shapes.lean_key`):
:func:`cpu_config` looks them up once per batch (an in-process cache answers repeated buckets),
else the default ``TILE=256``, workers = ``GRAPHTUNE_NUM_THREADS`` or torch's threads, mode threads.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from graphtune import flags
from graphtune.autotune import db as _db
from graphtune.autotune import fingerprint
from graphtune.autotune.shapes import lean_key
from graphtune.autotune.tuner import is_valid
from graphtune.codegen.lean_decode.cpu import (DEFAULT_CONFIG, DEFAULT_TILE, CpuProgram, build_cpu_program,
                                        lean_attention_cpu, resolve_config)
from graphtune.codegen.registry import KernelConfig, get_impl
from graphtune.errors import PlanError
from graphtune.ir.reference import attention_ref
from graphtune.runtime import context
from graphtune.codegen.lean_decode.plan import LeanPlan, make_plan, ranges_from_padding_mask

__all__ = ["LeanBatch", "plan_batch", "lean_pays", "is_causal_mask", "view_key", "cpu_config", "tuned_config",
           "clear_tuned_cache", "lean_selector", "install", "uninstall", "lean_for_lengths",
           "MAX_DECODE_QUERIES", "PLAN_NAME"]

PLAN_NAME = "lean_decode"
MAX_DECODE_QUERIES = 16  # decode and speculative verification widths
# Measured on this 2-core CPU (fp32, d=64; see docs/ops/lean_decode.md): one flash call costs ~30 µs
# of fixed overhead; the padded SDPA pays its whole padded length. Lean needs the padded work to
# exceed the real work by this factor, and enough real work to amortise its extra calls.
MEASURED_MIN_SKEW = 1.3
CALL_OVERHEAD_KEYS = 4096  # one extra flash call ~ the time of this many key-heads of work
CPU_TILE = DEFAULT_TILE  # the untuned tile (codegen.lean_decode.cpu.DEFAULT_CONFIG)


@dataclass
class LeanBatch:
    """The per-batch lean state: real key ranges, and plans/programs built on first use."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    total_keys: int  # padded S (cache + new tokens)
    programs: dict[tuple, Any] = field(default_factory=dict)  # CpuProgram, or Triton LeanTables
    masks: list[tuple[Any, int, str | None]] = field(default_factory=list)  # (mask, q_len, kind) checked (view_key)
    calls: int = 0  # attention calls run by the lean path (for explain / tests)
    decisions: dict[tuple, str] = field(default_factory=dict)
    configs: dict[tuple, tuple[int, int, str]] = field(default_factory=dict)  # (Hq, Hkv, Lq, D, dtype) -> cpu_config
    unpadded: bool = False  # every row holds all S keys (the planner did not scan the mask)
    causal_masks: list[tuple[Any, bool]] = field(default_factory=list)  # (mask, exactly causal?) checked

    @property
    def skew(self) -> float:
        """Padded over real work: ``S * B / sum(lengths)`` (>= max/mean of the lengths)."""
        return self.total_keys * len(self.lengths) / sum(self.lengths)

    def program(self, num_kv_heads: int, tile: int, workers: int) -> CpuProgram:
        key = (num_kv_heads, tile, workers)
        p = self.programs.get(key)
        if p is None:
            p = self.programs[key] = build_cpu_program(make_plan(self.lengths, num_kv_heads, tile, workers), self.starts)
        return p

    def plan(self, num_kv_heads: int, tile: int, workers: int) -> LeanPlan:
        return self.program(num_kv_heads, tile, workers).plan

    def describe(self) -> str:
        lines = [f"lean decode: B={len(self.lengths)} S={self.total_keys} lengths {min(self.lengths)}..{max(self.lengths)} "
                 f"padded/real={self.skew:.2f}, lean calls={self.calls}"]
        lines += [f"  {k}: {v}" for k, v in self.decisions.items()]
        return "\n".join(lines)


def plan_batch(attention_mask: Tensor) -> LeanBatch:
    """Real key ranges of an HF ``[B, S]`` padding mask (raises :class:`PlanError` if not contiguous).

    >>> import torch
    >>> plan_batch(torch.tensor([[0, 1, 1], [1, 1, 1]])).lengths
    (2, 3)
    """
    starts, lengths = ranges_from_padding_mask(attention_mask)
    return LeanBatch(starts, lengths, int(attention_mask.shape[1]))


_tuned: dict[tuple, tuple[KernelConfig, str | None]] = {}
_tuned_gen = -1
_warned: set[tuple] = set()


def clear_tuned_cache() -> None:
    """Forget cached lookups (e.g. after another process tuned lean shapes)."""
    _tuned.clear()


def tuned_config(lengths: Sequence[int], heads: int, kv_heads: int, head_dim: int, q_len: int = 1,
                 dtype: torch.dtype | str = torch.float32) -> tuple[KernelConfig, str | None]:
    """The ``cpu.lean`` config the tuning database holds for this batch, and its record id.

    Lookup by :func:`graphtune.autotune.shapes.lean_key` (exact part, then the nearest
    ``(max length, total length)`` buckets) on this CPU's fingerprint; ``(DEFAULT_CONFIG, None)``
    when nothing valid is tuned or the database is disabled (``GRAPHTUNE_CACHELEVEL=0``). Answers are
    cached in-process and dropped whenever this process writes a tuning record.

    >>> cfg, rec = tuned_config([300, 7], 4, 2, 16)  # nothing tuned in a fresh database
    >>> resolve_config(cfg)[0], rec
    (256, None)
    """
    global _tuned_gen
    if flags.get("CACHELEVEL") <= 0:
        return DEFAULT_CONFIG, None
    key = lean_key(lengths, heads, kv_heads, head_dim, q_len, dtype)
    gen = _db.generation()
    if gen != _tuned_gen:  # this process wrote a record: cached answers may be stale
        _tuned.clear()
        _tuned_gen = gen
    ck = (key, flags.get("DB"))
    hit = _tuned.get(ck)
    if hit is not None:
        return hit
    found: tuple[KernelConfig, str | None] = (DEFAULT_CONFIG, None)
    try:
        store = _db.get_db()
        fp = fingerprint.current("cpu")

        def usable(rec: _db.Record) -> bool:
            impl = get_impl(rec.op, rec.impl)
            return impl is not None and impl.device == "cpu" and is_valid(rec)

        rec = None if store is None else store.lookup(key.op, key.shape_key, key.q_bucket, key.kv_bucket, fp.device,
                                                      fp.versions, usable, fp.device_name)
        if rec is not None:
            found = (KernelConfig.from_dict(rec.config), rec.record_id)
    except Exception as e:  # noqa: BLE001 - an unreadable database must not break decoding
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"graphtune lean decode: tuning database lookup failed ({type(e).__name__}: {e}); "
                          "using the default tile/workers", RuntimeWarning, stacklevel=2)
    _tuned[ck] = found
    return found


def cpu_config(batch: LeanBatch | None = None, q: Tensor | None = None,
               k: Tensor | None = None) -> tuple[int, int, str]:
    """``(tile, workers, mode)`` of the CPU lean path for this batch's attention calls.

    With ``batch`` and the call's ``q [B, Hq, Lq, D]``, ``k [B, Hkv, S, D]``: the tuned config
    (:func:`tuned_config`), looked up once per batch and call shape and kept in ``batch.configs``.
    Otherwise, and when nothing is tuned, the default: tile 256, ``GRAPHTUNE_NUM_THREADS`` or torch's
    threads, ``"threads"``.

    >>> cpu_config()[0]
    256
    """
    if batch is None or q is None or k is None:
        return resolve_config(DEFAULT_CONFIG)
    ck = (q.shape[1], k.shape[1], q.shape[2], q.shape[3], q.dtype)
    got = batch.configs.get(ck)
    if got is None:
        cfg, rec = tuned_config(batch.lengths, q.shape[1], k.shape[1], q.shape[3], q.shape[2], q.dtype)
        got = batch.configs[ck] = resolve_config(cfg)
        batch.decisions[("cpu config",) + ck] = (f"tile={got[0]} workers={got[1]} mode={got[2]} "
                                                 f"({'tuned record ' + rec[:10] if rec else 'default: nothing tuned'})")
    return got


def _skew_may_pay(skew: float) -> bool:
    """The skew part of :func:`lean_pays` (no kv heads or workers needed): False means lean never pays."""
    thr = flags.get("LEAN_MIN_SKEW")
    return skew >= (thr if thr >= 0 else MEASURED_MIN_SKEW)


def lean_pays(batch: LeanBatch, num_kv_heads: int, gpu: bool = False, workers: int | None = None) -> bool:
    """Whether the lean path beats masked attention on the padded batch for this batch.

    ``LEAN_MIN_SKEW >= 0``: iff padded/real work >= it. Default (-1), the measured rule: padded/real
    >= ``MEASURED_MIN_SKEW`` and the padding saved outweighs the extra per-call overhead (CPU;
    on a GPU, where there is one launch per step, only the skew rule — not measured on a GPU).
    ``workers``: the CPU path's worker count (default: :func:`cpu_config`'s default).
    """
    thr = flags.get("LEAN_MIN_SKEW")
    if thr >= 0:
        return batch.skew >= thr
    if batch.skew < MEASURED_MIN_SKEW:
        return False
    if gpu:
        return True
    saved = (batch.total_keys * len(batch.lengths) - sum(batch.lengths)) * num_kv_heads
    if workers is None:
        workers = cpu_config()[1]
    extra_calls = len(batch.lengths) + 2 * workers
    return saved > extra_calls * CALL_OVERHEAD_KEYS


def _allowed_from_mask(mask: Tensor, B: int, lq: int, S: int) -> Tensor | None:
    """``[B, Lq, S]`` bool "may attend" of an SDPA mask, or None if it is not a pure 0/-big mask."""
    m = mask
    if m.dim() == 4:
        if m.shape[1] != 1:
            return None  # per-head masks: not a padding mask
        m = m[:, 0]
    while m.dim() < 3:
        m = m.unsqueeze(0)
    if m.dim() != 3:
        return None
    if m.dtype == torch.bool:
        allowed = m
    else:
        # HF additive masks use 0 and finfo.min (or -inf); anything else is a bias lean can't drop
        big = m <= torch.finfo(m.dtype).min / 2
        if not bool(((m == 0) | big).all()):
            return None
        allowed = ~big
    try:
        return allowed.expand(B, lq, S)
    except RuntimeError:
        return None


def _mask_kind(batch: LeanBatch, mask: Tensor | None, B: int, lq: int) -> str | None:
    """How the call's mask relates to the batch: ``"plain"`` (padding only), ``"causal"`` (padding +
    bottom-right causal), or None (anything else: lean would change the result)."""
    mkey = view_key(mask)
    for t, lq_seen, kind in batch.masks:
        if lq_seen == lq and (t is mask or (mkey is not None and view_key(t) == mkey)):
            return kind
    S = batch.total_keys
    kind: str | None = None
    if mask is None:
        kind = "plain" if all(n == S for n in batch.lengths) else None
    else:
        allowed = _allowed_from_mask(mask, B, lq, S)
        if allowed is not None:
            allowed = allowed.cpu()
            # lean reads exactly keys [start, start + len) of each row (left, right or both-side
            # padding); the call's mask must allow exactly those, else lean drops or adds keys
            j = torch.arange(S)[None, None, :]
            st, n = torch.tensor(batch.starts)[:, None, None], torch.tensor(batch.lengths)[:, None, None]
            pad = (j >= st) & (j < st + n)  # [B, 1, S]
            # bottom-right causal over the row's own range (lean's is_causal): j - start <= len - lq + i
            causal = pad & (j - st <= n - lq + torch.arange(lq)[None, :, None])  # [B, Lq, S]
            if torch.equal(allowed, pad.expand(B, lq, S)):
                kind = "plain"
            elif torch.equal(allowed, causal) and min(batch.lengths) >= lq:
                # rows seeing no key (a row shorter than q_len) are ill-defined under additive masks
                # (SDPA averages all values, lean gives 0): leave those batches to masked attention
                kind = "causal"
    if len(batch.masks) < 8:
        batch.masks.append((mask, lq, kind))  # HF builds one mask per forward; layers share it
    return kind


def lean_selector(op: str, args: tuple, ctx: Any) -> Callable[..., Any] | None:
    """Selector of the lean-decode :class:`~graphtune.runtime.context.Feature`: the lean impl or None."""
    if op not in ("attention", "attention_with_lse") or ctx is None:
        return None
    batch = ctx.plans.get(PLAN_NAME)
    if not isinstance(batch, LeanBatch):
        return None
    q, k, v, attn_mask, is_causal, scale, enable_gqa = args
    if is_causal or q.dim() != 4 or k.dim() != 4 or q.device.type not in ("cpu", "cuda"):
        return None
    if batch.unpadded and attn_mask is not None and q.shape[2] == k.shape[2] == batch.total_keys > 1:
        impl = _unmasked_causal(op, batch, attn_mask, q)
        if impl is not None:
            return impl
    triton_path = (q.device.type == "cuda" or flags.get("LEAN_TRITON_ON_CPU")) and not flags.get("DISABLE_TRITON")
    if q.device.type == "cuda" and not triton_path:
        return None
    B, hq, lq, d = q.shape
    if (lq > MAX_DECODE_QUERIES or B != len(batch.lengths) or k.shape[2] != batch.total_keys
            or v.shape[-1] != d or hq % k.shape[1] or (hq != k.shape[1] and not enable_gqa)):
        return None
    key = (tuple(q.shape), tuple(k.shape), str(q.dtype))
    if key not in batch.decisions:
        # the skew rule first: below it the (tuned) worker count is not looked up at all
        pays = _skew_may_pay(batch.skew) and lean_pays(
            batch, k.shape[1], gpu=triton_path, workers=None if triton_path else cpu_config(batch, q, k)[1])
        batch.decisions[key] = "lean" if pays else "masked attention (lean does not pay)"
    if batch.decisions[key] != "lean":
        return None
    kind = _mask_kind(batch, attn_mask, B, lq)
    if kind is None:
        return None
    if triton_path:
        return _triton_impl(batch, q, k, kind)
    tile, workers, mode = cpu_config(batch, q, k)
    program = batch.program(k.shape[1], tile, workers)

    def impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        batch.calls += 1
        return lean_attention_cpu(q, k, v, program.plan, batch.starts, is_causal=kind == "causal", scale=scale,
                                  program=program, mode=mode)

    return impl


def view_key(t: Tensor | None) -> tuple | None:
    """What makes two tensors the same data: storage address, geometry, dtype and the (per-storage)
    version counter. Transformers 4.x hands each layer its own view ``mask[..., :S]`` of one mask, so
    identity alone would re-check the mask on every layer; the checked tensor is kept referenced
    (its storage cannot be reused meanwhile), so equal keys mean equal contents."""
    if t is None:
        return None
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)


def is_causal_mask(mask: Tensor, B: int, lq: int, S: int) -> bool:
    """Whether an SDPA mask is exactly bottom-right causal over all ``S`` keys, for every row and head.

    Bool (True = attend) or additive (0 / ``<= finfo.min / 2`` or -inf) masks broadcastable to
    ``[B, 1, lq, S]``; a batch dimension of stride 0 (an expanded mask) is checked once. Costs a few
    passes over the mask (1 x 1024 x 1024: ~1 ms here).

    >>> import torch
    >>> m = torch.ones(3, 5, dtype=torch.bool).tril(2)[None, None]
    >>> is_causal_mask(m, 2, 3, 5), is_causal_mask(m.float().log(), 2, 3, 5), is_causal_mask(~m, 2, 3, 5)
    (True, True, False)
    """
    m = mask
    if m.dim() == 4:
        if m.shape[1] != 1:
            return False
        m = m[:, 0]
    while m.dim() < 3:
        m = m.unsqueeze(0)
    if m.dim() != 3 or m.shape[0] not in (1, B) or tuple(m.shape[1:]) != (lq, S):
        return False  # a query or key axis broadcast: not causal unless trivial, leave it alone
    if m.shape[0] > 1 and m.stride(0) == 0:
        m = m[:1]
    want = torch.ones(lq, S, dtype=torch.bool, device=m.device).tril(S - lq).expand_as(m)
    if m.dtype == torch.bool:
        return torch.equal(m, want)
    if not m.is_floating_point():
        return False
    zero = m == 0
    return torch.equal(zero, want) and bool((zero | (m <= torch.finfo(m.dtype).min / 2)).all())


def _unmasked_causal(op: str, batch: LeanBatch, mask: Tensor, q: Tensor) -> Callable[..., Any] | None:
    """A prefill of an unpadded batch: HF passes its causal mask as a tensor under Dynamo (it drops it
    eagerly), which makes SDPA compute every masked block. If the mask is exactly causal, run the call
    with ``is_causal=True`` and no mask — the same attention, the causal blocks skipped (1 x 1024
    prompt, 4 layers: 95 -> 68 ms of attention here). Checked once per mask (:func:`view_key`) per forward."""
    B, lq = q.shape[0], q.shape[2]
    mkey = view_key(mask)
    for t, ok in batch.causal_masks:
        if t is mask or view_key(t) == mkey:
            break
    else:
        ok = is_causal_mask(mask, B, lq, batch.total_keys)
        if len(batch.causal_masks) < 8:
            batch.causal_masks.append((mask, ok))  # HF builds one mask per forward; layers share it
        batch.decisions[("prefill mask", tuple(mask.shape))] = "is_causal (exactly causal)" if ok else "kept"
    if not ok:
        return None
    if op == "attention":
        def impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
            return torch.ops.graphtune.attention(q, k, v, None, True, scale, enable_gqa), None
    else:
        def impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
            return torch.ops.graphtune.attention_with_lse(q, k, v, None, True, scale, enable_gqa)
    return impl


def _triton_impl(batch: LeanBatch, q: Tensor, k: Tensor, kind: str) -> Callable[..., Any]:
    """The Triton lean path: plan with ORT's tile and CTA rules, tables uploaded once per batch."""
    from graphtune.codegen.lean_decode import triton_kernels as lt  # lazy: CPU-only runs never import triton kernels
    from graphtune.codegen.lean_decode.plan import default_tile, gpu_num_workers

    key = ("triton", k.shape[1], q.shape[-1], str(q.device))
    tables = batch.programs.get(key)
    if tables is None:
        tile = default_tile(q.shape[-1])
        tiles = [-(-n // tile) for n in batch.lengths]
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 4
        plan = make_plan(batch.lengths, k.shape[1], tile, gpu_num_workers(sum(tiles) * k.shape[1], sms, max(tiles)))
        tables = batch.programs[key] = lt.build_tables(plan, batch.starts, q.device)

    def impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        batch.calls += 1
        try:
            return lt.lean_attention_triton(q, k, v, tables.plan, batch.starts, is_causal=kind == "causal",
                                            scale=scale, tables=tables)
        except Exception as e:  # compile/launch failure: the reference path, with the original mask
            warnings.warn(f"graphtune lean decode: Triton kernel failed ({type(e).__name__}: {e}); "
                          f"using the reference attention", RuntimeWarning, stacklevel=2)
            return attention_ref(q, k, v, attn_mask, False, scale, enable_gqa)

    return impl


def _planner(ctx: Any) -> None:
    mask = ctx.attention_mask
    if mask is None or not isinstance(mask, Tensor) or mask.dim() != 2 or ctx.state.get("lean_decode") is False:
        return
    enabled = getattr(ctx, "enabled", None)
    if enabled is not None and not enabled("lean_decode"):  # graphtune.optimize(model, lean_decode=False)
        return
    B, S = mask.shape
    if B * S and int(torch.count_nonzero(mask)) == B * S:
        # No padding (one reduction, no scan): lean has nothing to skip, so under the measured rule the
        # decode calls are left alone without a plan (the selector then costs one dict lookup per call).
        # A forward without cache (a prefill) keeps a plan: its mask is causal only, which the
        # selector hands back to SDPA's is_causal (:func:`_unmasked_causal`).
        unpadded = LeanBatch((0,) * B, (S,) * B, S, unpadded=True)
        if _skew_may_pay(1.0) or (ctx.past_length == 0 and _prefill_of(ctx, S)):
            ctx.plans[PLAN_NAME] = unpadded
        return
    try:
        ctx.plans[PLAN_NAME] = plan_batch(mask)
    except PlanError:
        return  # holes in the mask or empty rows: leave those batches to masked attention


def _prefill_of(ctx: Any, S: int) -> bool:
    ids = ctx.input_ids
    return isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[1] == S > 1


def describe(site: Any, q_shape: tuple | None, k_shape: tuple | None) -> str | None:
    """How lean decode serves an attention site (for ``graphtune.explain``)."""
    if (site.details or {}).get("mask") == "causal":
        return None  # top-left causal (SDPA is_causal) is not a decode mask
    thr = flags.get("LEAN_MIN_SKEW")
    rule = f"padded/real KV >= {thr if thr >= 0 else MEASURED_MIN_SKEW}"
    return (f"lean decode on ragged steps with q_len <= {MAX_DECODE_QUERIES} when {rule}; CPU tile/workers "
            f"tuned per batch bucket (graphtune tune --lean), else tile {CPU_TILE} x torch threads")


def install(priority: int = 5) -> None:
    """Register the lean planner and selector with the runtime (idempotent).

    >>> install(); uninstall()
    """
    context.register_feature(context.Feature(PLAN_NAME, lean_selector, priority, plan=_planner))


def uninstall() -> None:
    context.unregister_feature(PLAN_NAME)


def lean_for_lengths(lengths: Sequence[int], total_keys: int, starts: Sequence[int] | None = None) -> LeanBatch:
    """A :class:`LeanBatch` from explicit lengths (no HF mask), e.g. for benchmarks and tools."""
    starts = tuple(starts) if starts is not None else tuple(total_keys - n for n in lengths)
    return LeanBatch(starts, tuple(lengths), total_keys)
