"""The mask stage of eager attention, translated into the canonical op's ``attn_mask``.

Analyse first, emit once: :func:`plan_mask` only reads the graph and returns a
:class:`MaskPlan` (or None: not exact, leave eager); :func:`emit_mask` and
:func:`emit_empty_rows` insert nodes only after the whole rewrite is known to go ahead.

When is a ``masked_fill`` / ``where`` fill exact?
--------------------------------------------------
``w = scores.masked_fill(masked, f)`` followed by ``softmax(w)`` gives every masked key the
score ``f`` itself (not ``scores + f``). Let ``D`` be the dtype the fill is written in (the
scores' dtype at that point) and ``f_D`` the fill rounded to ``D``. Per query row:

* a row with at least one unmasked key: eager gives masked keys the weight ``exp(f_D - m)/Z``
  (``m`` the row max). The canonical op with a bool mask gives them exactly 0. These agree
  when ``f_D = -inf``, or when ``f_D <= -finfo(D).max / 2`` (e.g. ``finfo(D).min``): a masked
  key could only get weight if an unmasked score of the row were itself within a factor 2 of
  overflowing ``D``, where eager attention has no meaning either. Fills such as ``-1e4`` or
  ``-1e9`` in fp32, or fp16's minimum written into fp32 scores, are *not* exact (scores near
  the fill are ordinary numbers) and are left to eager;
* a row with every key masked: eager's softmax sees ``S`` equal values, i.e. the uniform
  average of ``v`` for a finite ``f_D``, and NaN for ``f_D = -inf``. SDPA semantics give 0, so
  the rewrite adds a fix-up (:func:`emit_empty_rows`): ``where(row fully masked, mean(v), out)``
  (or NaN). This does not depend on how any kernel rounds ``s + f``.

So a single ``masked_fill``/``where`` stage becomes a bool ``attn_mask`` (True = attend) plus the
fix-up. A ``where`` stage followed by an additive mask (older GPT-2) is one additive mask whose
fill is ``-inf`` or the most negative finite value of the mask dtype below; its fully masked rows
follow the additive arithmetic, as for any additive mask.

When is an additive mask exact?
-------------------------------
``softmax(scores + mask)``: the op adds the mask to the scores in its accumulation dtype ``A``
(fp32 for fp16/bf16/fp32 queries, fp64 for fp64; every kernel, SDPA's included, does so), and
accepts a float32 mask with half queries. The rewrite is exact when eager adds in ``A`` too (the
add node's dtype, i.e. the masked scores' dtype, is ``A``); the mask then goes to the op in ``A``
(a widening cast at most), never rounded to ``q``'s dtype: an fp32 ``finfo.min`` mask over scores
upcast to fp32 would overflow to ``-inf`` in bf16/fp16 and turn a fully masked row (eager: the
uniform average) into an "empty" one (tests/fuzz findings F8).

An add in half precision (fp16 or bf16 scores, HF's eager idiom ``softmax(w + mask,
dtype=float32)``) is left in eager form. Rows with a visible key agree either way, but in a row
whose every key is masked eager's half add absorbs the scores: ``s - 65504`` rounds to
multiples of 32 in fp16 (or overflows to ``-inf`` for ``s <= -16``), ``s - 65536`` to multiples
of 512 in bf16, so eager's result there depends on how each score rounds, while the op's fp32
add keeps the scores and gives ``softmax(s)`` (tests/fuzz findings F9). Only masks at
``<= -finfo(bf16).max / 2`` saturate both arithmetics; the mask's values are not known when
rewriting, and a fix-up would need each such row's scores in eager's rounding (eager attention
for those rows: a data-dependent gather, not cheaper than eager, and only as exact as the
matmul's rounding), so there is no exact rewrite. Coverage: half-precision models using eager
attention with an additive mask keep that attention eager (HF models with
``attn_implementation="sdpa"`` call SDPA and are rewritten as such; so are code paths that upcast
the scores before the mask, and ``masked_fill``/``where`` masks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphtune.rewrites.attention_forms import size_eq, tv
from graphtune.rewrites.pattern import Match

__all__ = ["MaskPlan", "plan_mask", "emit_mask", "emit_empty_rows", "fill_is_exact", "accumulation_dtype"]

aten = torch.ops.aten

_FILL_FORMS = (("mask_fill", "masked_fill", False), ("mask_where", "where", True), ("mask_where_inv", "where", False))


@dataclass(frozen=True)
class MaskPlan:
    """How the mask stage(s) become the op's ``attn_mask``.

    ``additive``: float masks to cast to ``dtype`` and add, in order; ``fill``: a bool
    stage ``(cond, cond_is_keep, f_D)`` (``cond_is_keep``: True where ``cond`` marks the keys to
    attend); ``detail``: the site's ``details["mask"]``; ``dtype``: the dtype of an additive
    ``attn_mask`` (the op's accumulation dtype, where eager adds; None: q's dtype). With ``fill``
    and no ``additive`` the stage becomes a bool mask and fully masked rows need
    :func:`emit_empty_rows`.
    """

    additive: tuple = ()
    fill: tuple | None = None
    detail: str | None = None
    dtype: torch.dtype | None = None

    @property
    def bool_stage(self) -> bool:
        return self.fill is not None and not self.additive


def broadcasts_into(small: tuple, big: tuple) -> bool:
    """``small`` broadcasts to ``big`` without growing it."""
    return len(small) <= len(big) and all((size_eq(s, 1) or size_eq(s, b)) for s, b in zip(small[::-1], big[::-1]))


def fill_is_exact(fill: float, dtype: torch.dtype) -> float | None:
    """The fill rounded to ``dtype`` if it is exact as a mask there (module docstring), else None."""
    if not dtype.is_floating_point:
        return None
    f = torch.tensor(fill, dtype=torch.float64).to(dtype).item()  # what masked_fill/where store
    if f == -math.inf or (math.isfinite(f) and f <= -torch.finfo(dtype).max / 2):
        return f
    return None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the op computes scores (and adds an additive mask) in for queries of ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def _adds_exactly(c: dict, qdtype: torch.dtype) -> torch.dtype | None:
    """The additive mask dtype if every mask add of the match runs in the op's accumulation dtype."""
    acc = accumulation_dtype(qdtype)
    for key in ("mask_add", "mask_add2"):
        if key in c:
            av = tv(c[key])
            if av is None or av.dtype != acc:
                return None  # a half-precision add absorbs the scores of fully masked rows (module docstring)
    return acc


