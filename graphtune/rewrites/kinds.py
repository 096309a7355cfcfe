"""One small vocabulary of op *kinds* over the three capture vocabularies.

A graph captured by torch.fx symbolic tracing or Dynamo speaks torch-level Python
(``torch.matmul``, ``operator.truediv``, ``x.transpose(2, 3)`` as a ``call_method``...), one
from ``torch.export`` speaks ATen (``aten.matmul.default``, ``aten.transpose.int``...).
:func:`view` maps a node of any of them to an :class:`OpView`: a kind such as ``"matmul"``,
its tensor-ish inputs in a canonical order, and its other arguments by canonical name. Patterns
(:mod:`graphtune.rewrites.pattern`) are written over kinds only, so one rule covers all three.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphtune.ir.meta import val_of

__all__ = ["OpView", "view", "kind_of", "KINDS", "is_metadata_assert", "is_metadata_read", "is_metadata_use"]

aten = torch.ops.aten


@dataclass(frozen=True)
class OpView:
    """What a node computes, independent of the capture vocabulary.

    ``inputs`` are the operands patterns descend into (``x`` first for unary ops; for
    ``where`` the order is ``(cond, self, other)``); ``params`` the remaining arguments.
    """

    kind: str
    inputs: tuple
    params: dict = field(default_factory=dict)


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict | None = None) -> dict:
    """Map a node's args/kwargs onto ``names`` (a call's parameter list; ATen's ``self`` is ``input``)."""
    out = dict(defaults or {})
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    if "self" in out:
        out.setdefault("input", out.pop("self"))
    return out


def _varargs(node: fx.Node, first: str) -> tuple:
    # x.permute(0, 2, 1, 3) / x.permute((0, 2, 1, 3)) / x.expand(b, h, n, s, d) / x.view(size)
    rest = node.args[1:] if len(node.args) > 1 else tuple(node.kwargs.get(first, ()))
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    return tuple(rest)


# -- normalizers: node -> OpView | None ----------------------------------------------------

def _binary(kind: str) -> Callable[[fx.Node], OpView | None]:
    def norm(node: fx.Node) -> OpView | None:
        b = _bind(node, ("input", "other"), {"alpha": 1, "rounding_mode": None})
        if b.get("alpha", 1) != 1 or b.get("rounding_mode") is not None:
            return None  # add(x, y, alpha=2) / floor division are not plain add / div
        return OpView(kind, (b["input"], b["other"]))
    return norm


def _matmul(kind: str) -> Callable[[fx.Node], OpView | None]:
    def norm(node: fx.Node) -> OpView | None:
        b = _bind(node, ("input", "other"))
        return OpView(kind, (b["input"], b.get("other", b.get("mat2"))))
    return norm


def _baddbmm(node: fx.Node) -> OpView | None:
    # beta * input + alpha * (batch1 @ batch2); BLOOM adds its ALiBi bias this way
    b = _bind(node, ("input", "batch1", "batch2"), {"beta": 1, "alpha": 1})
    return OpView("baddbmm", (b["input"], b["batch1"], b["batch2"]), {"beta": b["beta"], "alpha": b["alpha"]})


def _einsum(node: fx.Node) -> OpView | None:
    # torch.einsum(eq, a, b) / torch.einsum(eq, [a, b]) / aten.einsum(eq, [a, b], path=None)
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (tuple, list)):
        ops = list(ops[0])
    if not isinstance(eq, str) or node.kwargs.get("path") is not None:
        return None
    return OpView("einsum", tuple(ops), {"equation": eq})


def _flatten(node: fx.Node) -> OpView | None:
    # a reshape; the sizes are read off the result
    v = val_of(node)
    if not isinstance(v, torch.Tensor):
        return None
    x = node.args[0] if node.args else node.kwargs["input"]
    return OpView("reshape", (x,), {"sizes": tuple(v.shape)})


def _transpose(node: fx.Node) -> OpView | None:
    b = _bind(node, ("input", "dim0", "dim1"))
    return OpView("transpose", (b["input"],), {"dims": (b["dim0"], b["dim1"])})


def _mT(node: fx.Node) -> OpView | None:
    return OpView("transpose", (node.args[0],), {"dims": (-2, -1)})


