"""Tiny capture helpers for the rewrite tests, independent of graphtune's own capture module.

``capture(model, inputs, how)`` returns ``(gm, run_inputs)`` with ``meta["val"]`` on every node
for the three vocabularies the pass must understand: ``"fx"`` (symbolic_trace +
FakeTensorProp), ``"dynamo"`` (the graph Dynamo hands a backend; its inputs may include lifted
parameters) and ``"export"`` (``torch.export(...).module()``, ATen ops, + FakeTensorProp).
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphtune.ir.meta import fakeify
from graphtune.ir import ops as gt_ops
from graphtune.rewrites import run_pipeline, validate_rewrite

CAPTURES = ("fx", "dynamo", "export")


def _propagate(gm: fx.GraphModule, inputs: tuple) -> None:
    fake, mode = fakeify(tuple(inputs))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake)


def _capture(model: torch.nn.Module, inputs: tuple, how: str) -> tuple[fx.GraphModule, tuple]:
    model = model.eval()
    if how == "fx":
        gm = fx.symbolic_trace(model)
        _propagate(gm, inputs)
        return gm, tuple(inputs)
    if how == "export":
        gm = torch.export.export(model, tuple(inputs)).module()
        _propagate(gm, inputs)
        return gm, tuple(inputs)
    if how == "dynamo":
        seen: list = []

        def collect(gm: fx.GraphModule, example_inputs: list) -> object:
            seen.append((gm, tuple(example_inputs)))
            return gm.forward

        torch._dynamo.reset()
        torch.compile(model, backend=collect, fullgraph=True, dynamic=False)(*inputs)
        assert len(seen) == 1, f"expected one Dynamo graph, got {len(seen)}"
        return seen[0]
    raise ValueError(how)


def _clone(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy of the graph (node metadata shared), to compare against after rewriting."""
    g = fx.Graph()
    g._codegen = gm.graph._codegen  # export graphs flatten/unflatten their pytree inputs/outputs
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g)


def _attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is gt_ops.attention.default]


def _rewrite_and_check(model: torch.nn.Module, inputs: tuple, how: str, expected: int,
                       rtol: float = 1e-5, atol: float = 1e-5):
    """Capture, run the pipeline, assert the match count and numerics vs the original graph."""
    gm, run_inputs = _capture(model, inputs, how)
    original = _clone(gm)
    res = run_pipeline(gm, verify=_verify_meta)
    assert res.count("canonicalize_attention") == expected, gm.code
    assert len(_attention_nodes(gm)) == expected
    assert len(res.sites) == expected
    validate_rewrite(original, gm, run_inputs, rtol=rtol, atol=atol)
    with torch.no_grad():
        eager = model(*inputs)
        got = gm(*run_inputs)
    eager = eager if isinstance(eager, (tuple, list)) else (eager,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    for e, g in zip(eager, got):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, equal_nan=True)
    return gm, res


def _verify_meta(gm: fx.GraphModule) -> None:
    # Stand-in for the IR verifier: every graphtune node's metadata matches its fake implementation.
    for n in _attention_nodes(gm):
        q = n.args[0].meta.get("val", n.args[0].meta.get("example_value"))
        val = n.meta["val"]
        assert val.shape[:-1] == q.shape[:-1] and val.dtype == q.dtype, n.format_node()


@pytest.fixture
def capture():
    return _capture


@pytest.fixture
def rewrite_and_check():
    return _rewrite_and_check


@pytest.fixture
def clone_gm():
    return _clone
