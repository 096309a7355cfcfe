"""validate_rewrite: silent when graphs agree, loud and specific when a rewrite is wrong."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.errors import TranslationValidationError
from graphtune.ir import ops as gt_ops
from graphtune.rewrites import Pat, PatternMatcher, Rule, run_pipeline, validate_rewrite


class TwoOutputs(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * 0.25
        return q.sum(), torch.matmul(torch.softmax(s, dim=-1), v)


def _wrong_scale(m, sdpa_like, q, k, v, c):
    # deliberately wrong: drops the 0.25 scale (SDPA's default 1/sqrt(E) = 0.3536 instead)
    return m.call(gt_ops.attention.default, q, k, v)


_WRONG = PatternMatcher([Rule(
    Pat("matmul", Pat("softmax", Pat("mul", Pat("matmul", Pat.var("q"), Pat("transpose", Pat.var("k"))), Pat.var("c"))),
        Pat.var("v"), name="sdpa_like"),
    _wrong_scale)])


def _inputs():
    return tuple(torch.randn(2, 3, 5, 8) for _ in range(3))


def test_a_deliberately_wrong_rewrite_is_caught_naming_the_output(capture, clone_gm):
    gm, args = capture(TwoOutputs(), _inputs(), "fx")
    original = clone_gm(gm)
    assert _WRONG.apply(gm) == 1
    with pytest.raises(TranslationValidationError, match=r"output 1 \(attention_default\): max abs difference"):
        validate_rewrite(original, gm, args, rtol=1e-5, atol=1e-5)


def test_the_real_pass_validates_on_the_same_graph(capture, clone_gm):
    gm, args = capture(TwoOutputs(), _inputs(), "fx")
    original = clone_gm(gm)
    assert run_pipeline(gm).count("canonicalize_attention") == 1
    validate_rewrite(original, gm, args, rtol=1e-5, atol=1e-5)


def test_dtype_and_structure_mismatches_are_reported(capture, clone_gm):
    class Relu(nn.Module):
        def forward(self, x):
            return F.relu(x)

    x = torch.randn(4)
    a, _ = capture(Relu(), (x,), "fx")
    b = clone_gm(a)
    out = next(n for n in b.graph.nodes if n.op == "output")
    with b.graph.inserting_before(out):
        half = b.graph.call_function(torch.ops.aten._to_copy.default, (out.args[0],), {"dtype": torch.float16})
    out.args = (half,)
    b.recompile()
    dtype_msg = r"original is torch.float32\[4\], rewritten is torch.float16\[4\]"
    with pytest.raises(TranslationValidationError, match=dtype_msg):
        validate_rewrite(a, b, (x,), rtol=1e-5, atol=1e-5)
    out.args = ((half, half),)
    b.recompile()
    with pytest.raises(TranslationValidationError, match="returns"):
        validate_rewrite(a, b, (x,), rtol=1e-5, atol=1e-5)


def test_nan_in_both_outputs_counts_as_equal(capture, clone_gm):
    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x)

    x = torch.tensor([-1.0, 2.0])
    a, _ = capture(Log(), (x,), "fx")
    validate_rewrite(a, clone_gm(a), (x,), rtol=0.0, atol=0.0)