def _getattr(node: fx.Node) -> OpView | None:
    # fx / Dynamo record `x.mT` as getattr(x, "mT")
    if len(node.args) == 2 and node.args[1] == "mT" and isinstance(val_of(node), torch.Tensor):
        return _mT(node)
    return None


def _permute(node: fx.Node) -> OpView | None:
    if node.op == "call_method":
        return OpView("permute", (node.args[0],), {"dims": _varargs(node, "dims")})
    b = _bind(node, ("input", "dims"))
    return OpView("permute", (b["input"],), {"dims": tuple(b["dims"])})


def _softmax(node: fx.Node) -> OpView | None:
    b = _bind(node, ("input", "dim", "_stacklevel", "dtype"), {"dtype": None})
    return OpView("softmax", (b["input"],), {"dim": b.get("dim"), "dtype": b.get("dtype")})


def _softmax_2(node: fx.Node) -> OpView | None:
    # torch.softmax(x, dim, dtype) / x.softmax(dim, dtype) / aten.softmax.int(x, dim, dtype)
    b = _bind(node, ("input", "dim", "dtype"), {"dtype": None})
    return OpView("softmax", (b["input"],), {"dim": b.get("dim"), "dtype": b.get("dtype")})


def _aten_softmax(node: fx.Node) -> OpView | None:
    x, dim, half_to_float = node.args[:3]
    return OpView("softmax", (x,), {"dim": dim, "dtype": torch.float32 if half_to_float else None})


def _masked_fill(node: fx.Node) -> OpView | None:
    b = _bind(node, ("input", "mask", "value"))
    return OpView("masked_fill", (b["input"], b["mask"], b["value"]))


def _where(node: fx.Node) -> OpView | None:
    if node.op == "call_method":  # x.where(cond, y) == torch.where(cond, x, y)
        b = _bind(node, ("input", "condition", "other"))
        return OpView("where", (b["condition"], b["input"], b["other"]))
    b = _bind(node, ("condition", "input", "other"))
    if "input" not in b or "other" not in b:
        return None  # torch.where(cond) is nonzero()
    return OpView("where", (b["condition"], b["input"], b["other"]))


def _dropout(node: fx.Node) -> OpView | None:
    b = _bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True})
    return OpView("dropout", (b["input"],), {"p": b["p"], "training": b["training"]})


def _dropout_train(node: fx.Node) -> OpView | None:
    # torch.dropout(x, p, train) / aten.dropout.default(x, p, train)
    b = _bind(node, ("input", "p", "train"))
    return OpView("dropout", (b["input"],), {"p": b["p"], "training": b["train"]})


def _cast(node: fx.Node) -> OpView | None:
    # x.to(dtype) / x.float() / x.type_as(y) / aten._to_copy(x, dtype=...): the dtype is read off
    # the result, which also rejects `x.type()` (returns a string) and device moves.
    v, x = val_of(node), node.args[0] if node.args else node.kwargs.get("input")
    xv = val_of(x)
    if not (isinstance(v, torch.Tensor) and isinstance(xv, torch.Tensor)) or v.device != xv.device:
        return None
    return OpView("cast", (x,), {"dtype": v.dtype})


def _unary(kind: str) -> Callable[[fx.Node], OpView | None]:
    def norm(node: fx.Node) -> OpView | None:
        x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
        return OpView(kind, (x,))
    return norm


def _sized(kind: str) -> Callable[[fx.Node], OpView | None]:
    def norm(node: fx.Node) -> OpView | None:
        if node.op == "call_method":
            return OpView(kind, (node.args[0],), {"sizes": _varargs(node, "size")})
        b = _bind(node, ("input", "sizes"))
        return OpView(kind, (b["input"],), {"sizes": tuple(b.get("sizes", b.get("shape", ())))})
    return norm


def _unsqueeze(node: fx.Node) -> OpView | None:
    b = _bind(node, ("input", "dim"))
    return OpView("unsqueeze", (b["input"],), {"dim": b["dim"]})


_FULL = slice(None, None, None)


