"""The attention-canonicalization pass: every attention form becomes ``graphtune.attention``.

Forms matched (see ``docs/canonical-attention.md``), in all three capture vocabularies:

* ``F.scaled_dot_product_attention`` with any mask / causal / scale / GQA arguments, as long
  as ``dropout_p == 0`` (non-zero dropout is active dropout and is left alone);
* eager attention ``matmul|bmm(softmax(mask(scale(matmul|bmm(q, kᵀ)))), v)`` with the scale a
  div or mul on the scores or pre-applied to q or k, the mask additive / ``masked_fill`` /
  ``torch.where``, casts around the softmax and eval-mode dropout on the probabilities;
* in both, k/v that went through HF ``repeat_kv`` (unsqueeze-expand-reshape) or
  ``repeat_interleave(n, dim=-3)`` are replaced by the un-repeated tensors plus ``enable_gqa``.

The rules are data (:data:`pm_canonicalize_attention`); the callbacks below only translate
captured pieces into the op's arguments and decline (return None) whenever the translation
would not be exact.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphtune.ir import ops as gt_ops
from graphtune.ir.meta import val_of
from graphtune.rewrites.context import AttentionSite, module_path
from graphtune.rewrites.kinds import view
from graphtune.rewrites.pattern import Any, Match, Maybe, Pat, PatternMatcher, Rule, real_users

__all__ = ["pm_canonicalize_attention", "unrepeat_kv", "MASK_FILL_MAX"]

aten = torch.ops.aten

# masked_fill / where with a fill at or below this is masking: s + fill and fill both underflow
# exp() to exactly 0 in fp32 after max-subtraction, so the additive translation is exact.
MASK_FILL_MAX = -1e4

# -- patterns ------------------------------------------------------------------------------

_QK = Pat(("matmul", "bmm"), Pat.var("q"), Pat.var("kt"), name="qk")
_SCORES = Maybe("cast", _QK, name="casts_qk")
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
_PROBS = Maybe(("cast", "dropout", "contiguous"), _SOFTMAX, name="probs_wrap")
EAGER_ATTENTION = Pat(("matmul", "bmm"), _PROBS, Pat.var("v"), name="pv")
SDPA = Pat("sdpa", Pat.var("q"), Pat.var("k"), Pat.var("v"), name="sdpa")


# -- small helpers -------------------------------------------------------------------------

def _tv(x: object) -> torch.Tensor | None:
    v = val_of(x) if isinstance(x, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _eq(a: object, b: object) -> bool:
    # Never guard on symbolic sizes: only what is known without adding guards counts.
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def _compat(a: object, b: object) -> bool:
    """Sizes the original op also requires equal: accept unless known to differ. Under Dynamo's
    dynamic shapes the k and v caches get separate symbols (s0 + 1 vs s1 + 1) that are equal at
    run time; the op re-checks real sizes on every call, so nothing wrong slips through."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return not bool(statically_known_true(a != b))


def _shape_compat(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_compat(x, y) for x, y in zip(a, b))


def _shape_eq(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


def _broadcasts_into(small: tuple, big: tuple) -> bool:
    """``small`` broadcasts to ``big`` without growing it."""
    if len(small) > len(big):
        return False
    return all(_eq(s, 1) or _eq(s, b) for s, b in zip(small[::-1], big[::-1]))


def _fetch_attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _scalar(m: Match, x: object) -> float | fx.Node | None:
    """A scale/fill operand as a Python number, or a node producing one; None if it is a tensor.

    Accepts numbers, 0-dim constants (``torch.full([], c)``, ``torch.tensor(c)``, 0-dim
    attributes) and nodes whose value is a Python/symbolic scalar (e.g. ``q.size(-1) ** 0.5``).
    """
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    v = val_of(x)
    if isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool):
        return x
    if not isinstance(v, torch.Tensor) or v.dim() != 0 or not v.dtype.is_floating_point and v.dtype != torch.int64:
        return None
    if x.op == "get_attr":  # a 0-dim buffer/constant is read now; a learnable Parameter is not frozen
        t = _fetch_attr(m.gm, x.target)
        ok = isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.dim() == 0
        return float(t.item()) if ok else None
    xv = view(x)
    if xv is not None and xv.kind == "full" and xv.params["size"] in ((), []):
        return _scalar(m, xv.params["value"])
    return None


