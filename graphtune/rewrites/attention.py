"""The attention-canonicalization pass: every attention form becomes ``graphtune.attention``.

Forms matched (see ``docs/ops/attention.md``), in all three capture vocabularies:

* ``F.scaled_dot_product_attention`` with any mask / causal / scale / GQA arguments, as long
  as ``dropout_p == 0`` (non-zero dropout is active dropout and is left alone);
* eager attention ``PV(softmax(mask(scale(QK(q, k)))), v)`` with ``QK`` a matmul/bmm of q and
  kᵀ, a ``baddbmm`` adding a bias (BLOOM's ALiBi) or an ``einsum`` in any index layout, ``PV``
  a matmul/bmm or ``einsum`` (:mod:`.attention_forms`); the scale a div or mul on the scores or
  pre-applied to q or k; the mask additive (added in fp32, not in half precision) /
  ``masked_fill`` / ``torch.where`` (only fills that are exact; :mod:`.attention_masks`); casts around the softmax, eval-mode dropout on the
  probabilities and reshapes of the batch dims in between (BLOOM's ``[B*H, L, S]`` views);
* in both, k/v that went through HF ``repeat_kv`` (unsqueeze-expand-reshape) or
  ``repeat_interleave(n, dim=-3)`` are replaced by the un-repeated tensors plus ``enable_gqa``.

The rules are data (:data:`pm_canonicalize_attention`). Callbacks analyse first and emit once:
they read the captured pieces, decline (return None) whenever the translation would not be
exact, and only then insert the op and its arguments.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from graphtune.ir import ops as gt_ops
from graphtune.rewrites.attention_forms import (
    PV, QK, analyse_pv, analyse_qk, batch_args, const, rebatch, rebatch_ok, scalar, scale_product, shape_compat,
    shape_eq, size_compat, size_eq, tv, upcast,
)
from graphtune.rewrites.attention_masks import broadcasts_into, emit_empty_rows, emit_mask, plan_mask
from graphtune.rewrites.context import AttentionSite, module_path
from graphtune.rewrites.kinds import view
from graphtune.rewrites.pattern import Any, Match, Maybe, Pat, PatternMatcher, Rule

__all__ = ["pm_canonicalize_attention", "unrepeat_kv"]

aten = torch.ops.aten

# -- patterns ------------------------------------------------------------------------------

_QK = Any(
    Pat(("matmul", "bmm"), Pat.var("q"), Pat.var("kt"), name="qk"),
    Pat("baddbmm", Pat.var("bias"), Pat.var("q"), Pat.var("kt"), name="qk"),  # beta * bias + alpha * q @ kt
    Pat("einsum", Pat.var("q"), Pat.var("kt"), name="qk"),  # here "kt" is k in its einsum layout
)
_SCORES = Maybe(("cast", "reshape"), _QK, name="casts_qk")
_SCALED = Any(
    Pat("mul", _SCORES, Pat.var("scale"), name="scale_mul", commutative=True),
    Pat("div", _SCORES, Pat.var("scale"), name="scale_div"),
    _SCORES,
)
_PRE_MASK = Maybe("cast", _SCALED, name="casts_scaled")
_MASK_OPS = (
    Pat("add", _PRE_MASK, Pat.var("mask"), name="mask_add", commutative=True),
    Pat("masked_fill", _PRE_MASK, Pat.var("mask"), Pat.var("fill"), name="mask_fill"),
    Pat("where", Pat.var("mask"), _PRE_MASK, Pat.var("fill"), name="mask_where"),  # keep where True
    Pat("where", Pat.var("mask"), Pat.var("fill"), _PRE_MASK, name="mask_where_inv"),  # keep where False
)
_MASKED = Any(
    # two stacked masks, e.g. where(causal, S, min) + attention_mask (older GPT-2)
    Pat("add", Maybe("cast", Any(*_MASK_OPS), name="casts_masked"), Pat.var("mask2"), name="mask_add2",
        commutative=True),
    *_MASK_OPS,
    _SCALED,
)
_SOFTMAX = Pat("softmax", Maybe("cast", _MASKED, name="casts_in"), name="softmax")
_PROBS = Maybe(("cast", "dropout", "contiguous", "reshape"), _SOFTMAX, name="probs_wrap")
EAGER_ATTENTION = Pat(("matmul", "bmm", "einsum"), _PROBS, Pat.var("v"), name="pv")
SDPA = Pat("sdpa", Pat.var("q"), Pat.var("k"), Pat.var("v"), name="sdpa")


# -- shared helpers --------------------------------------------------------------------------

def unrepeat_kv(x: object) -> tuple[fx.Node, int, str] | None:
    """If ``x`` repeats each kv head n times along dim -3, return ``(un-repeated x, n, how)``.

    Recognizes HF ``repeat_kv`` (``x[:, :, None].expand(b, h, n, s, d).reshape(b, h*n, s, d)``,
    also spelled with ``unsqueeze``) and ``x.repeat_interleave(n, dim=-3)``; both map query
    head ``i`` to kv head ``i // n``, which is ``enable_gqa``'s grouping.
    """
    v, xv = view(x), tv(x)
    if v is None or xv is None or xv.dim() < 3:
        return None
    r = xv.dim()
    if v.kind == "repeat_interleave":
        n, dim = v.params["repeats"], v.params["dim"]
        src = v.inputs[0]
        if isinstance(n, int) and n > 0 and isinstance(dim, int) and dim % r == r - 3 and tv(src) is not None:
            return src, n, "repeat_interleave"
        return None
    if v.kind != "reshape":
        return None
    ev = view(v.inputs[0])
    if ev is None or ev.kind != "expand":
        return None
    uv = view(ev.inputs[0])
    if uv is None or uv.kind != "unsqueeze":
        return None
    src = uv.inputs[0]
    s, e = tv(src), tv(v.inputs[0])
    if s is None or e is None or s.dim() != r or e.dim() != r + 1 or uv.params["dim"] % (r + 1) != r - 2:
        return None
    # src: [..., H, S, D]  expand: [..., H, n, S, D]  x: [..., H*n, S, D]
    n = e.shape[r - 2]
    ss, es, xs = tuple(s.shape), tuple(e.shape), tuple(xv.shape)
    if not isinstance(n, int) or not (shape_eq(es[: r - 2], ss[: r - 2]) and shape_eq(es[r - 1:], ss[r - 2:])):
        return None
    if not shape_eq(xs, (*ss[: r - 3], ss[r - 3] * n, *ss[r - 2:])):
        return None
    return src, n, "repeat_kv"


def _fold_gqa(k: object, v: object) -> tuple[object, object, str | None, int]:
    rk, rv = unrepeat_kv(k), unrepeat_kv(v)
    if rk is not None and rv is not None and rk[1] == rv[1]:
        return rk[0], rv[0], rk[2], rk[1]
    return k, v, None, 1


def _record(m: Match, node: fx.Node, form: str, details: dict) -> None:
    sites = getattr(m.ctx, "sites", None)
    if sites is not None:
        sites.append(AttentionSite(node.name, module_path(m.root), form, details))


def _shapes_ok(qs: tuple, ks: tuple, vs: tuple, gqa: bool) -> bool:
    """Shapes the op accepts (checked here, not by a crash)."""
    if not (len(qs) == len(ks) == len(vs) >= 2):
        return False
    if not (size_compat(qs[-1], ks[-1]) and size_compat(ks[-2], vs[-2])):
        return False
    if len(qs) >= 3:
        if not (shape_compat(qs[:-3], ks[:-3]) and shape_compat(ks[:-2], vs[:-2])):
            return False
        if not size_compat(qs[-3], ks[-3]) and not (gqa and size_eq(qs[-3] % ks[-3], 0)):
            return False
    return True


def _qkv_ok(q: object, k: object, v: object, out: object, gqa: bool) -> bool:
    """q, k, v of one dtype that the op accepts, giving ``out``'s shape and dtype."""
    qv, kv, vv, ov = tv(q), tv(k), tv(v), tv(out)
    if qv is None or kv is None or vv is None or ov is None or not (qv.dtype == kv.dtype == vv.dtype == ov.dtype):
        return False
    qs, vs = tuple(qv.shape), tuple(vv.shape)
    return _shapes_ok(qs, tuple(kv.shape), vs, gqa) and shape_eq(tuple(ov.shape), (*qs[:-1], vs[-1]))