def _getitem(node: fx.Node) -> OpView | None:
    # x[:, :, None, :, :] (HF repeat_kv) is an unsqueeze; other indexing is not a kind.
    x, idx = node.args
    if not isinstance(val_of(x), torch.Tensor) or not isinstance(idx, tuple):
        return None
    if idx.count(None) != 1 or Ellipsis in idx or any(i is not None and i != _FULL for i in idx):
        return None
    return OpView("unsqueeze", (x,), {"dim": idx.index(None)})


def _sdpa(node: fx.Node) -> OpView | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    b = _bind(node, names, defaults)
    params = {n: b[n] for n in names[3:]}
    return OpView("sdpa", (b["query"], b["key"], b["value"]), params)


def _repeat_interleave(node: fx.Node) -> OpView | None:
    b = _bind(node, ("input", "repeats", "dim", "output_size"), {"dim": None})
    return OpView("repeat_interleave", (b["input"],), {"repeats": b.get("repeats"), "dim": b["dim"]})


def _full(node: fx.Node) -> OpView | None:
    b = _bind(node, ("size", "fill_value"))
    return OpView("full", (), {"size": tuple(b["size"]), "value": b["fill_value"]})


def _scalar_tensor(node: fx.Node) -> OpView | None:
    # torch.tensor(0.125) as recorded by Dynamo; aten.scalar_tensor(0.125)
    data = node.args[0] if node.args else node.kwargs.get("data", node.kwargs.get("s"))
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return OpView("full", (), {"size": (), "value": data})
    return None


_FUNCTIONS: dict[object, Callable[[fx.Node], OpView | None]] = {
    torch.matmul: _matmul("matmul"), operator.matmul: _matmul("matmul"), aten.matmul.default: _matmul("matmul"),
    torch.bmm: _matmul("bmm"), aten.bmm.default: _matmul("bmm"),
    torch.baddbmm: _baddbmm, aten.baddbmm.default: _baddbmm, torch.einsum: _einsum, aten.einsum.default: _einsum,
    torch.transpose: _transpose, aten.transpose.int: _transpose, aten.mT.default: _mT, builtins.getattr: _getattr,
    torch.permute: _permute, aten.permute.default: _permute,
    F.softmax: _softmax, torch.softmax: _softmax_2, aten.softmax.int: _softmax_2, aten._softmax.default: _aten_softmax,
    operator.truediv: _binary("div"), torch.div: _binary("div"), torch.true_divide: _binary("div"),
    aten.div.Tensor: _binary("div"), aten.div.Scalar: _binary("div"),
    operator.mul: _binary("mul"), torch.mul: _binary("mul"),
    aten.mul.Tensor: _binary("mul"), aten.mul.Scalar: _binary("mul"),
    operator.add: _binary("add"), torch.add: _binary("add"),
    aten.add.Tensor: _binary("add"), aten.add.Scalar: _binary("add"),
    torch.masked_fill: _masked_fill, aten.masked_fill.Scalar: _masked_fill, aten.masked_fill.Tensor: _masked_fill,
    torch.where: _where, aten.where.self: _where, aten.where.ScalarSelf: _where,
    aten.where.ScalarOther: _where, aten.where.Scalar: _where,
    F.dropout: _dropout, torch.dropout: _dropout_train, aten.dropout.default: _dropout_train,
    aten._to_copy.default: _cast, aten.to.dtype: _cast, aten.to.dtype_layout: _cast, aten.to.other: _cast,
    aten.type_as.default: _cast,
    torch.clone: _unary("contiguous"), aten.clone.default: _unary("contiguous"),
    aten.contiguous.default: _unary("contiguous"),
    aten.expand.default: _sized("expand"),
    torch.reshape: _sized("reshape"), aten.view.default: _sized("reshape"), aten.reshape.default: _sized("reshape"),
    aten._unsafe_view.default: _sized("reshape"), torch.flatten: _flatten, aten.flatten.using_ints: _flatten,
    torch.unsqueeze: _unsqueeze, aten.unsqueeze.default: _unsqueeze, operator.getitem: _getitem,
    F.scaled_dot_product_attention: _sdpa, aten.scaled_dot_product_attention.default: _sdpa,
    torch.repeat_interleave: _repeat_interleave, aten.repeat_interleave.self_int: _repeat_interleave,
    torch.full: _full, aten.full.default: _full,
    torch.tensor: _scalar_tensor, aten.scalar_tensor.default: _scalar_tensor,
}

