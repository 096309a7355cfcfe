"""Node metadata: every value-producing node of a graphtune IR carries ``node.meta["val"]``.

``val`` is a FakeTensor (or a tuple/list of them, a SymInt, a Python scalar) describing the
node's output: shape (possibly symbolic), dtype and device. Capture fills it in for every node;
a pass that inserts a node fills it in with :func:`set_val`, which runs the node's target on
the inputs' fake values, so metadata stays in sync with the graph (checked by the verifier).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["TensorMeta", "val_of", "tensor_meta", "set_val", "fake_mode_of", "fakeify"]


@dataclass(frozen=True)
class TensorMeta:
    """Shape/dtype/device of a tensor value; ``shape`` entries may be ``torch.SymInt``."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def static_shape(self) -> tuple[int, ...] | None:
        """The shape as plain ints, or None if any dimension is symbolic."""
        return tuple(self.shape) if all(isinstance(s, int) for s in self.shape) else None


def val_of(node_or_value: Any) -> Any:
    """``meta["val"]`` of an fx node (falls back to Dynamo's ``example_value``); constants pass through."""
    if isinstance(node_or_value, fx.Node):
        m = node_or_value.meta
        return m["val"] if "val" in m else m.get("example_value")
    return node_or_value


def tensor_meta(node: fx.Node) -> TensorMeta | None:
    """TensorMeta of a node producing a single tensor, else None."""
    v = val_of(node)
    if isinstance(v, torch.Tensor):
        return TensorMeta(tuple(v.shape), v.dtype, v.device)
    return None


def fake_mode_of(gm_or_vals: Any) -> FakeTensorMode | None:
    """The FakeTensorMode the graph's metadata lives in, if any."""
    if isinstance(gm_or_vals, fx.GraphModule):
        vals = [val_of(n) for n in gm_or_vals.graph.nodes]
    else:
        vals = list(gm_or_vals)
    return _mode_of_values(vals)


def _mode_of_values(values: Any) -> FakeTensorMode | None:
    # The mode of the metadata itself, not the ambient TracingContext's: under Dynamo the backend
    # runs in a fresh fake mode while node metadata still lives in the tracing mode.
    flat, _ = tree_flatten(values)
    for v in flat:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def fakeify(tensors: Any, mode: FakeTensorMode | None = None, dynamic: bool = False) -> tuple[Any, FakeTensorMode]:
    """Fake copies of real tensors (pytree), in ``mode`` or a fresh mode.

    Shapes stay static unless ``dynamic`` (then every dimension becomes a symbol of a ShapeEnv).
    """
    if mode is None:
        mode = FakeTensorMode(shape_env=ShapeEnv() if dynamic else None, allow_non_fake_inputs=True,
                              static_shapes=not dynamic)

    def conv(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            return mode.from_tensor(x)
        return x

    return tree_map(conv, tensors), mode


def set_val(node: fx.Node, mode: FakeTensorMode | None = None) -> Any:
    """Compute and store ``node.meta["val"]`` from the fake values of its inputs.

    Works for call_function nodes (any torch op, including graphtune's custom ops, whose fake
    implementations are registered) and call_method nodes.
    """
    def arg_val(a: Any) -> Any:
        return val_of(a) if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, arg_val)
    kwargs = fx.node.map_aggregate(node.kwargs, arg_val)
    if mode is None:
        mode = _mode_of_values((args, kwargs))
    if mode is None:
        raise RuntimeError(f"set_val({node.name}): inputs carry no fake values")
    with mode:
        if node.op == "call_function":
            val = node.target(*args, **kwargs)
        elif node.op == "call_method":
            self_, *rest = args
            val = getattr(self_, node.target)(*rest, **kwargs)
        else:
            raise RuntimeError(f"set_val({node.name}): cannot infer metadata of a {node.op} node")
    node.meta["val"] = val
    if "example_value" in node.meta:
        node.meta["example_value"] = val
    return val
