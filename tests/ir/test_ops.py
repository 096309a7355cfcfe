"""Canonical ops vs SDPA / the fp32 reference, bad inputs, and merge_states exactness."""
import pytest
import torch
import torch.nn.functional as F

import graphtune  # noqa: F401
from graphtune.errors import DTypeError, ShapeError
from graphtune.ir.ops import attention_cpu
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
    (((16,), (7, 16), (7, 16)), "rank >= 2"),
    (((2, 2, 5, 16), (3, 2, 7, 16), (3, 2, 7, 16)), "broadcast"),
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


def test_ops_under_dynamo_dynamic_shapes_broadcast_and_group_like_sdpa():
    seen = []

    def backend(gm, inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def f(q, k, v, m):
        out, lse = torch.ops.graphtune.attention_with_lse(q, k, v, m, False, None, True)
        return torch.ops.graphtune.attention(q, k, v, m, False, None, True) + out, lse

    g = torch.compile(f, backend=backend, dynamic=True)
    for B, L in ((3, 5), (4, 6)):  # two sizes: the second call runs the dynamic graph
        q, k, v = torch.randn(B, 4, L, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
        m = torch.randn(L, 7)
        out, lse = g(q, k, v, m)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(out, 2 * want, atol=1e-5, rtol=1e-5)
        assert lse.shape == (B, 4, L)
    assert {torch.ops.graphtune.attention_with_lse.default, torch.ops.graphtune.attention_with_lse} & set(seen)


def test_fully_masked_rows_give_zero_output_and_neg_inf_lse():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 1, :] = False  # query row 1 sees no key
    out, lse = torch.ops.graphtune.attention_with_lse(q, k, v, mask)
    ro, rl = attention_ref(q, k, v, mask)
    assert torch.all(torch.isneginf(lse[..., 1])) and torch.all(out[..., 1, :] == 0)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# SDPA broadcasting: batch dims (ranks 3/4, batch 1 vs B on either side), masks, GQA
# ---------------------------------------------------------------------------------------------

_L, _S, _D = 3, 5, 8


def _qkv_cases():
    """(q, k, v shapes, enable_gqa): ranks 3/4 (and 5), batch 1 vs 2 on each side, GQA, MQA by broadcast."""
    L, S, D = _L, _S, _D
    out = []
    for qb in ((), (1,), (2,)):  # q rank 3 ([H, L, D]) or 4 ([B, H, L, D]) with batch 1 or 2
        for kb in ((), (1,), (2,)):
            for hq, hk, gqa in ((2, 2, False), (4, 2, True), (4, 1, False), (1, 2, False), (4, 2, False)):
                out.append(((*qb, hq, L, D), (*kb, hk, S, D), (*kb, hk, S, D), gqa))
    out.append(((2, 2, L, D), (1, 2, S, D), (2, 2, S, D), False))  # k and v batch differ
    out.append(((1, 4, L, D), (2, 2, S, D), (2, 4, S, D), True))  # k and v heads differ (GQA)
    out.append(((3, 2, 2, L, D), (1, 2, 2, S, D), (1, 2, 2, S, D), False))  # rank 5
    out.append(((2, L, D), (3, 1, 2, S, D), (3, 1, 2, S, D), False))  # rank 3 vs rank 5
    out.append(((L, D), (S, D), (S, D), False))  # rank 2
    out.append(((L, D), (2, S, D), (2, S, D), True))  # GQA needs a heads dim: SDPA raises
    return out


_MASKS = [None, (_L, _S), (1, _S), (_L, 1), (2, _L, _S), (1, _L, _S), (2, 1, _L, _S), (1, 2, _L, _S),
          (1, 1, _L, _S), (2, 4, _L, _S), (1, 1, 1, _L, _S), (4, _S), (_S,)]


def _sdpa_or_error(q, k, v, m, causal, gqa):
    try:
        if causal and m is not None:  # SDPA takes both only for some ranks; graphtune always: their conjunction
            m, causal = m & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(), False
        if m is not None and m.dim() == 1:  # SDPA takes [S] for 3-D inputs only; graphtune always (same broadcast)
            m = m[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa)
    except (RuntimeError, IndexError, ValueError):
        return None


def _lse_oracle(q, k, v, m, causal, gqa, out_shape):
    """fp64 log-sum-exp of the scaled, masked scores, broadcast like SDPA, expanded to out[..., :-1]."""
    q, k = q.double(), k.double()
    if gqa and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
    return torch.logsumexp(s, -1).expand(out_shape[:-1])


def _bmask(shape, kind, dtype):
    if shape is None:
        return None
    if kind == "bool":
        m = torch.rand(*shape) > 0.4
        m[..., 0] = True  # no fully masked row: SDPA's math path gives NaN there
        return m
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("qs,ks,vs,gqa", _qkv_cases())
def test_ops_and_reference_broadcast_exactly_like_sdpa(qs, ks, vs, gqa):
    # for each mask shape (bool, float; with and without causal): same shape and values as SDPA, lse
    # equal to an fp64 oracle, or a ShapeError exactly where SDPA raises
    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(vs)
    for ms in _MASKS:
        for kind, causal in (("bool", False), ("float", False), ("bool", True)):
            m = _bmask(ms, kind, torch.float32)
            want = _sdpa_or_error(q, k, v, m, causal, gqa)
            for name, call in (
                ("attention", lambda: torch.ops.graphtune.attention(q, k, v, m, causal, None, gqa)),
                ("attention_with_lse", lambda: torch.ops.graphtune.attention_with_lse(q, k, v, m, causal, None, gqa)),
                ("attention_ref", lambda: attention_ref(q, k, v, m, causal, None, gqa)),
                ("attention_cpu", lambda: attention_cpu(q, k, v, m, causal, None, gqa)),
            ):
                case = f"{name} mask={ms} {kind} causal={causal}"
                if want is None:
                    with pytest.raises(ShapeError):
                        call()
                    continue
                got = call()
                out = got if name == "attention" else got[0]
                assert out.shape == want.shape, case
                torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=case)
                if name != "attention":
                    assert got[1].dtype == torch.float32 and got[1].shape == want.shape[:-1], case
                    oracle = _lse_oracle(q, k, v, m, causal, gqa, want.shape).float()
                    torch.testing.assert_close(got[1], oracle, atol=1e-5, rtol=1e-5, msg=case)