def _const(m: Match, x: object) -> float | None:
    c = _scalar(m, x)
    return c if isinstance(c, float) else None


def _unscale(m: Match, x: object) -> tuple[object, float | None]:
    """``x = inner * c`` or ``inner / c`` with a constant c (and x read only here) -> (inner, factor)."""
    v = view(x)
    if v is None or v.kind not in ("mul", "div") or len(real_users(x)) != 1:
        return x, None
    pairs = [(v.inputs[0], v.inputs[1])] + ([(v.inputs[1], v.inputs[0])] if v.kind == "mul" else [])
    for inner, c in pairs:
        ci, xv = _tv(inner), _tv(x)
        cval = _const(m, c)
        if ci is not None and xv is not None and cval is not None and cval != 0 and ci.dtype == xv.dtype \
                and _shape_eq(tuple(ci.shape), tuple(xv.shape)):
            return inner, (cval if v.kind == "mul" else 1.0 / cval)
    return x, None


def _permutation(x: object) -> tuple[object, list[int]] | None:
    """``x = src.permute(perm)`` (transpose, permute, ``.mT``) -> (src, perm)."""
    v, xv = view(x), _tv(x)
    if v is None or xv is None or v.kind not in ("transpose", "permute"):
        return None
    r = xv.dim()
    if v.kind == "transpose":
        d0, d1 = (d % r for d in v.params["dims"])
        perm = list(range(r))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        perm = [d % r for d in v.params["dims"]]
    return v.inputs[0], perm


def unrepeat_kv(x: object) -> tuple[fx.Node, int, str] | None:
    """If ``x`` repeats each kv head n times along dim -3, return ``(un-repeated x, n, how)``.

    Recognizes HF ``repeat_kv`` (``x[:, :, None].expand(b, h, n, s, d).reshape(b, h*n, s, d)``,
    also spelled with ``unsqueeze``) and ``x.repeat_interleave(n, dim=-3)``; both map query
    head ``i`` to kv head ``i // n``, which is ``enable_gqa``'s grouping.
    """
    v, xv = view(x), _tv(x)
    if v is None or xv is None or xv.dim() < 3:
        return None
    r = xv.dim()
    if v.kind == "repeat_interleave":
        n, dim = v.params["repeats"], v.params["dim"]
        src = v.inputs[0]
        if isinstance(n, int) and n > 0 and isinstance(dim, int) and dim % r == r - 3 and _tv(src) is not None:
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
    s, e = _tv(src), _tv(v.inputs[0])
    if s is None or e is None or s.dim() != r or e.dim() != r + 1 or uv.params["dim"] % (r + 1) != r - 2:
        return None
    # src: [..., H, S, D]  expand: [..., H, n, S, D]  x: [..., H*n, S, D]
    n = e.shape[r - 2]
    ss, es, xs = tuple(s.shape), tuple(e.shape), tuple(xv.shape)
    if not isinstance(n, int) or not (_shape_eq(es[: r - 2], ss[: r - 2]) and _shape_eq(es[r - 1:], ss[r - 2:])):
        return None
    if not _shape_eq(xs, (*ss[: r - 3], ss[r - 3] * n, *ss[r - 2:])):
        return None
    return src, n, "repeat_kv"


def _fold_gqa(k: object, v: object) -> tuple[object, object, str | None]:
    rk, rv = unrepeat_kv(k), unrepeat_kv(v)
    if rk is not None and rv is not None and rk[1] == rv[1]:
        return rk[0], rv[0], rk[2]
    return k, v, None


def _record(m: Match, node: fx.Node, form: str, details: dict) -> None:
    sites = getattr(m.ctx, "sites", None)
    if sites is not None:
        sites.append(AttentionSite(node.name, module_path(m.root), form, details))