def _float_mask(mask: object, scores: tuple) -> bool:
    mv = tv(mask)
    return mv is not None and mv.dtype.is_floating_point and broadcasts_into(tuple(mv.shape), scores)


def _fill_stage(m: Match, c: dict, scores: tuple, const) -> tuple | None:
    for key, _, keep in _FILL_FORMS:
        if key not in c:
            continue
        cond, cv, node = c["mask"], tv(c["mask"]), tv(c[key])
        fill = const(m, c["fill"])
        if cv is None or node is None or cv.dtype != torch.bool or cv.dim() == 0 or fill is None:
            return None
        f = fill_is_exact(fill, node.dtype)  # node.dtype: where the fill is written (D)
        if f is None or not broadcasts_into(tuple(cv.shape), scores):
            return None
        return cond, keep, f
    return None


def plan_mask(m: Match, c: dict, scores: tuple, const, qdtype: torch.dtype) -> MaskPlan | None:
    """Analyse the captured mask stage(s) against ``scores`` (the masked tensor's shape) for a
    query of ``qdtype``.

    ``const(m, x)`` reads a constant fill. Returns None when no exact translation exists.
    """
    if "mask_add" in c:  # one additive mask, or two stacked
        masks = (c["mask"], c["mask2"]) if "mask_add2" in c else (c["mask"],)
        dtype = _adds_exactly(c, qdtype)
        if dtype is None or not all(_float_mask(x, scores) for x in masks):
            return None
        return MaskPlan(additive=masks, detail="+".join(["additive"] * len(masks)), dtype=dtype)
    detail = next((d for key, d, _ in _FILL_FORMS if key in c), None)
    if detail is None:
        return MaskPlan()
    fill = _fill_stage(m, c, scores, const)
    if fill is None:
        return None
    if "mask_add2" not in c:
        return MaskPlan(fill=fill, detail=detail)
    dtype = _adds_exactly(c, qdtype)
    if dtype is None or not _float_mask(c["mask2"], scores):
        return None
    return MaskPlan(additive=(c["mask2"],), fill=fill, detail=f"{detail}+additive", dtype=dtype)


def emit_mask(m: Match, plan: MaskPlan, dtype: torch.dtype) -> object | None:
    """Insert the nodes computing ``plan``'s ``attn_mask`` for a query of ``dtype``.

    An additive mask is built in ``plan.dtype`` (where eager adds it), else in ``dtype``.
    """
    if plan.fill is None and not plan.additive:
        return None
    if plan.bool_stage:
        cond, keep, _ = plan.fill
        return cond if keep else m.call(aten.logical_not.default, cond)
    dtype = plan.dtype or dtype
    parts = []
    if plan.fill is not None:
        cond, keep, f = plan.fill
        masked = m.call(aten.logical_not.default, cond) if keep else cond
        # most negative value of the mask dtype: masks the key in any row with an unmasked key
        f = f if f == -math.inf else torch.finfo(dtype).min
        parts.append(m.call(aten.masked_fill.Scalar, m.call(aten.zeros_like.default, cond, dtype=dtype), masked, f))
    for a in plan.additive:
        parts.append(a if tv(a).dtype == dtype else m.call(aten._to_copy.default, a, dtype=dtype))
    mask = parts[0]
    for p in parts[1:]:
        mask = m.call(aten.add.Tensor, mask, p)
    return mask


def emit_empty_rows(m: Match, plan: MaskPlan, out: fx.Node, v: object, n_rep: int) -> fx.Node:
    """Give rows whose keys are all masked eager's result: ``mean(v)`` (finite fill) or NaN (``-inf``).

    ``out``: the op's ``[..., Hq, L, Ev]``; ``v``: ``[..., Hkv, S, Ev]`` with ``Hq = n_rep * Hkv``.
    """
    if not plan.bool_stage:
        return out
    cond, keep, f = plan.fill
    # [..., L, 1]: True where the row attends to nothing
    if keep:
        empty = m.call(aten.logical_not.default, m.call(aten.any.dim, cond, -1, True))
    else:
        empty = m.call(aten.all.dim, cond, -1, True)
    if f == -math.inf:
        return m.call(aten.masked_fill.Scalar, out, empty, math.nan)
    mean = m.call(aten.mean.dim, v, [-2], True)  # [..., Hkv, 1, Ev]
    if n_rep != 1:
        mean = m.call(aten.repeat_interleave.self_int, mean, n_rep, -3)
    return m.call(aten.where.self, empty, mean, out)