@pytest.mark.parametrize("qs,ks,vs,gqa", _qkv_cases())
def test_fake_implementations_give_sdpa_shapes_or_raise_where_sdpa_raises(qs, ks, vs, gqa):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(vs)
    for ms in _MASKS:
        m = _bmask(ms, "bool", torch.float32)
        want = _sdpa_or_error(q, k, v, m, False, gqa)
        with FakeTensorMode() as mode:
            fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
            fm = None if m is None else mode.from_tensor(m)
            if want is None:
                with pytest.raises(ShapeError):
                    torch.ops.graphtune.attention(fq, fk, fv, fm, False, None, gqa)
                with pytest.raises(ShapeError):
                    torch.ops.graphtune.attention_with_lse(fq, fk, fv, fm, False, None, gqa)
                continue
            out = torch.ops.graphtune.attention(fq, fk, fv, fm, False, None, gqa)
            o2, lse = torch.ops.graphtune.attention_with_lse(fq, fk, fv, fm, False, None, gqa)
        assert out.shape == o2.shape == want.shape and lse.shape == want.shape[:-1], ms
        assert out.dtype == want.dtype and lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", list(TOLS))
def test_attention_with_lse_batch_broadcast_is_deterministic_and_exact(dtype):
    # q batch 2 over a k/v batch of 1 once read out of bounds (NaN or garbage varying per call)
    q, k, v = torch.randn(2, 4, 3, 16, dtype=dtype), torch.randn(1, 2, 7, 16, dtype=dtype), torch.randn(1, 2, 7, 16, dtype=dtype)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    atol, rtol = TOLS[dtype]
    for _ in range(3):
        out, lse = torch.ops.graphtune.attention_with_lse(q, k, v, None, False, None, True)
        torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
        assert torch.isfinite(lse).all() and lse.shape == (2, 4, 3)


def test_fully_masked_rows_from_mask_and_causal_together_give_neg_inf_lse():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    m = torch.tensor([[False, False, True]] * 3)  # with top-left causal, rows 0 and 1 see nothing
    out, lse = torch.ops.graphtune.attention_with_lse(q, k, k, m, True)
    ro, rl = attention_ref(q, k, k, m, True)
    assert torch.isneginf(lse[..., :2]).all() and (out[..., :2, :] == 0).all()
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)