def _qkv_ok(q: object, k: object, v: object, out: object, gqa: bool) -> bool:
    """Shapes/dtypes the op accepts and that give ``out``'s dtype (checked here, not by a crash)."""
    qv, kv, vv, ov = _tv(q), _tv(k), _tv(v), _tv(out)
    if qv is None or kv is None or vv is None or ov is None:
        return False
    if not (qv.dtype == kv.dtype == vv.dtype == ov.dtype) or not (qv.dim() == kv.dim() == vv.dim() >= 2):
        return False
    qs, ks, vs = tuple(qv.shape), tuple(kv.shape), tuple(vv.shape)
    if not (_compat(qs[-1], ks[-1]) and _compat(ks[-2], vs[-2])):
        return False
    if qv.dim() >= 3:
        if not (_shape_compat(qs[:-3], ks[:-3]) and _shape_compat(ks[:-2], vs[:-2])):
            return False
        if not _compat(qs[-3], ks[-3]) and not (gqa and _eq(qs[-3] % ks[-3], 0)):
            return False
    return _shape_eq(tuple(ov.shape), (*qs[:-1], vs[-1]))


# -- F.scaled_dot_product_attention --------------------------------------------------------

def sdpa_is_inference(m: Match, sdpa: fx.Node, **_: object) -> bool:
    """dropout_p must be a literal 0: anything else is active dropout, which the op excludes."""
    p = view(sdpa).params["dropout_p"]
    return isinstance(p, (int, float)) and p == 0


def rewrite_sdpa(m: Match, sdpa: fx.Node, q: object, k: object, v: object) -> fx.Node | None:
    p = view(sdpa).params
    mask, is_causal, scale, gqa = p["attn_mask"], p["is_causal"], p["scale"], p["enable_gqa"]
    k0, v0, how = _fold_gqa(k, v)
    gqa_detail = how if how is not None else ("sdpa" if gqa is True else None)
    gqa = gqa or how is not None
    if not _qkv_ok(q, k0, v0, sdpa, bool(gqa)):
        return None
    mv = _tv(mask)
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
    sv = _tv(softmax)
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
    """Factors whose product is the attention scale, and how it was written."""
    factors: list = []
    how = "none"
    for key, op in (("scale_mul", "mul"), ("scale_div", "div")):
        if key in c:
            s = _scalar(m, c["scale"])
            if s is None or s == 0.0:
                return None  # a tensor scale (per-head, per-position...) is not an attention scale
            if op == "div":
                s = 1.0 / s if isinstance(s, float) else m.call(operator.truediv, 1.0, s)
            factors.append(s)
            how = op
    return factors, how


def _float_mask(m: Match, mask: object, scores: torch.Tensor, dtype: torch.dtype) -> object | None:
    mv = _tv(mask)
    if mv is None or not mv.dtype.is_floating_point or not _broadcasts_into(tuple(mv.shape), tuple(scores.shape)):
        return None
    return m.call(aten._to_copy.default, mask, dtype=dtype) if mv.dtype != dtype else mask


def _additive_mask(m: Match, c: dict, scores: torch.Tensor, dtype: torch.dtype) -> tuple[object, str | None] | bool:
    """The mask stage(s) as one additive float mask (or None); False if not translatable exactly."""
    first = _first_mask(m, c, scores, dtype)
    if first is False or "mask_add2" not in c:
        return first
    second = _float_mask(m, c["mask2"], scores, dtype)
    if second is None:
        return False
    return m.call(aten.add.Tensor, first[0], second), f"{first[1]}+additive"


