"""IR: capture paths, metadata, verifier, printer, networkx view."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import graphtune  # noqa: F401  (registers ops)
from graphtune.errors import CaptureError, VerificationError
from graphtune.ir import IRGraph, set_val, verify
from graphtune.ir.capture import capture, capture_dynamo, capture_export, capture_fx, normalize_inputs


class SDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this; Dynamo breaks the graph here
            x = x * 2
        return torch.softmax(x, dim=-1)


def qkv(B=1, H=2, L=5, D=8):
    return tuple(torch.randn(B, H, L, D) for _ in range(3))


def test_capture_fx_annotates_every_node_with_fake_metadata():
    ir = capture_fx(SDPA(), qkv())
    for n in ir.nodes():
        if n.op != "output":
            assert "val" in n.meta, n.name
    out = [n for n in ir.nodes() if n.op == "call_function"][0]
    assert tuple(out.meta["val"].shape) == (1, 2, 5, 8)
    ir.verify()


def test_capture_export_gives_aten_graph_with_metadata():
    ir = capture_export(SDPA(), qkv())
    targets = [n.target for n in ir.nodes() if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    ir.verify()


def test_capture_dynamo_handles_graph_breaks():
    graphs = capture_dynamo(DataDependent(), (torch.randn(3, 4),))
    assert len(graphs) >= 2 and graphs.graph_breaks == len(graphs) - 1
    for ir in graphs:
        ir.verify()


def test_capture_auto_falls_back_from_fx_to_dynamo():
    graphs = capture(DataDependent(), (torch.randn(3, 4),), "auto")
    assert graphs.method == "dynamo"
    with pytest.raises(CaptureError, match="cannot trace"):
        capture(DataDependent(), (torch.randn(3, 4),), "fx")


def test_normalize_inputs_rejects_unknown_container():
    assert normalize_inputs(torch.ones(1))[0][0].shape == (1,)
    assert normalize_inputs({"x": 1}) == ((), {"x": 1})
    with pytest.raises(CaptureError, match="example_inputs"):
        normalize_inputs(42)


def _insert_attention(ir: IRGraph) -> fx.Node:
    q, k, v = [n for n in ir.nodes() if n.op == "placeholder"]
    out = next(n for n in ir.nodes() if n.op == "output")
    with ir.graph.inserting_before(out):
        node = ir.graph.call_function(torch.ops.graphtune.attention.default, (q, k, v), {"is_causal": True})
    set_val(node)
    out.args = (node,)
    ir.graph.eliminate_dead_code()
    ir.gm.recompile()
    return node


def test_verifier_accepts_graphtune_op_with_synced_metadata_and_it_runs():
    ir = capture_fx(SDPA(), qkv())
    _insert_attention(ir)
    ir.verify()
    x = qkv()
    torch.testing.assert_close(ir.gm(*x), F.scaled_dot_product_attention(*x, is_causal=True), atol=1e-6, rtol=0)


def test_verifier_rejects_stale_metadata():
    ir = capture_fx(SDPA(), qkv())
    node = _insert_attention(ir)
    node.meta["val"] = torch.empty(1, 2, 5, 9, device="meta")  # wrong head dim
    with pytest.raises(VerificationError, match="out of sync"):
        ir.verify()


def test_verifier_rejects_missing_metadata():
    ir = capture_fx(SDPA(), qkv())
    node = [n for n in ir.nodes() if n.op == "call_function"][0]
    del node.meta["val"]
    with pytest.raises(VerificationError, match="no metadata"):
        verify(ir.gm)


class AutocastRegion(torch.nn.Module):
    """transformers 4.x rotary embeddings compute inside ``torch.autocast(enabled=False)``."""

    def forward(self, q, k, v):
        with torch.autocast(device_type="cpu", enabled=False):
            q = q.float() * 2
        return F.scaled_dot_product_attention(q, k, v)


def test_verifier_accepts_metadata_less_context_manager_pairs_from_dynamo():
    graphs = capture_dynamo(AutocastRegion(), qkv())
    targets = [getattr(n.target, "__name__", "") for ir in graphs for n in ir.nodes()]
    assert "_enter_autocast" in targets and "_exit_autocast" in targets
    for ir in graphs:
        verify(ir.gm)


def test_verifier_rejects_missing_metadata_on_a_node_feeding_computation():
    ir = capture_fx(SDPA(), qkv())
    node = [n for n in ir.nodes() if n.op == "placeholder"][0]  # q: used by the attention node
    del node.meta["val"]
    with pytest.raises(VerificationError, match="no metadata"):
        verify(ir.gm)


class ReadsTensorAttributes(torch.nn.Module):
    """HF's eager idiom ``softmax(...).to(q.dtype)``, plus device and shape reads (tests/fuzz findings F7)."""

    def forward(self, q, k, v):
        w = torch.matmul(q, k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        p = F.softmax(w, dim=-1).to(q.dtype).to(q.device)
        return torch.matmul(p, v)


def test_capture_fx_records_non_tensor_values_and_the_ir_verifies():
    ir = capture_fx(ReadsTensorAttributes(), qkv())
    attrs = {n.args[1]: n for n in ir.nodes() if n.op == "call_function" and n.target is getattr}
    assert attrs["dtype"].meta["val"] == torch.float32
    assert attrs["device"].meta["val"] == torch.device("cpu")
    assert tuple(attrs["shape"].meta["val"]) == (1, 2, 5, 8)
    ir.verify()


def test_optimize_with_fx_capture_and_spec_accepts_a_dtype_read():
    from graphtune import flags

    q, k, v = qkv()
    with flags.Context(SPEC=True), torch.no_grad():
        fast = graphtune.optimize(ReadsTensorAttributes(), (q, k, v), capture="fx")
        torch.testing.assert_close(fast(q, k, v), ReadsTensorAttributes()(q, k, v), rtol=1e-5, atol=1e-5)


def test_verifier_still_rejects_a_metadata_less_attribute_read_feeding_computation():
    ir = capture_fx(ReadsTensorAttributes(), qkv())
    node = next(n for n in ir.nodes() if n.op == "call_function" and n.target is getattr and n.args[1] == "dtype")
    del node.meta["val"]
    with pytest.raises(VerificationError, match="no metadata"):
        verify(ir.gm)


def test_verifier_rejects_invalid_op_inputs():
    ir = capture_fx(SDPA(), qkv())
    node = _insert_attention(ir)
    q, k, v = node.args[:3]
    node.args = (q, k, v, None, True, None, False)
    k.meta["val"] = torch.empty(1, 3, 5, 8)  # 2 query heads vs 3 kv heads
    with pytest.raises(VerificationError, match="invalid for the op"):
        ir.verify()


def test_printer_and_networkx_view():
    ir = capture_fx(SDPA(), qkv())
    text = ir.format()
    assert "q: f32[1, 2, 5, 8] = placeholder" in text
    assert "F.scaled_dot_product_attention(q, k, v, is_causal=True)" in text
    g = ir.to_networkx()
    sdpa = next(n for n, d in g.nodes(data=True) if d["op"] == "call_function")
    assert set(g.predecessors(sdpa)) == {"q", "k", "v"}
