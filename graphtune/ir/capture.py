"""Capture a PyTorch model into graphtune's IR: torch.fx, Dynamo or torch.export.

* ``fx``: ``torch.fx.symbolic_trace`` then fake-tensor propagation on the example inputs.
  Fast and whole-graph, but fails on data-dependent Python control flow.
* ``dynamo``: run the model once under ``torch.compile`` with a collecting backend. Handles any
  Python (graph breaks split the model into several graphs) and carries fake metadata.
* ``export``: ``torch.export.export`` — an ATen-level graph with metadata.

``capture(model, inputs, "auto")`` tries fx and falls back to Dynamo.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphtune.errors import CaptureError
from graphtune.ir.graph import IRGraph
from graphtune.ir.meta import fakeify

__all__ = ["capture", "capture_fx", "capture_dynamo", "capture_export", "normalize_inputs", "CaptureResult"]

log = logging.getLogger("graphtune.capture")


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional args, or a dict of keyword args."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}"
    )


# Values of nodes that compute no tensor but feed computation: ``x.dtype``, ``x.device``, ``x.layout``
# (``x.shape`` / ``x.size()`` are tuples of ints, which FakeTensorProp already records).
_PLAIN_VALUES = (torch.dtype, torch.device, torch.layout, torch.memory_format, str, type(None))


def _plain_value(obj: Any) -> bool:
    if isinstance(obj, (tuple, list)):
        return all(_plain_value(x) for x in obj)
    return isinstance(obj, _PLAIN_VALUES)


class _MetaProp(FakeTensorProp):
    """FakeTensorProp that also records non-tensor values in ``meta["val"]``.

    FakeTensorProp keeps only tensors, SymInts and Python numbers: a ``getattr(q, "dtype")`` node
    (HF's ``softmax(...).to(q.dtype)``) would carry no metadata, and the IR contract (every value
    node has ``meta["val"]``, checked by the verifier) would fail. Other objects stay unrecorded, so
    the verifier still rejects them where they feed computation.
    """

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if "val" not in n.meta and _plain_value(result):
            n.meta["val"] = result
        return result


class CaptureResult(list):
    """The graphs of one capture (Dynamo may produce several, one per graph-break region)."""

    method: str = ""
    graph_breaks: int = 0


def capture_fx(model: torch.nn.Module, example_inputs: Any) -> IRGraph:
    """Symbolically trace ``model`` and annotate every node with fake metadata."""
    args, kwargs = normalize_inputs(example_inputs)
    if kwargs:
        raise CaptureError("fx capture takes positional example inputs only; use capture='dynamo' for keyword inputs")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:
        raise CaptureError(f"torch.fx cannot trace {type(model).__name__}: {e}") from e
    fake_args, mode = fakeify(args)
    try:
        _MetaProp(gm, mode).propagate(*fake_args)
    except Exception as e:
        raise CaptureError(f"shape propagation failed on the fx graph of {type(model).__name__}: {e}") from e
    return IRGraph(gm, "fx", args)


def capture_export(model: torch.nn.Module, example_inputs: Any, dynamic_shapes: Any = None) -> IRGraph:
    """``torch.export`` the model; the graph is ATen-level with ``meta["val"]`` on every node."""
    args, kwargs = normalize_inputs(example_inputs)
    try:
        ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise CaptureError(f"torch.export cannot export {type(model).__name__}: {e}") from e
    gm = ep.module()
    # unlifted modules keep meta["val"] on call nodes; placeholders may miss it, so re-propagate
    fake_args, mode = fakeify(args)
    if not kwargs:
        try:
            _MetaProp(gm, mode).propagate(*fake_args)
        except Exception as e:  # keep export's own metadata
            log.debug("fake propagation on the exported graph failed: %s", e)
    return IRGraph(gm, "export", args)


def capture_dynamo(model: Any, example_inputs: Any, dynamic: bool | None = None) -> CaptureResult:
    """Run ``model`` once under Dynamo and collect every graph it produces (several if it breaks)."""
    import torch._dynamo as dynamo

    args, kwargs = normalize_inputs(example_inputs)
    graphs = CaptureResult()
    graphs.method = "dynamo"

    def collect(gm: fx.GraphModule, inputs: Sequence[Any]) -> Any:
        graphs.append(IRGraph(gm, "dynamo", list(inputs)))
        return gm.forward

    fn = model.forward if isinstance(model, torch.nn.Module) else model
    compiled = torch.compile(fn, backend=collect, dynamic=dynamic)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    except Exception as e:
        raise CaptureError(f"running {type(model).__name__} under Dynamo failed: {e}") from e
    finally:
        dynamo.reset()  # the collecting backend must not stay attached to the model's code
    graphs.graph_breaks = max(0, len(graphs) - 1)
    return graphs


def capture(model: Any, example_inputs: Any, method: str = "auto") -> CaptureResult:
    """Capture ``model`` with ``method`` ("auto", "fx", "dynamo", "export") into IR graphs."""
    result = CaptureResult()
    if method in ("fx", "auto"):
        try:
            result.append(capture_fx(model, example_inputs))
            result.method = "fx"
            return result
        except CaptureError as e:
            if method == "fx":
                raise
            log.info("fx capture failed, using Dynamo: %s", e)
    if method == "export":
        result.append(capture_export(model, example_inputs))
        result.method = "export"
        return result
    if method in ("dynamo", "auto"):
        return capture_dynamo(model, example_inputs)
    raise CaptureError(f"unknown capture method {method!r}")
