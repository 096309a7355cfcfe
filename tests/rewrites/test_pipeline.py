"""run_pipeline: reports, verifier hook, sites with module paths, logging, dynamic shapes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune import flags
from graphtune.rewrites import PassContext, run_pipeline
from graphtune.flags import Options


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class Attn(nn.Module):
    def forward(self, q, k, v, mask):
        s = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * 0.3 + mask
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, repeat_kv(v, 2))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Attn(), Attn()])

    def forward(self, q, k, v, mask):
        for layer in self.layers:
            q = layer(q, k, v, mask)
        return q


def _inputs(l=5):
    return (torch.randn(2, 4, l, 8), torch.randn(2, 2, l, 8), torch.randn(2, 2, l, 8),
            torch.triu(torch.full((l, l), float("-inf")), 1))


@pytest.mark.parametrize("how", ["dynamo", "export"])
def test_sites_carry_module_paths_and_counts_equal_layers(rewrite_and_check, how):
    gm, res = rewrite_and_check(TwoLayers(), _inputs(), how, expected=2)
    assert [s.module_path for s in res.sites] == ["layers.0", "layers.1"]
    assert [p.name for p in res.passes] == ["canonicalize_attention"]
    assert all(s.impl == "graphtune.attention" for s in res.sites)


def test_verify_runs_after_every_pass_on_the_rewritten_graph(capture):
    gm, _ = capture(TwoLayers(), _inputs(), "fx")
    seen = []
    res = run_pipeline(gm, Options(), verify=seen.append)
    assert seen == [gm] * len(res.passes)


def test_count_of_an_unknown_pass_names_the_passes_that_ran(capture):
    gm, _ = capture(TwoLayers(), _inputs(), "fx")
    res = run_pipeline(gm)
    with pytest.raises(KeyError, match="canonicalize_attention"):
        res.count("no_such_pass")


class NoAttention(nn.Module):
    def forward(self, x, w):
        return torch.softmax(x @ w, dim=-1).relu()


def test_a_model_without_attention_comes_back_unchanged(capture):
    gm, _ = capture(NoAttention(), (torch.randn(3, 4), torch.randn(4, 4)), "fx")
    before = gm.code
    res = run_pipeline(gm)
    assert res.count("canonicalize_attention") == 0 and res.sites == [] and gm.code == before


def test_debug_flag_logs_each_pass_with_its_match_count(capture, capsys):
    gm, _ = capture(TwoLayers(), _inputs(), "fx")
    with flags.Context(DEBUG=1):
        run_pipeline(gm)
    assert "[graphtune] pass canonicalize_attention: 2 matches" in capsys.readouterr().err


def _count_matches(gm, ctx):
    return 7


def test_a_pass_is_a_function_or_a_matcher_and_can_be_disabled(capture):
    gm, _ = capture(NoAttention(), (torch.randn(3, 4), torch.randn(4, 4)), "fx")
    ctx = PassContext(gm, Options())
    assert ctx.run("fn_pass", _count_matches) == 7
    assert ctx.run("off_pass", _count_matches, enabled=False) == 0
    assert [(p.name, p.matches) for p in ctx.passes] == [("fn_pass", 7), ("off_pass", 0)]


def test_dynamo_dynamic_shapes_rewrite_once_and_serve_every_length():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(run_pipeline(gm))
        return gm.forward

    model = TwoLayers().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for l in (5, 9, 3):
            args = _inputs(l)
            torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1 and graphs[0].count("canonicalize_attention") == 2
    assert all(s.details["gqa"] == "repeat_kv" for s in graphs[0].sites)