def test_fp32_mask_with_half_queries_is_accepted_like_sdpa():
    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    m = torch.randn(3, 3)
    want = F.scaled_dot_product_attention(q, q, q, attn_mask=m)
    torch.testing.assert_close(torch.ops.graphtune.attention(q, q, q, m), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(torch.ops.graphtune.attention_with_lse(q, q, q, m)[0], want, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# clear errors: integer dtypes, wrong-shaped masks, empty or mixed-dtype merge_states
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["attention", "attention_with_lse"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_inputs_raise_dtype_error(op, dtype):
    q = torch.ones(1, 2, 3, 8, dtype=dtype)
    with pytest.raises(DTypeError, match="floating"):
        getattr(torch.ops.graphtune, op)(q, q, q)


@pytest.mark.parametrize("op", ["attention", "attention_with_lse"])
def test_mixed_input_dtypes_raise_dtype_error(op):
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(DTypeError, match="dtypes differ"):
        getattr(torch.ops.graphtune, op)(q, q.half(), q.half())


@pytest.mark.parametrize("op", ["attention", "attention_with_lse"])
@pytest.mark.parametrize("mshape", [(4, 5), (2, 1, 1, 1, 5), (1, 1, 3, 6), (3, 1, 3, 5), (4,), ()])
def test_wrong_shaped_masks_raise_shape_error(op, mshape):
    q, k = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(ShapeError, match="attn_mask"):
        getattr(torch.ops.graphtune, op)(q, k, k, torch.zeros(mshape))


def test_integer_mask_raises_dtype_error():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(DTypeError, match="attn_mask dtype"):
        torch.ops.graphtune.attention_with_lse(q, q, q, torch.zeros(3, 3, dtype=torch.int64))


def test_merge_states_rejects_empty_and_mixed_dtype_inputs():
    o, l = torch.randn(2, 3, 8), torch.randn(2, 3)
    with pytest.raises(ShapeError, match="as many outs as lses"):
        torch.ops.graphtune.merge_states([], [])
    with pytest.raises(DTypeError, match="dtype"):
        torch.ops.graphtune.merge_states([o, o.half()], [l, l])
    with pytest.raises(DTypeError, match="dtype"):
        torch.ops.graphtune.merge_states([o, o], [l, l.half()])
    with pytest.raises(DTypeError, match="dtype"):
        torch.ops.graphtune.merge_states([o.long(), o.long()], [l, l])


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("fill", ["min", -1e4])
def test_rows_at_a_finite_fill_average_uniformly_like_sdpa(dtype, fill):
    # every key of row 1 at finfo.min: SDPA averages v; exp(scores - lse) in the reference once
    # lost log(#keys) at that magnitude and returned the sum of v instead
    q, k, v = torch.randn(1, 2, 3, 16, dtype=dtype), torch.randn(1, 2, 5, 16, dtype=dtype), torch.randn(1, 2, 5, 16, dtype=dtype)
    m = torch.randn(1, 1, 3, 5, dtype=dtype)
    m[..., 1, :] = torch.finfo(dtype).min if fill == "min" else fill
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    atol, rtol = TOLS[dtype]
    for out in (attention_ref(q, k, v, m)[0], torch.ops.graphtune.attention_with_lse(q, k, v, m)[0],
                torch.ops.graphtune.attention(q, k, v, m)):
        torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    if fill == "min" and dtype != torch.float16:  # fp16's min (-65504) does not swallow the scores
        torch.testing.assert_close(attention_ref(q, k, v, m)[0][..., 1, :], v.float().mean(-2).to(dtype), atol=atol, rtol=rtol)


def test_no_keys_or_no_queries_give_empty_rows_and_empty_outputs():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 0, 8)
    for out, lse in (torch.ops.graphtune.attention_with_lse(q, k, k), attention_ref(q, k, k)):
        assert out.shape == (1, 2, 3, 8) and (out == 0).all() and torch.isneginf(lse).all()
    q0 = torch.randn(1, 2, 0, 8)
    out, lse = torch.ops.graphtune.attention_with_lse(q0, q, q)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


def test_fp64_inputs_give_fp64_output_and_fp32_lse_like_the_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k = torch.randn(2, 2, 3, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    out, lse = torch.ops.graphtune.attention_with_lse(q, k, k)
    with FakeTensorMode() as mode:
        fo, fl = torch.ops.graphtune.attention_with_lse(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(k))
    assert (out.dtype, lse.dtype) == (fo.dtype, fl.dtype) == (torch.float64, torch.float32)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, k), atol=1e-10, rtol=1e-10)
