"""How eager attention writes its two products, read off the graph.

``q·kᵀ`` as ``matmul|bmm(q, kᵀ)`` (k transposed or permuted), ``baddbmm(bias, q, kᵀ, beta=,
alpha=)`` (BLOOM's ALiBi: the bias becomes part of the additive mask) or ``einsum`` with any
index layout (``"bhqd,bhkd->bhqk"``, ``"bqhd,bkhd->bhqk"``...); ``P·v`` as ``matmul|bmm`` or
``einsum``; optionally reshapes that split or merge the batch dims in between (BLOOM computes on
``[B*H, L, D]`` and masks on ``[B, H, L, S]``).

Analysis only: :func:`analyse_qk` and :func:`analyse_pv` return plain descriptions; nothing
is inserted until ``attention.py`` knows the whole rewrite is exact.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphtune.ir.meta import val_of
from graphtune.ir.sizes import shape_compat, shape_eq, size_compat, size_eq  # noqa: F401  (re-exported)
from graphtune.rewrites.kinds import view
from graphtune.rewrites.pattern import Match, real_users

__all__ = ["QK", "PV", "analyse_qk", "analyse_pv", "parse_einsum", "scalar", "const", "rebatch_ok", "rebatch",
           "batch_args", "scale_product", "upcast", "tv", "size_eq", "size_compat", "shape_eq", "shape_compat"]

aten = torch.ops.aten


# -- sizes ---------------------------------------------------------------------------------

def tv(x: object) -> torch.Tensor | None:
    """The (fake) tensor value of a node, or None."""
    v = val_of(x) if isinstance(x, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def batch_args(wrappers: list, nbatch: int) -> list | None:
    """The batch sizes as the graph spells them (ints, size nodes, at most one -1) at the outermost
    reshape among ``wrappers``: usable as arguments of a new node even when they are symbolic."""
    for w in wrappers:
        v = view(w)
        if v is not None and v.kind == "reshape":
            sizes = list(v.params.get("sizes") or ())[:nbatch]
            ok = len(sizes) == nbatch and all(isinstance(x, (int, fx.Node)) and not isinstance(x, bool) for x in sizes)
            return sizes if ok and sizes.count(-1) <= 1 else None
    return None


def rebatch_ok(src: tuple, dst: tuple, dst_args: list | None) -> bool:
    """:func:`rebatch` can turn batch dims ``src`` into ``dst``: static sizes but at most one, or
    the graph's own size arguments."""
    if not (len(src) >= 1 and len(dst) >= 1):
        return False
    return len(dst) == 1 or dst_args is not None or sum(not isinstance(x, int) for x in dst) <= 1


def rebatch(m: Match, x: object, src: tuple, dst: tuple, dst_args: list | None) -> object:
    """``x: [*src, a, b] -> [*dst, a, b]`` (same batch numel, row-major), via flatten/unflatten."""
    if shape_eq(src, dst):
        return x
    if len(src) > 1:
        x = m.call(aten.flatten.using_ints, x, 0, len(src) - 1)
    if len(dst) > 1:
        sizes = dst_args if dst_args is not None else [d if isinstance(d, int) else -1 for d in dst]
        x = m.call(aten.unflatten.int, x, 0, sizes)
    return x


# -- constants -----------------------------------------------------------------------------

def _fetch_attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def scalar(m: Match, x: object) -> float | fx.Node | None:
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
        return scalar(m, xv.params["value"])
    return None


def const(m: Match, x: object) -> float | None:
    """:func:`scalar`, constants only."""
    c = scalar(m, x)
    return c if isinstance(c, float) else None


def _unscale(m: Match, x: object) -> tuple[object, float | None]:
    """``x = inner * c`` or ``inner / c`` with a constant c (and x read only here) -> (inner, factor)."""
    v = view(x)
    if v is None or v.kind not in ("mul", "div") or len(real_users(x)) != 1:
        return x, None
    pairs = [(v.inputs[0], v.inputs[1])] + ([(v.inputs[1], v.inputs[0])] if v.kind == "mul" else [])
    for inner, c in pairs:
        ci, xv = tv(inner), tv(x)
        cval = const(m, c)
        if ci is not None and xv is not None and cval is not None and cval != 0 and ci.dtype == xv.dtype \
                and shape_eq(tuple(ci.shape), tuple(xv.shape)):
            return inner, (cval if v.kind == "mul" else 1.0 / cval)
    return x, None