def _first_mask(m: Match, c: dict, scores: torch.Tensor, dtype: torch.dtype) -> tuple[object, str | None] | bool:
    if "mask_add" in c:
        mask = _float_mask(m, c["mask"], scores, dtype)
        return False if mask is None else (mask, "additive")
    for key, detail, invert in (("mask_fill", "masked_fill", False), ("mask_where", "where", True),
                                ("mask_where_inv", "where", False)):
        if key not in c:
            continue
        cond, cv, fill = c["mask"], _tv(c["mask"]), _const(m, c["fill"])
        if cv is None or cv.dtype != torch.bool or fill is None or not fill <= MASK_FILL_MAX:
            return False
        if not _broadcasts_into(tuple(cv.shape), tuple(scores.shape)):
            return False
        fill = max(fill, torch.finfo(dtype).min) if math.isfinite(fill) else fill
        masked = m.call(aten.logical_not.default, cond) if invert else cond
        zeros = m.call(aten.zeros_like.default, cond, dtype=dtype)
        return m.call(aten.masked_fill.Scalar, zeros, masked, fill), detail
    return None, None


def _key_bhsd(m: Match, kt: object) -> tuple[object, list[int] | None, float | None] | None:
    """From ``kt`` (k transposed to [..., E, S]) to (source, permutation to BHSD or None, prescale)."""
    kt, ck = _unscale(m, kt)
    found = _permutation(kt)
    if found is None:
        return None  # matmul(q, W) with no transpose: not attention
    src, perm = found
    perm2 = perm[:-2] + [perm[-1], perm[-2]]  # k = kt.transpose(-2, -1) = src.permute(perm2)
    src, ck2 = _unscale(m, src)
    if ck2 is not None:
        ck = ck2 if ck is None else ck * ck2
    return src, (None if perm2 == list(range(len(perm2))) else perm2), ck


def _product(m: Match, factors: list) -> float | fx.Node:
    """The scale: constants folded; symbolic factors (nodes) multiplied in the graph."""
    const = math.prod(f for f in factors if isinstance(f, float))
    nodes = [f for f in factors if not isinstance(f, float)]
    if not nodes:
        return const
    scale = nodes[0] if const == 1.0 else m.call(operator.mul, nodes[0], const)
    for f in nodes[1:]:
        scale = m.call(operator.mul, scale, f)
    return scale


def rewrite_eager(m: Match, pv: fx.Node, q: object, kt: object, v: object, qk: fx.Node, softmax: fx.Node,
                  **c: object) -> fx.Node | None:
    got = _scale_factor(m, c)
    key = _key_bhsd(m, kt)
    if got is None or key is None:
        return None
    factors, scale_how = got
    k, perm, ck = key
    q, cq = _unscale(m, q)
    if cq is not None:
        factors.append(cq)
        scale_how = "prescaled-q" if scale_how == "none" else scale_how
    if ck is not None:
        factors.append(ck)
        scale_how = "prescaled-k" if scale_how == "none" else scale_how
    k, v, how = (k, v, None) if perm is not None else _fold_gqa(k, v)
    qv, kv, sv = _tv(q), _tv(k), _tv(qk)
    if qv is None or kv is None or sv is None:
        return None
    if perm is not None:
        if len(perm) != kv.dim():
            return None
        k = m.call(aten.permute.default, k, perm)
    if not _qkv_ok(q, k, v, pv, how is not None):
        return None
    mask = _additive_mask(m, c, sv, qv.dtype)
    if mask is False:
        return None
    mask_node, mask_how = mask
    scale = _product(m, factors)
    node = m.call(gt_ops.attention.default, q, k, v, attn_mask=mask_node, scale=scale, enable_gqa=how is not None)
    # upcast: the softmax (or the scores feeding it) ran in a wider dtype than q
    casts = [*c.get("casts_qk", ()), *c.get("casts_scaled", ()), *c.get("casts_masked", ()), *c.get("casts_in", ())]
    upcast = any(_tv(n) is not None and _tv(n).dtype.itemsize > qv.dtype.itemsize for n in (softmax, *casts))
    _record(m, node, "eager-bmm" if view(pv).kind == "bmm" else "eager-matmul",
            {"scale": scale_how, "mask": mask_how, "gqa": how, "upcast": upcast,
             "layout": "BHSD" if perm is None else "BSHD"})
    return node


pm_canonicalize_attention = PatternMatcher([
    Rule(SDPA, rewrite_sdpa, extra_check=sdpa_is_inference),
    Rule(EAGER_ATTENTION, rewrite_eager, extra_check=eager_is_attention),
])
