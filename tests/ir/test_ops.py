"""Canonical ops vs SDPA / the fp32 reference, bad inputs, and merge_states exactness."""
import pytest
import torch
import torch.nn.functional as F

import graphtune  # noqa: F401
from graphtune.errors import ShapeError
from graphtune.ir.reference import attention_ref, merge_states_ref

# (dtype, atol, rtol): fp32 must equal SDPA within 1e-5; half types within their rounding.
TOLS = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}

SHAPES = [  # B, Hq, Hkv, L, S, D
    (1, 1, 1, 1, 1, 16),
    (2, 4, 4, 17, 17, 64),
    (3, 8, 2, 1, 129, 64),
    (1, 6, 3, 5, 33, 128),
    (2, 2, 1, 129, 7, 32),
]


def _mask(kind, B, L, S, dtype):
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, 1, L, S) > 0.3
        m[..., 0] = True  # keep every row attending to something (SDPA gives NaN otherwise)
        return m
    return torch.randn(B, 1, L, S, dtype=dtype)


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask,causal", [(None, False), (None, True), ("bool", False), ("float", False)])
def test_attention_equals_sdpa(dtype, shape, mask, causal):
    B, Hq, Hkv, L, S, D = shape
    q = torch.randn(B, Hq, L, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, S, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype)
    m = _mask(mask, B, L, S, dtype)
    gqa = Hq != Hkv
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa)
    out = torch.ops.graphtune.attention(q, k, v, m, causal, None, gqa)
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("scale", [None, 0.05, 1.0])
def test_attention_with_lse_matches_fp32_reference(scale):
    q, k, v = torch.randn(2, 4, 9, 64), torch.randn(2, 2, 21, 64), torch.randn(2, 2, 21, 64)
    out, lse = torch.ops.graphtune.attention_with_lse(q, k, v, None, False, scale, True)
    ro, rl = attention_ref(q, k, v, None, False, scale, True)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 9)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)


def test_attention_accepts_3d_inputs_like_sdpa():
    q, k, v = torch.randn(6, 5, 16), torch.randn(6, 9, 16), torch.randn(6, 9, 16)
    torch.testing.assert_close(torch.ops.graphtune.attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_attention_different_value_head_dim_uses_reference():
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 24)
    torch.testing.assert_close(torch.ops.graphtune.attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args,match", [
    (((1, 2, 5, 16), (1, 2, 7, 8), (1, 2, 7, 8)), "head dim 16 != k head dim 8"),
    (((1, 2, 5, 16), (1, 2, 7, 16), (1, 2, 6, 16)), "k has 7 keys but v has 6"),
    (((1, 4, 5, 16), (1, 2, 7, 16), (1, 2, 7, 16)), "enable_gqa=True"),
    (((1, 2, 5, 16), (2, 7, 16), (2, 7, 16)), "same rank"),
])
def test_bad_shapes_raise_shape_error_naming_the_problem(args, match):
    q, k, v = (torch.randn(*s) for s in args)
    with pytest.raises(ShapeError, match=match):
        torch.ops.graphtune.attention(q, k, v)


def test_gqa_with_non_divisible_heads_is_rejected():
    q, k = torch.randn(1, 5, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ShapeError, match="not a multiple of"):
        torch.ops.graphtune.attention(q, k, k, None, False, None, True)


def test_mask_of_wrong_dtype_is_rejected():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ShapeError, match="attn_mask dtype"):
        torch.ops.graphtune.attention(q, q, q, torch.zeros(1, 1, 3, 3, dtype=torch.float64))


def test_merge_states_of_a_split_equals_unsplit_attention():
    q, k, v = torch.randn(2, 4, 3, 32), torch.randn(2, 4, 50, 32), torch.randn(2, 4, 50, 32)
    parts = [torch.ops.graphtune.attention_with_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in [(0, 7), (7, 31), (31, 50)]]
    out, lse = torch.ops.graphtune.merge_states([p[0] for p in parts], [p[1] for p in parts])
    ro, rl = attention_ref(q, k, v)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)


def test_merge_states_handles_empty_partials_and_empty_rows():
    o = torch.randn(2, 3, 8)
    lse = torch.randn(2, 3)
    empty_lse = torch.full((2, 3), float("-inf"))
    out, l2 = torch.ops.graphtune.merge_states([o, torch.zeros_like(o)], [lse, empty_lse])
    torch.testing.assert_close(out, o) and torch.testing.assert_close(l2, lse)
    out, l2 = torch.ops.graphtune.merge_states([o, o], [empty_lse, empty_lse])
    assert torch.all(out == 0) and torch.all(torch.isneginf(l2))


def test_merge_states_rejects_mismatched_partials():
    with pytest.raises(ShapeError, match="as many outs as lses"):
        torch.ops.graphtune.merge_states([torch.zeros(2, 3, 8)], [])
    with pytest.raises(ShapeError, match="partial 1"):
        torch.ops.graphtune.merge_states([torch.zeros(2, 3, 8), torch.zeros(2, 4, 8)], [torch.zeros(2, 3), torch.zeros(2, 4)])


def test_reference_merge_matches_op():
    outs = [torch.randn(3, 5, 4) for _ in range(3)]
    lses = [torch.randn(3, 5) for _ in range(3)]
    a = torch.ops.graphtune.merge_states(outs, lses)
    b = merge_states_ref(outs, lses)
    torch.testing.assert_close(a[0], b[0]) and torch.testing.assert_close(a[1], b[1])


def test_ops_are_opaque_to_dynamo_with_fake_shapes():
    seen = []

    def backend(gm, inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    f = torch.compile(lambda q, k, v: torch.ops.graphtune.attention(q, k, v, None, True), backend=backend, dynamic=True)
    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(f(q, q, q), F.scaled_dot_product_attention(q, q, q, is_causal=True), atol=1e-6, rtol=0)
    assert torch.ops.graphtune.attention.default in seen or torch.ops.graphtune.attention in seen


def test_fully_masked_rows_give_zero_output_and_neg_inf_lse():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 1, :] = False  # query row 1 sees no key
    out, lse = torch.ops.graphtune.attention_with_lse(q, k, v, mask)
    ro, rl = attention_ref(q, k, v, mask)
    assert torch.all(torch.isneginf(lse[..., 1])) and torch.all(out[..., 1, :] == 0)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)