def _permutation(x: object) -> tuple[object, list[int]] | None:
    """``x = src.permute(perm)`` (transpose, permute, ``.mT``) -> (src, perm)."""
    v, xv = view(x), tv(x)
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


# -- einsum --------------------------------------------------------------------------------

def parse_einsum(eq: str, n: int = 2) -> tuple[list[str], str] | None:
    """``"bhqd,bhkd->bhqk"`` -> (``["bhqd", "bhkd"]``, ``"bhqk"``); None for ellipses, repeated
    letters in one operand (diagonals), implicit outputs or another number of operands."""
    eq = eq.replace(" ", "")
    if eq.count("->") != 1:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != n or not all(t.isalpha() and len(set(t)) == len(t) for t in (*ins, out)):
        return None
    return ins, out


def _qk_form(x: str, y: str, z: str) -> tuple[list[int], list[int]] | None:
    """``einsum(x, y -> z)`` as ``q' @ k'ᵀ``: z is ``[*batch, i, j]`` (i a letter of x only, j of y
    only), exactly one letter c is contracted. Returns the permutations taking x to
    ``[*batch, i, c]`` and y to ``[*batch, j, c]``."""
    if len(z) < 2:
        return None
    batch, i, j = z[:-2], z[-2], z[-1]
    contracted = (set(x) & set(y)) - set(z)
    if len(contracted) != 1:
        return None
    (c,) = contracted
    if set(x) != set(batch) | {i, c} or set(y) != set(batch) | {j, c} or i in y or j in x:
        return None
    return [x.index(t) for t in batch + i + c], [y.index(t) for t in batch + j + c]


def _pv_form(p: str, v: str, o: str) -> tuple[list[int], list[int]] | None:
    """``einsum(p, v -> o)`` as ``P @ v'``: p is ``[*batch, i, c]`` (the probabilities' own layout),
    c contracted with v, e the one letter of v only. Returns the permutations taking v to
    ``[*batch, c, e]`` and ``[*batch, i, e]`` to o."""
    if len(p) < 2:
        return None
    batch, i, c = p[:-2], p[-2], p[-1]
    rest = set(v) - set(p)
    if len(rest) != 1 or c in o:
        return None
    (e,) = rest
    if set(v) != set(batch) | {c, e} or set(o) != set(batch) | {i, e}:
        return None
    canon = batch + i + e
    return [v.index(t) for t in batch + c + e], [canon.index(t) for t in o]


def _permuted(shape: tuple, perm: list[int] | None) -> tuple:
    return shape if perm is None else tuple(shape[p] for p in perm)


def _identity(perm: list[int]) -> list[int] | None:
    return None if perm == list(range(len(perm))) else perm


# -- q·kᵀ ----------------------------------------------------------------------------------

@dataclass
class QK:
    """The scores' operands: ``scores = alpha * q' @ k'ᵀ * prescale (+ beta * bias)``.

    ``q' = q.permute(q_perm)``: ``[*batch, L, E]``, ``k' = k.permute(k_perm)``: ``[*batch, S, E]``
    (a perm is None when it is the identity). ``factors``: constant factors of the scale found
    here (``alpha``, ``q * c``, ``k / c``); ``prescaled``: how they were written (``"alpha"``,
    ``"prescaled-q"``, ``"prescaled-k"``) or None.
    """

    form: str
    q: object
    k: object
    q_perm: list[int] | None
    k_perm: list[int] | None
    factors: list = field(default_factory=list)
    prescaled: str | None = None
    bias: object = None
    beta: float = 0.0

    @property
    def q_shape(self) -> tuple:
        return _permuted(tuple(tv(self.q).shape), self.q_perm)

    @property
    def k_shape(self) -> tuple:
        return _permuted(tuple(tv(self.k).shape), self.k_perm)


