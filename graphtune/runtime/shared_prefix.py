"""Shared-prefix plans and their automatic use in batched generation (plan once, run per layer).

A :class:`SharedPrefixPlan` says which batch rows share which key ranges of their KV cache:
a tree of :class:`SharedSegment` (system prompt shared by all rows, few-shot blocks shared by
subsets, ...). Each row's segments tile ``[0, suffix_start(row))``; everything after is the
row's own suffix.

In an optimized model the planner (:func:`plan_batch`) looks at the prompt ids, padding mask and
positions at prefill, finds rows whose prompts share a leading prefix (identical tokens, padding
and positions give identical K/V, e.g. ``generate(num_return_sequences=32)``; a 4-D mask or an
input it cannot compare, such as ``token_type_ids``, means no sharing), and keeps the plan in the
request's state, which the optimized model holds per KV cache object and hands back only while
that cache holds what the request put in it. On every later step of that request the selector
(:func:`select`) answers each ``graphtune.attention`` call whose own past (keys before its
queries) is that cache with :func:`run_dense`: every shared segment
is read once from one representative row, with all sharing rows' queries batched, each row's
suffix separately, merged by log-sum-exp. It declines (so the default path runs) whenever the
decomposition would not be exact or would not pay, in particular when the cache's rows no longer
hold what the plan says: beam search's ``reorder_cache`` moves rows in place, unseen by the cache's
length, so each forward first compares every row of every segment with its representative
(:func:`_rows_still_share`, once per forward) and drops the plan if they differ.

>>> import torch
>>> from graphtune.runtime.context import batch_context
>>> from graphtune.runtime import shared_prefix as sp
>>> sp.install()
>>> ids = torch.randint(0, 100, (1, 300)).expand(16, 300)          # one prompt, 16 samples
>>> state = {}
>>> with batch_context(input_ids=ids, state=state): pass           # prefill: plan found
>>> state["shared_prefix"].segments[0].end
300
>>> q, k, v = torch.randn(16, 8, 1, 64), torch.randn(1, 8, 301, 64).expand(16, -1, -1, -1), None
>>> v = k.clone()
>>> with batch_context(input_ids=ids[:, :1], past_length=300, state=state):
...     out = torch.ops.graphtune.attention(q, k, v)                # decomposed, exact
>>> out.shape
torch.Size([16, 8, 1, 64])
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from graphtune.codegen.shared_prefix.decompose import Partial, Segment, merge_partials
from graphtune.codegen.shared_prefix.decompose import fused_available, partial_attention, prefix_attention, suffix_attention
from graphtune.errors import PlanError
from graphtune.runtime.context import BatchContext, Feature, register_feature, unregister_feature
from graphtune.runtime.lean_decode import is_causal_mask, view_key
from graphtune.codegen.shared_prefix.plan import (DEFAULT_MIN_PREFIX, DEFAULT_MIN_ROWS, SharedPrefixPlan,
                                                  SharedSegment, detect_shared_prefixes, thresholds)

__all__ = [
    "SharedSegment",
    "SharedPrefixPlan",
    "DEFAULT_MIN_PREFIX",
    "DEFAULT_MIN_ROWS",
    "thresholds",
    "detect_shared_prefixes",
    "run_dense",
    "run_dedup",
    "plan_batch",
    "select",
    "install",
    "uninstall",
    "describe",
    "STATE_KEY",
]

STATE_KEY = "shared_prefix"  # ctx.state / ctx.plans key


# --------------------------------------------------------------------------------------
# Running a plan on a duplicated (per-row) cache
# --------------------------------------------------------------------------------------

def _as_4d(mask: Tensor) -> Tensor:
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask


def _segment_key_mask(mask4: Tensor, seg: SharedSegment) -> tuple[bool, Tensor | None]:
    """(exact, key mask): the mask over the segment must be one key vector for all its rows and queries."""
    dev = mask4.device
    m = mask4[..., seg.start : seg.end]  # slice first: gather only the segment's keys
    if mask4.shape[0] > 1:
        m = m.index_select(0, torch.tensor(seg.rows, device=dev))  # [R, 1|H, Lq, n]
    ref = m[:1, :1, :1]
    if not bool((m == ref).all()):
        return False, None
    km = ref.reshape(-1)
    trivial = bool(km.all()) if km.dtype == torch.bool else bool((km == 0).all())
    return True, None if trivial else km


def _mask_plan(plan: SharedPrefixPlan, mask: Tensor | None, cache: dict | None) -> list[Tensor | None] | None:
    """Per-segment key masks, or None if the mask makes the decomposition inexact. Cached per mask data
    (:func:`~graphtune.runtime.lean_decode.view_key`: transformers 4.x gives each layer its own view
    of one mask), the mask kept referenced so its storage is not reused while the cache lives."""
    if mask is None:
        return [None] * len(plan.segments)
    key = view_key(mask)
    if cache is not None and key in cache:
        return cache[key][1]
    mask4 = _as_4d(mask)
    res: list[Tensor | None] | None = []
    for seg in plan.segments:
        ok, km = _segment_key_mask(mask4, seg)
        if not ok:
            res = None
            break
        res.append(km)  # type: ignore[union-attr]
    if cache is not None:
        cache[key] = (mask, res)
    return res


def run_dense(
    plan: SharedPrefixPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    key_masks: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Decomposed attention over a per-row (duplicated) cache, exactly equal to SDPA over it.

    Parameters
    ----------
    plan : SharedPrefixPlan
    q : ``[B, Hq, Lq, D]``; its ``Lq`` queries come after every shared segment.
    k, v : ``[B, Hkv, S, D]``, each row's full cache (shared ranges are read from the first
        row of each segment only).
    attn_mask : bool/additive mask broadcastable to ``[B, Hq, Lq, S]``, optional. Over a shared
        segment it must not vary by row or query (else :class:`PlanError`).
    key_masks : per-segment key masks already derived from ``attn_mask`` (selector's cache).

    Returns
    -------
    (out ``[B, Hq, Lq, Dv]``, lse ``[B, Hq, Lq]`` fp32)

    Examples
    --------
    >>> import torch
    >>> plan = SharedPrefixPlan(2, (SharedSegment((0, 1), 0, 6),))
    >>> k = torch.randn(1, 2, 8, 16).repeat(2, 1, 1, 1); v = torch.randn(2, 2, 8, 16)
    >>> v[1, :, :6] = v[0, :, :6]
    >>> q = torch.randn(2, 2, 1, 16)
    >>> out, lse = run_dense(plan, q, k, v)
    >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)
    True
    """
    B, S, Lq = q.shape[0], k.shape[-2], q.shape[-2]
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != B or plan.batch_size != B:
        raise PlanError(f"run_dense: plan for batch {plan.batch_size} but q {tuple(q.shape)}, k {tuple(k.shape)}")
    if S - Lq < plan.max_end:
        raise PlanError(f"run_dense: the {Lq} queries overlap the shared prefix (cache {S} keys, prefix ends at "
                        f"{plan.max_end}); shared ranges are attended non-causally")
    if key_masks is None:
        key_masks = _mask_plan(plan, attn_mask, None)
        if key_masks is None:
            raise PlanError("run_dense: attn_mask differs between rows or queries over a shared segment")
    seg_rows, suffix_groups = _layout(plan, q.device)
    partials: list[Partial] = []
    for seg, rows, km in zip(plan.segments, seg_rows, key_masks):
        if seg.length == 0:
            continue
        r0 = seg.rows[0]  # identical K/V in every sharing row: read the segment from one of them
        s = Segment(rows, k[r0, :, seg.start : seg.end], v[r0, :, seg.start : seg.end], km)
        partials.append(prefix_attention(q, s, scale, enable_gqa))
    mask4 = None if attn_mask is None else _as_4d(attn_mask)
    if len(suffix_groups) == 1 and suffix_groups[0][1] is None and fused_available(q, attn_mask):
        # GPU: the row suffixes and the merge with the prefix state in one Triton kernel
        e = suffix_groups[0][0]
        prior = merge_partials(B, partials) if partials else None
        return _suffix_merge(q, k[:, :, e:], v[:, :, e:], None, prior, None, False, scale, enable_gqa)
    for e, rows, span in suffix_groups:
        # rows whose suffix starts at key e: one batched call over k[rows, :, e:]. Never gather the
        # cache: consecutive rows are a view; other row sets copy their suffix keys only.
        if rows is None or span is not None:
            sl = slice(None) if rows is None else span
            qs, ks, vs = q[sl], k[sl, :, e:], v[sl, :, e:]
            ms = None if mask4 is None else (mask4[sl] if mask4.shape[0] > 1 else mask4)[..., e:]
        else:
            qs, ks, vs = q.index_select(0, rows), k[:, :, e:].index_select(0, rows), v[:, :, e:].index_select(0, rows)
            ms = None if mask4 is None else (mask4[..., e:].index_select(0, rows) if mask4.shape[0] > 1
                                             else mask4[..., e:])
        p = suffix_attention(qs, ks, vs, None, ms, False, scale, enable_gqa)
        partials.append(Partial(rows, p.out, p.lse))
    return merge_partials(B, partials)


