"""graphtune's IR: an FX graph with per-node shape/dtype/device metadata, typed views of the
ops graphtune cares about, a verifier, a readable printer and a networkx view.

The IR deliberately stays an ``fx.GraphModule`` underneath: every capture path (torch.fx,
Dynamo, torch.export) produces one, Inductor consumes one, and passes can use the whole FX
toolbox. What graphtune adds is the contract, checked by :meth:`IRGraph.verify`:

* every value node has ``meta["val"]`` (a FakeTensor / SymInt / constant), and
* the metadata of graphtune's own ops agrees with what their fake implementations compute
  from their inputs' metadata (so a pass that rewires inputs must refresh metadata).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import networkx as nx
import torch
import torch.fx as fx

from graphtune.errors import VerificationError
from graphtune.ir import ops as gt_ops
from graphtune.ir.meta import TensorMeta, fake_mode_of, tensor_meta, val_of
from graphtune.ir.sizes import shape_compat

__all__ = ["IRGraph", "AttentionView", "verify", "format_graph"]

_GRAPHTUNE_NS = "graphtune"


def _is_graphtune_op(node: fx.Node) -> bool:
    t = node.target
    return node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == _GRAPHTUNE_NS


@dataclass(frozen=True)
class AttentionView:
    """Typed view of a ``graphtune.attention`` / ``attention_with_lse`` node."""

    node: fx.Node

    def _arg(self, i: int, name: str, default: Any) -> Any:
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    q = property(lambda self: self._arg(0, "q", None))
    k = property(lambda self: self._arg(1, "k", None))
    v = property(lambda self: self._arg(2, "v", None))
    attn_mask = property(lambda self: self._arg(3, "attn_mask", None))
    is_causal = property(lambda self: self._arg(4, "is_causal", False))
    scale = property(lambda self: self._arg(5, "scale", None))
    enable_gqa = property(lambda self: self._arg(6, "enable_gqa", False))

    @property
    def q_meta(self) -> TensorMeta | None:
        return tensor_meta(self.q)

    @property
    def k_meta(self) -> TensorMeta | None:
        return tensor_meta(self.k)

    @property
    def module_path(self) -> str:
        stack = self.node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return _clean_module_path(path)


def _clean_module_path(path: str) -> str:
    # Dynamo names modules like "L['self'].model.layers[0].self_attn"; show "model.layers.0.self_attn".
    for prefix in ("L['self'].", "L['self']", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("[", ".").replace("]", "").replace("'", "")


class IRGraph:
    """A captured graph plus its provenance.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The graph; every value node carries ``meta["val"]``.
    source : str
        Capture method that produced it: ``"fx"``, ``"dynamo"`` or ``"export"``.
    example_inputs : sequence, optional
        Real inputs the graph was captured with (used by translation validation).

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> from graphtune.ir.capture import capture_fx
    >>> class M(torch.nn.Module):
    ...     def forward(self, q, k, v):
    ...         return F.scaled_dot_product_attention(q, k, v)
    >>> x = torch.randn(1, 2, 4, 8)
    >>> ir = capture_fx(M(), (x, x, x))
    >>> ir.verify()
    >>> print(ir.format().splitlines()[0])
    q: f32[1, 2, 4, 8] = placeholder
    """

    def __init__(self, gm: fx.GraphModule, source: str, example_inputs: Sequence[Any] | None = None) -> None:
        self.gm = gm
        self.source = source
        self.example_inputs = list(example_inputs) if example_inputs is not None else None

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.gm.graph.nodes)

    def attention_nodes(self) -> list[AttentionView]:
        """Views of every canonical attention op in the graph, in graph order."""
        return [AttentionView(n) for n in self.gm.graph.nodes if n.op == "call_function" and n.target in gt_ops.ATTENTION_OPS]

    def verify(self) -> None:
        verify(self.gm)

    def format(self) -> str:
        return format_graph(self.gm)

    __str__ = format

    def to_networkx(self) -> nx.DiGraph:
        """Dataflow DiGraph: one vertex per node (attributes op, target, meta), an edge per use."""
        g = nx.DiGraph()
        for n in self.gm.graph.nodes:
            g.add_node(n.name, op=n.op, target=_target_name(n), meta=tensor_meta(n))
            for inp in n.all_input_nodes:
                g.add_edge(inp.name, n.name)
        return g


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", repr(t))
    if mod.startswith("torch.nn.functional") or getattr(torch.nn.functional, name, None) is t:
        return f"F.{name}"
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    return name


def _fmt_val(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        dt = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.bool: "b8",
              torch.int64: "i64", torch.int32: "i32"}.get(v.dtype, str(v.dtype).replace("torch.", ""))
        return f"{dt}[{', '.join(str(s) for s in v.shape)}]"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt_val(x) for x in v) + ")"
    if v is None:
        return "none"
    return type(v).__name__


def _fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, float):
        return f"{a:.6g}"
    return repr(a)


def format_graph(gm: fx.GraphModule) -> str:
    """One line per node: ``name: dtype[shape] = target(args, k=v)``."""
    lines = []
    for n in gm.graph.nodes:
        val = _fmt_val(val_of(n)) if n.op != "output" else ""
        if n.op == "placeholder":
            rhs = "placeholder"
        elif n.op == "output":
            lines.append(f"return {_fmt_arg(n.args[0])}")
            continue
        elif n.op == "get_attr":
            rhs = f"get_attr {n.target}"
        else:
            parts = [_fmt_arg(a) for a in n.args] + [f"{k}={_fmt_arg(v)}" for k, v in n.kwargs.items()]
            tgt = f".{n.target}" if n.op == "call_method" else _target_name(n)
            rhs = f"{tgt}({', '.join(parts)})"
        lines.append(f"{n.name}: {val} = {rhs}")
    return "\n".join(lines)


def _same_meta(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        # symbolic dims: only a provable difference is a mismatch
        return a.dtype == b.dtype and a.device == b.device and shape_compat(tuple(a.shape), tuple(b.shape))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    return type(a) is type(b)


def _no_meta(n: fx.Node) -> bool:
    return "val" not in n.meta and "example_value" not in n.meta


def verify(gm: fx.GraphModule) -> None:
    """Check the IR invariants; raise :class:`VerificationError` naming the first broken one."""
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises RuntimeError for structural problems
        raise VerificationError(f"graph structure is broken: {e}") from e
    mode = fake_mode_of(gm)
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        # Side-effect-only nodes need no metadata: export's _guards_fn and logging calls (no users),
        # and context-manager pairs such as Dynamo's _enter_autocast -> _exit_autocast (whose only
        # users are other metadata-less side-effect nodes).
        if _no_meta(n) and not _is_graphtune_op(n) and all(_no_meta(u) and u.op != "output" for u in n.users):
            continue
        if "val" not in n.meta and "example_value" not in n.meta:
            raise VerificationError(f"node {n.name} ({_target_name(n)}) has no metadata (meta['val'])")
        if _is_graphtune_op(n):
            _verify_graphtune_node(n, mode)


def _verify_graphtune_node(n: fx.Node, mode: Any) -> None:
    args = fx.node.map_aggregate(n.args, lambda a: val_of(a) if isinstance(a, fx.Node) else a)
    kwargs = fx.node.map_aggregate(n.kwargs, lambda a: val_of(a) if isinstance(a, fx.Node) else a)
    if n.target in gt_ops.ATTENTION_OPS:
        for name, a in zip("qkv", n.args[:3]):
            if not isinstance(val_of(a), torch.Tensor):
                raise VerificationError(f"{n.name}: attention input {name} ({_fmt_arg(a)}) is not a tensor")
    if mode is None:
        return
    try:
        with mode:
            expect = n.target(*args, **kwargs)
    except Exception as e:
        raise VerificationError(f"{n.name} ({_target_name(n)}): inputs are invalid for the op: {e}") from e
    if not _same_meta(expect, val_of(n)):
        raise VerificationError(
            f"{n.name} ({_target_name(n)}): metadata {_fmt_val(val_of(n))} out of sync with its inputs "
            f"(expected {_fmt_val(expect)})"
        )