_METHODS: dict[str, Callable[[fx.Node], OpView | None]] = {
    "matmul": _matmul("matmul"), "__matmul__": _matmul("matmul"), "bmm": _matmul("bmm"), "baddbmm": _baddbmm,
    "transpose": _transpose, "permute": _permute,
    "softmax": _softmax_2,
    "div": _binary("div"), "true_divide": _binary("div"), "__truediv__": _binary("div"),
    "mul": _binary("mul"), "__mul__": _binary("mul"), "add": _binary("add"), "__add__": _binary("add"),
    "masked_fill": _masked_fill, "where": _where,
    "to": _cast, "type": _cast, "type_as": _cast, "float": _cast, "half": _cast, "bfloat16": _cast, "double": _cast,
    "contiguous": _unary("contiguous"), "clone": _unary("contiguous"),
    "expand": _sized("expand"), "view": _sized("reshape"), "reshape": _sized("reshape"), "flatten": _flatten,
    "unsqueeze": _unsqueeze, "repeat_interleave": _repeat_interleave,
}

KINDS = frozenset(
    {"matmul", "bmm", "baddbmm", "einsum", "transpose", "permute", "softmax", "div", "mul", "add", "masked_fill",
     "where", "dropout", "cast", "contiguous", "expand", "reshape", "unsqueeze", "sdpa", "repeat_interleave", "full"}
)

# Assertions torch.export inserts on intermediate values; they are not real uses.
_METADATA_ASSERTS = (aten._assert_tensor_metadata.default,)


def is_metadata_assert(node: fx.Node) -> bool:
    """True for ``aten._assert_tensor_metadata`` nodes (export-time checks, not real uses)."""
    return node.op == "call_function" and node.target in _METADATA_ASSERTS


def is_metadata_read(node: fx.Node) -> bool:
    """True for ``x.dtype`` / ``x.device`` reads (fx traces record them as ``getattr`` nodes).

    They are fixed properties of a captured graph, so they do not keep ``x`` alive: a pass that
    removes ``x`` replaces them with their constant values (:func:`graphtune.rewrites.pattern.dead_code_elimination`).
    """
    return (node.op == "call_function" and node.target is builtins.getattr and len(node.args) == 2
            and node.args[1] in ("dtype", "device"))


def is_metadata_use(node: fx.Node) -> bool:
    """A use of a value that does not read its data (:func:`is_metadata_assert` or :func:`is_metadata_read`)."""
    return is_metadata_assert(node) or is_metadata_read(node)


def _module_view(node: fx.Node) -> OpView | None:
    gm = node.graph.owning_module
    try:
        mod = gm.get_submodule(node.target) if gm is not None else None
    except AttributeError:
        return None
    x = node.args[0] if node.args else None
    if isinstance(mod, torch.nn.Softmax):
        return OpView("softmax", (x,), {"dim": mod.dim, "dtype": None})
    if isinstance(mod, torch.nn.Dropout):
        return OpView("dropout", (x,), {"p": mod.p, "training": mod.training})
    return None


def view(node: object) -> OpView | None:
    """The :class:`OpView` of an fx node, or None if it is not one of graphtune's kinds.

    Examples
    --------
    >>> import torch, torch.fx as fx
    >>> g = fx.symbolic_trace(lambda q, k: torch.matmul(q, k.transpose(-2, -1)))
    >>> [view(n).kind for n in g.graph.nodes if view(n)]
    ['transpose', 'matmul']
    """
    if not isinstance(node, fx.Node):
        return None
    try:
        if node.op == "call_function":
            norm = _FUNCTIONS.get(node.target)
        elif node.op == "call_method":
            norm = _METHODS.get(node.target)
        elif node.op == "call_module":
            norm = _module_view
        else:
            return None
        return norm(node) if norm is not None else None
    except (KeyError, ValueError, TypeError, IndexError):
        return None  # an unusual call signature: not a kind we understand


def kind_of(node: object) -> str | None:
    """Shorthand for ``view(node).kind`` (None when the node has no kind)."""
    v = view(node)
    return v.kind if v is not None else None