@functools.lru_cache(maxsize=64)
def _layout(plan: SharedPrefixPlan, device: torch.device) -> tuple[list, list]:
    """Row index tensors of a plan, built once per (plan, device): None where a set is every row in order;
    suffix groups ``(first key, rows, span)`` also carry ``span``, a slice when their rows are consecutive."""
    B = plan.batch_size

    def idx(rows: Sequence[int]) -> Tensor | None:
        return None if list(rows) == list(range(B)) else torch.tensor(list(rows), dtype=torch.long, device=device)

    def span(rows: Sequence[int]) -> slice | None:
        return slice(rows[0], rows[-1] + 1) if list(rows) == list(range(rows[0], rows[-1] + 1)) else None

    seg_rows = [idx(s.rows) for s in plan.segments]
    starts = plan.suffix_starts
    groups = []
    for e in sorted(set(starts)):
        rows = [r for r in range(B) if starts[r] == e]
        groups.append((e, idx(rows), span(rows)))
    return seg_rows, groups


@functools.lru_cache(maxsize=64)
def _dedup_layout(plan: SharedPrefixPlan, S: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """(representative rows, row -> position of its representative) for rows identical on all S keys."""
    rep_of = list(range(plan.batch_size))
    for seg in plan.segments:
        if seg.end == S:  # rows of a segment ending at the last key share every key: identical rows
            for r in seg.rows:
                rep_of[r] = seg.rows[0]
    reps = sorted(set(rep_of))
    if len(reps) == plan.batch_size:
        return None
    pos = {r: i for i, r in enumerate(reps)}
    return (torch.tensor(reps, dtype=torch.long, device=device),
            torch.tensor([pos[rep_of[r]] for r in range(plan.batch_size)], dtype=torch.long, device=device))


def _rows_agree(mask4: Tensor, plan: SharedPrefixPlan, S: int) -> bool:
    """Whether a per-row mask is identical across each group of identical rows."""
    if mask4.shape[0] == 1:
        return True
    return all(bool((mask4[list(s.rows)] == mask4[s.rows[0]]).all()) for s in plan.segments if s.end == S)


def run_dedup(
    plan: SharedPrefixPlan,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """Prefill over rows that are identical on every key: attend once per distinct row, then copy.

    Rows whose tokens and padding agree on all ``S`` positions (``num_return_sequences``) have
    identical q/k/v, hence identical outputs; this computes each distinct row once.

    Examples
    --------
    >>> import torch
    >>> plan = SharedPrefixPlan(3, (SharedSegment((0, 2), 0, 5),))
    >>> q = torch.randn(3, 2, 5, 8); q[2] = q[0]
    >>> out, _ = run_dedup(plan, q, q, q, is_causal=True)
    >>> torch.equal(out[2], out[0])
    True
    """
    S = k.shape[-2]
    lay = _dedup_layout(plan, S, q.device)
    if lay is None or q.shape[0] != plan.batch_size:
        raise PlanError(f"run_dedup: no rows of the plan are identical on all {S} keys")
    reps, inv = lay
    mask = attn_mask
    if mask is not None:
        mask = _as_4d(mask)
        if mask.shape[0] > 1:
            mask = mask.index_select(0, reps)
    out, lse = partial_attention(q.index_select(0, reps), k.index_select(0, reps), v.index_select(0, reps), mask,
                                 is_causal, scale, enable_gqa)
    return out.index_select(0, inv), lse.index_select(0, inv)


def _suffix_merge(*args: Any) -> tuple[Tensor, Tensor]:
    from graphtune.codegen.shared_prefix.triton_kernels import suffix_merge as kernel  # triton only when used

    return kernel(*args)


# --------------------------------------------------------------------------------------
# Planner and selector (graphtune.runtime.context)
# --------------------------------------------------------------------------------------

_enabled = False


def plan_batch(ctx: BatchContext) -> None:
    """Planner: detect sharing at prefill (kept in ``ctx.state``), expose it in ``ctx.plans`` later.

    ``ctx.state`` belongs to one request (the optimized model keeps one per KV cache), so a plan
    found at that request's prefill is only ever offered to the forwards continuing its cache.
    """
    if not _enabled or ctx.input_ids is None or ctx.input_ids.dim() != 2:
        return
    if not ctx.enabled("shared_prefix"):  # this model was optimized with shared_prefix=False
        ctx.state.pop(STATE_KEY, None)
        return
    B, L = ctx.input_ids.shape
    mask = ctx.attention_mask
    if mask is not None and mask.dim() != 2:
        # a 4-D / custom mask can make rows with identical ids attend differently: no sharing
        ctx.state.pop(STATE_KEY, None)
        return
    if ctx.past_length == 0:
        pos = ctx.position_ids
        if ctx.other_inputs or (pos is not None and (pos.dim() != 2 or pos.shape[0] not in (1, B)
                                                     or pos.shape[1] != L)):
            plan = None  # inputs we cannot compare per row: rows with equal ids may differ
        else:
            plan = detect_shared_prefixes(ctx.input_ids, mask, position_ids=pos)
        if plan is None:
            ctx.state.pop(STATE_KEY, None)
        else:
            ctx.state[STATE_KEY] = plan
    plan = ctx.state.get(STATE_KEY)
    if plan is not None and (plan.batch_size != B or (ctx.past_length and plan.max_end > ctx.past_length)):
        ctx.state.pop(STATE_KEY, None)  # not the batch or the cache the plan was built for
        plan = None
    if plan is not None:
        ctx.plans[STATE_KEY] = plan
        ctx.plans[STATE_KEY + ".masks"] = {}


def select(op: str, args: tuple, ctx: BatchContext | None) -> Callable[..., Any] | None:
    """Selector: the decomposition for attention calls it computes exactly, else None."""
    if ctx is None or op not in ("attention", "attention_with_lse"):
        return None
    plan = ctx.plans.get(STATE_KEY)
    if plan is None:
        return None
    q, k, v, attn_mask, is_causal, scale, enable_gqa = args
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != plan.batch_size or k.shape[0] != plan.batch_size:
        return None
    lq, S = q.shape[-2], k.shape[-2]
    if ctx.past_length == 0:
        # a prefill: only the prompt's self-attention itself (no cached keys) can be deduplicated
        if lq == S == ctx.input_ids.shape[-1]:
            return _select_dedup(plan, q, k, attn_mask, ctx, is_causal)
        return None
    if is_causal:
        return None  # SDPA's top-left causal: the queries do not all come after the prefix
    # The call's own past (keys before its queries) must be the cache the plan was built for;
    # anything else (cross-attention, static or sliding caches) is left to the default path.
    if S - lq != ctx.past_length or plan.max_end > S - lq:
        return None
    if not _rows_still_share(plan, k, v, ctx):
        return None
    key_masks = _mask_plan(plan, attn_mask, ctx.plans.get(STATE_KEY + ".masks"))
    if key_masks is None:
        return None
    return functools.partial(_impl, plan, key_masks)


def _rows_still_share(plan: SharedPrefixPlan, k: Tensor, v: Tensor, ctx: BatchContext) -> bool:
    """Whether every row of every shared segment still holds its representative's K and V there.

    Checked on the first attention call of each forward that would use the plan (layer 0 in a
    decoder), the verdict kept for the forward's other layers. HF's ``reorder_cache`` /
    ``batch_select_indices`` (beam search) permute a cache's rows in place without changing its
    length, so :class:`~graphtune.runtime.context.RequestStates` cannot see it; rows moved between
    groups must make the selector decline (the default path runs), or the decomposition would
    read one row's prefix for another.

    The comparison covers each segment's WHOLE key range ``[start, end)``, K and V, for one kv head
    (all head dims): at layer 0 a key's K/V depend only on its token and position (and V on the
    token alone), so rows equal there hold the same tokens at the same positions over the range;
    with the mask over the range checked per layer (:func:`_mask_plan`) and every row sharing its
    tree path from key 0, causal attention makes them equal at every layer. (Comparing only the
    last key is not enough: prompts that differ but end alike, a chat template's tail, pass it.)
    A different token with bit-identical K and V on a whole head does not happen in practice. (If
    layer 0's call is declined before this point, e.g. a sliding-window layer, the first layer that
    would use the plan is checked: equal K/V over a whole head there means equal inputs in practice.)

    Cost: one read of ``R x n x D`` elements of K and of V per segment (R rows, n keys) per forward,
    i.e. ``1 / Hkv`` of ONE layer's duplicated read, against the ``(R - 1) x n x Hkv x D x 2``
    elements per layer, every layer, that the decomposition saves: ``R / ((R - 1) x Hkv x layers)``
    of the saving in traffic (8 rows, 8 kv heads, 32 layers: 0.45%). Measured on this CPU (1 thread,
    fp32, decode, suffix 32, one segment of all B rows; best of 5 x 30 calls): the check vs one
    layer's SDPA over the duplicated cache vs the saving (SDPA - :func:`run_dense`) over 32 layers:
      B=8,  Hkv=Hq=8,  D=64,  P=256:   60 us,  18.6% of a layer,  5.4% of the saving (the threshold)
      B=8,  Hkv=Hq=8,  D=64,  P=512:  103 us,  27.7% of a layer,  2.1% of the saving
      B=32, Hkv=Hq=8,  D=64,  P=256:  214 us,  10.4% of a layer,  0.4% of the saving
      B=8,  Hkv=8, Hq=32, D=128, P=1024: 505 us, 4.7% of a layer, 0.2% of the saving
    (a float ``eq().all()`` instead of the bitwise ``torch.equal`` cost 4x more). Devices other than
    the CPU: one host sync per forward, all segments reduced to one flag before it.
    """
    key = STATE_KEY + ".checked"
    ok = ctx.plans.get(key)
    if ok is None:
        ok = _segments_hold_equal_rows(plan, k, v)
        ctx.plans[key] = ok
        if not ok:  # rows moved (or were rewritten) since the plan was made: never use it again
            ctx.plans.pop(STATE_KEY, None)
            ctx.state.pop(STATE_KEY, None)
    return ok


def _segments_hold_equal_rows(plan: SharedPrefixPlan, k: Tensor, v: Tensor) -> bool:
    """Bitwise comparison, per segment, of head 0 of K and V over ``[start, end)``: rows vs the first row.

    The rows of a segment are copies of one computation, so they are bitwise equal; comparing the
    bits (viewed as int64 where the layout allows) is exact for NaN/-0 too and twice as fast as a
    float comparison. CPU: ``torch.equal`` per block (a single pass, no temporaries); other devices:
    one flag per block, all reduced before ONE host sync.
    """
    if k.dim() != 4 or v.dim() != 4 or k.shape[0] != plan.batch_size or v.shape[0] != plan.batch_size:
        return False
    eager = _compare_eagerly(k.device)
    pending: list[Tensor] = []
    for seg in plan.segments:
        if len(seg.rows) < 2 or not seg.length:
            continue
        r0, rest = seg.rows[0], seg.rows[1:]
        contiguous = list(rest) == list(range(rest[0], rest[-1] + 1))
        idx = None if contiguous else torch.tensor(rest, dtype=torch.long, device=k.device)
        for x in (k, v):
            ref = x[r0, 0, seg.start : seg.end]  # [n, D], a view
            blk = x[rest[0] : rest[-1] + 1, 0, seg.start : seg.end] if idx is None \
                else x[:, 0, seg.start : seg.end].index_select(0, idx)  # [R - 1, n, D]
            blk, ref = _bits(blk, ref)
            if eager:
                if not torch.equal(blk, ref.expand_as(blk)):
                    return False
            else:
                pending.append(torch.ne(blk, ref).any())
    return not pending or not bool(torch.stack(pending).any())  # the one host sync


def _compare_eagerly(device: torch.device) -> bool:
    """Whether a Python bool per block is free (no host sync): the CPU."""
    return device.type == "cpu"


def _bits(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` viewed as int64 (or int32) elements where both layouts allow it, else as they are."""
    for dt in (torch.int64, torch.int32):
        try:
            return a.view(dt), b.view(dt)
        except RuntimeError:
            continue
    return a, b


def _select_dedup(plan: SharedPrefixPlan, q: Tensor, k: Tensor, attn_mask: Tensor | None,
                  ctx: BatchContext, is_causal: bool = False) -> Callable[..., Any] | None:
    """Prefill: attend once per group of identical rows, if any, and the mask agrees within groups."""
    S = k.shape[-2]
    lay = _dedup_layout(plan, S, q.device)
    if lay is None:
        return None
    causal = False
    if attn_mask is not None:
        cache = ctx.plans.setdefault(STATE_KEY + ".masks", {})
        key = ("dedup", view_key(attn_mask), is_causal)
        if key not in cache:
            m4 = _as_4d(attn_mask)
            agree = _rows_agree(m4, plan, S)
            # Under Dynamo HF passes the prompt's causal mask as a tensor (eagerly it passes none and
            # is_causal): with every distinct row's mask exactly causal, attend with is_causal instead,
            # which skips the masked blocks (1 x 1024 x 1024, 4 layers: 95 -> 68 ms here). The rows of
            # a group agree (checked above), so the representatives' masks decide.
            reps = m4 if m4.shape[0] == 1 else m4.index_select(0, lay[0])
            cache[key] = (attn_mask, (agree, agree and not is_causal
                                      and is_causal_mask(reps, reps.shape[0], q.shape[-2], S)))
        agree, causal = cache[key][1]
        if not agree:
            return None
    return functools.partial(_dedup_impl, plan, causal)


def _dedup_impl(plan, causal_only, q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    if causal_only:  # attn_mask is exactly causal (checked by the selector): the same attention
        attn_mask, is_causal = None, True
    return run_dedup(plan, q, k, v, attn_mask, is_causal, scale, enable_gqa)


def _impl(plan, key_masks, q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    return run_dense(plan, q, k, v, attn_mask, scale, enable_gqa, key_masks)


def describe(site: Any, q_shape: tuple | None, k_shape: tuple | None) -> str | None:
    """How this feature serves an attention site (for ``graphtune.explain``), or None if never."""
    if not _enabled or (getattr(site, "details", None) or {}).get("mask") == "causal":
        return None  # SDPA is_causal: queries may overlap a shared prefix
    mp, mr = thresholds()
    return f"shared-prefix on decode/append when >= {mr} rows share >= {mp} prompt tokens (+ prefill dedup)"


def install(priority: int = 10) -> None:
    """Register the shared-prefix feature (planner + selector) with the runtime. Idempotent.

    Its implementations call graphtune ops for their partial attentions and merges
    (``reenters``): the runtime keeps this feature from taking those inner calls.
    """
    global _enabled
    _enabled = True
    register_feature(Feature(STATE_KEY, select, priority, plan=plan_batch, reenters=True))


def uninstall() -> None:
    """Stop using the decomposition (planner and selector are removed)."""
    global _enabled
    _enabled = False
    unregister_feature(STATE_KEY)