def _key_from_kt(m: Match, kt: object) -> tuple[object, list[int] | None, float | None] | None:
    """From ``kt`` (k transposed to [..., E, S]) to (source, permutation to [..., S, E] or None, prescale)."""
    kt, ck = _unscale(m, kt)
    found = _permutation(kt)
    if found is None:
        return None  # matmul(q, W) with no transpose: not attention
    src, perm = found
    perm2 = perm[:-2] + [perm[-1], perm[-2]]  # k = kt.transpose(-2, -1) = src.permute(perm2)
    src, ck2 = _unscale(m, src)
    if ck2 is not None:
        ck = ck2 if ck is None else ck * ck2
    return src, _identity(perm2), ck


def analyse_qk(m: Match, qk: fx.Node, q: object, kt: object, bias: object = None) -> QK | None:
    """Describe the scores node ``qk`` (matmul, bmm, baddbmm or einsum), or None if it is not q·kᵀ."""
    v = view(qk)
    if v.kind == "einsum":
        parsed = parse_einsum(v.params["equation"])
        forms = parsed and _qk_form(parsed[0][0], parsed[0][1], parsed[1])
        if not forms or len(v.inputs) != 2:
            return None
        qp, kp = forms
        q, cq = _unscale(m, q)
        k, ck = _unscale(m, kt)
        out = QK("eager-einsum", q, k, _identity(qp), _identity(kp))
    else:
        key = _key_from_kt(m, kt)
        if key is None:
            return None
        k, kp, ck = key
        q, cq = _unscale(m, q)
        out = QK("eager-" + v.kind, q, k, None, kp)
    if v.kind == "baddbmm":
        alpha, beta = scalar(m, v.params["alpha"]), const(m, v.params["beta"])
        if alpha is None or beta is None or (isinstance(alpha, float) and alpha == 0.0):
            return None
        out.factors.append(alpha if isinstance(alpha, float) else (alpha, False))
        if not (isinstance(alpha, float) and alpha == 1.0):
            out.prescaled = "alpha"
        bv = tv(bias)
        if beta != 0:  # beta == 0: baddbmm ignores the input, NaNs included
            if bv is None or not bv.dtype.is_floating_point:
                return None
            out.bias, out.beta = bias, float(beta)
    if tv(out.q) is None or tv(out.k) is None:
        return None
    for c, how in ((cq, "prescaled-q"), (ck, "prescaled-k")):
        if c is not None:
            out.factors.append(c)
            out.prescaled = out.prescaled or how
    return out


# -- P·v -----------------------------------------------------------------------------------

@dataclass
class PV:
    """``out = P @ v'`` with ``v' = v.permute(v_perm)``: ``[*batch, S, Ev]``; the op's output
    ``[*batch, L, Ev]`` becomes ``out`` through ``out_perm`` (None: identity)."""

    v: object
    v_perm: list[int] | None
    out_perm: list[int] | None

    @property
    def v_shape(self) -> tuple:
        return _permuted(tuple(tv(self.v).shape), self.v_perm)


def analyse_pv(pv: fx.Node, v: object) -> PV | None:
    """Describe ``pv`` (matmul, bmm or einsum of the probabilities with v), or None."""
    if tv(v) is None:
        return None
    pvv = view(pv)
    if pvv.kind != "einsum":
        return PV(v, None, None)
    parsed = parse_einsum(pvv.params["equation"])
    if parsed is None or len(pvv.inputs) != 2:
        return None
    (p, vl), o = parsed
    forms = _pv_form(p, vl, o)
    if forms is None:
        return None
    vp, op = forms
    return PV(v, _identity(vp), _identity(op))


def upcast(nodes: list, dtype: torch.dtype) -> bool:
    """Some node computed in a wider dtype than ``dtype`` (the softmax was upcast)."""
    return any(tv(n) is not None and tv(n).dtype.itemsize > dtype.itemsize for n in nodes)


def scale_product(m: Match, factors: list) -> float | fx.Node:
    """Emit the scale: constants folded; symbolic factors ``(node, inverse)`` multiplied in the graph."""
    c = math.prod(f for f in factors if isinstance(f, float))
    scale: float | fx.Node = c
    for f in factors:
        if isinstance(f, tuple):
            node, inverse = f
            if inverse:
                node = m.call(operator.truediv, 1.0, node)
            scale = node if isinstance(scale, float) and scale == 1.0 else m.call(operator.mul, scale, node)
    return scale