# -- F.scaled_dot_product_attention --------------------------------------------------------

def sdpa_is_inference(m: Match, sdpa: fx.Node, **_: object) -> bool:
    """dropout_p must be a literal 0: anything else is active dropout, which the op excludes."""
    p = view(sdpa).params["dropout_p"]
    return isinstance(p, (int, float)) and p == 0


def rewrite_sdpa(m: Match, sdpa: fx.Node, q: object, k: object, v: object) -> fx.Node | None:
    p = view(sdpa).params
    mask, is_causal, scale, gqa = p["attn_mask"], p["is_causal"], p["scale"], p["enable_gqa"]
    k0, v0, how, _ = _fold_gqa(k, v)
    gqa_detail = how if how is not None else ("sdpa" if gqa is True else None)
    gqa = gqa or how is not None
    if not _qkv_ok(q, k0, v0, sdpa, bool(gqa)):
        return None
    mv = tv(mask)
    node = m.call(gt_ops.attention.default, q, k0, v0, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    mask_detail = "causal" if is_causal is True else None
    if mv is not None:
        mask_detail = "bool" if mv.dtype == torch.bool else "additive"
    _record(m, node, "sdpa", {"scale": "default" if scale is None else "explicit", "mask": mask_detail,
                              "gqa": gqa_detail, "upcast": False, "layout": "BHSD"})
    return node


# -- eager attention -----------------------------------------------------------------------

def eager_is_attention(m: Match, pv: fx.Node, softmax: fx.Node, probs_wrap: list, **_: object) -> bool:
    """Softmax over the key dim (the last one) and every dropout on the probabilities inactive."""
    sv = tv(softmax)
    dim = view(softmax).params["dim"]
    if sv is None or not isinstance(dim, int) or dim % sv.dim() != sv.dim() - 1:
        return False
    for w in probs_wrap:
        wv = view(w)
        if wv.kind == "dropout":
            p, training = wv.params["p"], wv.params["training"]
            if not (training is False or (isinstance(p, (int, float)) and p == 0)):
                return False
    return True


def _scale_factor(m: Match, c: dict) -> tuple[list, str] | None:
    """Factors whose product is the scale applied to the scores, and how it was written.

    Constants are floats; symbolic factors are ``(node, inverse)`` (``scale_product`` emits them).
    """
    factors: list = []
    how = "none"
    for key, op in (("scale_mul", "mul"), ("scale_div", "div")):
        if key in c:
            s = scalar(m, c["scale"])
            if s is None or (isinstance(s, float) and s == 0.0):
                return None  # a tensor scale (per-head, per-position...) is not an attention scale
            factors.append((1.0 / s if op == "div" else s) if isinstance(s, float) else (s, op == "div"))
            how = op
    return factors, how


def _layout(*perms: list[int] | None) -> str:
    given = [p for p in perms if p is not None]
    if not given:
        return "BHSD"
    return "BSHD" if all(p == [0, 2, 1, 3] for p in given) else "permuted"


def _plan_eager(m: Match, pv: fx.Node, qk: fx.Node, softmax: fx.Node, qkf: QK, pvf: PV, c: dict) -> dict | None:
    """Everything the eager rewrite will emit, or None if the translation is not exact."""
    scores = c["casts_qk"][0] if c.get("casts_qk") else qk  # the scores as scaled and masked
    probs = c["probs_wrap"][0] if c.get("probs_wrap") else softmax  # the probabilities as multiplied
    qkv, sv, smv, pvv, outv = tv(qk), tv(scores), tv(softmax), tv(probs), tv(pv)
    qv, kv = tv(qkf.q), tv(qkf.k)
    if any(x is None for x in (qkv, sv, smv, pvv, outv)) or qkv.dim() < 2:
        return None
    qks, ss, ps = tuple(qkv.shape), tuple(sv.shape), tuple(pvv.shape)
    if not (shape_eq(qks[-2:], ss[-2:]) and shape_eq(ss[-2:], ps[-2:]) and shape_eq(tuple(smv.shape), ss)):
        return None
    # batch dims where q·kᵀ is computed (bq), masked (bm) and multiplied with v (bp)
    bq, bm, bp = qks[:-2], ss[:-2], ps[:-2]
    reshaped = not (shape_eq(bq, bm) and shape_eq(bp, bm))
    k, v, gqa, n_rep, bm_args, bp_args = qkf.k, pvf.v, None, 1, None, None
    qs, ks, vs = qkf.q_shape, qkf.k_shape, pvf.v_shape
    if reshaped:
        # BLOOM: [B*H, L, D] operands, [B, H, L, S] scores: the op runs on the latter's batch dims
        bm_args = batch_args(c.get("casts_qk", []), len(bm))
        bp_args = batch_args(c.get("probs_wrap", []), len(bp))
        if not (shape_eq(qs[:-2], bq) and shape_eq(ks[:-2], bq) and shape_eq(vs[:-2], bp)
                and rebatch_ok(bq, bm, bm_args) and rebatch_ok(bp, bm, bm_args) and rebatch_ok(bm, bp, bp_args)):
            return None
        qs, ks, vs = (*bm, *qs[-2:]), (*bm, *ks[-2:]), (*bm, *vs[-2:])
    elif qkf.k_perm is None and pvf.v_perm is None:
        k, v, gqa, n_rep = _fold_gqa(k, v)
        ks, vs = tuple(tv(k).shape), tuple(tv(v).shape)
    if not (qv.dtype == kv.dtype == tv(v).dtype == outv.dtype) or not _shapes_ok(qs, ks, vs, gqa is not None):
        return None
    out_shape = (*(bp if reshaped else qs[:-2]), qs[-2], vs[-1])
    if pvf.out_perm is not None:
        out_shape = tuple(out_shape[i] for i in pvf.out_perm)
    if not shape_eq(out_shape, tuple(outv.shape)):
        return None
    scale = _scale_factor(m, c)
    mask = plan_mask(m, c, ss, const, qv.dtype)
    if scale is None or mask is None:
        return None
    post, scale_how = scale
    bias_factor = 1.0
    if qkf.bias is not None:
        bs = tuple(tv(qkf.bias).shape)
        if any(not isinstance(f, float) for f in post) or tv(qkf.bias).dtype != qv.dtype:
            return None  # the bias is scaled by what follows baddbmm: constants only
        if not broadcasts_into(bs, qks) or (reshaped and not (len(bs) == len(qks) and shape_eq(bs[:-2], bq))):
            return None
        bias_factor = qkf.beta * math.prod(post)
    return dict(k=k, v=v, gqa=gqa, n_rep=n_rep, bq=bq, bm=bm, bp=bp, bm_args=bm_args, bp_args=bp_args,
                reshaped=reshaped, factors=qkf.factors + post,
                scale_how=qkf.prescaled if scale_how == "none" and qkf.prescaled else scale_how,
                mask=mask, bias_factor=bias_factor)


def rewrite_eager(m: Match, pv: fx.Node, q: object, kt: object, v: object, qk: fx.Node, softmax: fx.Node,
                  **c: object) -> fx.Node | None:
    """Eager attention -> ``graphtune.attention`` (+ the fully-masked-row fix-up), when exact.

    Exactness rule for ``masked_fill``/``where`` fills (:mod:`.attention_masks`): the fill, rounded
    to the dtype it is written in, must be ``-inf`` or at most ``-finfo.max / 2`` there (e.g.
    ``finfo.min``); the stage becomes a bool mask, and rows with every key masked get eager's
    result back (mean of v for a finite fill, NaN for ``-inf``). Other fills (``-1e4``, ``-1e9``
    in fp32, fp16's minimum written into fp32 scores) are left to eager.

    Exactness rule for additive masks: eager must add them in the op's accumulation dtype (fp32, or
    fp64 for fp64 q); the mask is then passed in that dtype, not rounded to q's (an fp32
    ``finfo.min`` would overflow to ``-inf`` in fp16/bf16 and empty a fully masked row). An add in
    fp16/bf16 (HF's half-precision eager idiom) stays eager: there eager's rounding of ``s + mask``
    decides fully masked rows, and no rewrite can reproduce it without eager's scores for those
    rows (:mod:`.attention_masks` explains why a fix-up is not an option). A baddbmm bias joins the
    additive mask (times ``beta`` and any constant scale after it); batch reshapes between the
    products run the op on the masked scores' batch dims.
    """
    qkf, pvf = analyse_qk(m, qk, q, kt, c.get("bias")), analyse_pv(pv, v)
    plan = None if qkf is None or pvf is None else _plan_eager(m, pv, qk, softmax, qkf, pvf, c)
    if plan is None:
        return None
    # -- emit: [*bq, L, E] operands -> [*bm, L, E] -> attention -> [*bp, L, Ev] in pv's layout
    bq, bm, bp, reshaped = plan["bq"], plan["bm"], plan["bp"], plan["reshaped"]
    qn, kn, vn = (x if p is None else m.call(aten.permute.default, x, p)
                  for x, p in ((qkf.q, qkf.q_perm), (plan["k"], qkf.k_perm), (plan["v"], pvf.v_perm)))
    if reshaped:
        to_bm = plan["bm_args"]
        qn, kn, vn = rebatch(m, qn, bq, bm, to_bm), rebatch(m, kn, bq, bm, to_bm), rebatch(m, vn, bp, bm, to_bm)
    qdtype = tv(qkf.q).dtype
    mplan = plan["mask"]
    mask = emit_mask(m, mplan, qdtype)
    detail = mplan.detail
    if qkf.bias is not None:
        bias = rebatch(m, qkf.bias, bq, bm, plan["bm_args"]) if reshaped else qkf.bias
        if plan["bias_factor"] != 1.0:
            bias = m.call(aten.mul.Tensor, bias, plan["bias_factor"])
        if mask is None:
            mask = bias
        elif mplan.bool_stage:  # keep the bias where attending, -inf elsewhere
            mask = m.call(aten.where.ScalarOther, mask, bias, -math.inf)
        else:
            mask = m.call(aten.add.Tensor, bias, mask)
        detail = "bias" if detail is None else f"bias+{detail}"
    scale = scale_product(m, plan["factors"])
    node = m.call(gt_ops.attention.default, qn, kn, vn, attn_mask=mask, scale=scale, enable_gqa=plan["gqa"] is not None)
    out = emit_empty_rows(m, mplan, node, vn, plan["n_rep"])
    if reshaped:
        out = rebatch(m, out, bm, bp, plan["bp_args"])
    if pvf.out_perm is not None:
        out = m.call(aten.permute.default, out, pvf.out_perm)
    # upcast: the softmax (or the scores feeding it) ran in a wider dtype than q
    casts = [*c.get("casts_qk", ()), *c.get("casts_scaled", ()), *c.get("casts_masked", ()), *c.get("casts_in", ())]
    form = qkf.form
    if form in ("eager-matmul", "eager-bmm"):
        form = "eager-bmm" if view(pv).kind == "bmm" else "eager-matmul"
    _record(m, node, form, {"scale": plan["scale_how"], "mask": detail, "gqa": plan["gqa"],
                            "upcast": upcast([softmax, *casts], qdtype),
                            "layout": _layout(qkf.q_perm, qkf.k_perm, pvf.v_perm, pvf.out_perm)})
    return out


pm_canonicalize_attention = PatternMatcher([
    Rule(SDPA, rewrite_sdpa, extra_check=sdpa_is_inference),
    Rule(EAGER_ATTENTION, rewrite_eager, extra_check=eager_is_attention),
])
