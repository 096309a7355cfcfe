"""The one torch LSE merge (graphtune.ir.reference.merge_lse / merge_states_ref) and the one mask
normalizer (additive_mask), against float64 oracles; and that every torch merge path uses them."""
import pytest
import torch

from graphtune.codegen.registry import KernelConfig
from graphtune.ir.reference import additive_mask, causal_mask, merge_lse, merge_states_ref

NEG = float("-inf")
# (atol, rtol) of a merge's out against the float64 oracle; its fp32 LSE must be within 1e-5
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _oracle(outs, lses):
    # float64: sum_i exp(lse_i) out_i / sum_i exp(lse_i); rows with no key anywhere: 0, -inf
    lse = torch.stack([x.double() for x in lses])
    o = torch.stack([x.double() for x in outs])
    total = torch.logsumexp(lse, 0)
    w = torch.exp(lse - total).nan_to_num(0.0)
    return (w[..., None] * o).sum(0), total


def _partials(n, shape=(2, 3, 5), d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(*shape, d, generator=g).to(dtype) for _ in range(n)]
    lses = [torch.randn(*shape, generator=g) * 4 for _ in range(n)]
    return outs, lses


def _check(got, want, dtype):
    atol, rtol = TOL[dtype]
    out, lse = got
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want[0], atol=atol, rtol=rtol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want[1]))
    fin = torch.isfinite(want[1])
    torch.testing.assert_close(lse.double()[fin], want[1][fin], atol=1e-5, rtol=1e-6)


def _merge_impls():
    from graphtune.codegen.merge_states.cpu import merge_states_torch

    return {
        "merge_states_ref": merge_states_ref,
        "merge_lse": lambda outs, lses: tuple(x.to(t.dtype) for x, t in zip(
            merge_lse(torch.stack(outs, 1), torch.stack(lses, 1), 1), (outs[0], lses[0]))),
        "op": lambda outs, lses: torch.ops.graphtune.merge_states(outs, lses),
        "cpu.torch STACKED=1": lambda o, l: merge_states_torch(o, l, config=KernelConfig.make(STACKED=1)),
        "cpu.torch STACKED=0": lambda o, l: merge_states_torch(o, l, config=KernelConfig.make(STACKED=0)),
    }


@pytest.mark.parametrize("name", list(_merge_impls()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_merge_matches_float64_with_empty_partials_and_rows(name, dtype, n):
    outs, lses = _partials(n, dtype=dtype, seed=n)
    lses[0][0, 0, 0] = NEG  # partial 0 has no key in this row
    for l in lses:  # row (1, 2, 4) has no key in any partial
        l[1, 2, 4] = NEG
    outs[-1][1, 2, 4] = 7.0  # whatever an empty partial left there does not leak into the result
    got = _merge_impls()[name](outs, lses)
    _check(got, _oracle(outs, lses), dtype)
    assert torch.isneginf(got[1][1, 2, 4]) and bool((got[0][1, 2, 4] == 0).all())


@pytest.mark.parametrize("name", list(_merge_impls()))
def test_every_partial_empty(name):
    outs, lses = _partials(3)
    lses = [torch.full_like(l, NEG) for l in lses]
    out, lse = _merge_impls()[name](outs, lses)
    assert bool(torch.isneginf(lse).all()) and bool((out == 0).all())


def test_an_empty_partial_changes_nothing_and_the_spread_may_be_huge():
    outs, lses = _partials(3)
    empty = [outs[1], torch.full_like(lses[1], NEG)]
    a = merge_states_ref([outs[0], empty[0], outs[2]], [lses[0], empty[1], lses[2]])
    b = merge_states_ref([outs[0], outs[2]], [lses[0], lses[2]])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # 500 nats apart: the larger partial alone, no overflow, no nan
    out, lse = merge_states_ref([outs[0], outs[1]], [lses[0] + 500.0, lses[1]])
    torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, lses[0] + 500.0)


def test_one_partial_gives_new_tensors():
    outs, lses = _partials(1)
    lses[0][0, 0, 0] = NEG
    out, lse = merge_states_ref(outs, lses)
    assert out.data_ptr() != outs[0].data_ptr() and lse.data_ptr() != lses[0].data_ptr()
    assert bool((out[0, 0, 0] == 0).all()) and bool((outs[0][0, 0, 0] != 0).any())  # the input is left alone
    o2, l2 = merge_lse(outs[0][None], lses[0][None])
    assert o2.data_ptr() != outs[0].data_ptr() and l2.data_ptr() != lses[0].data_ptr()


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_merge_lse_along_any_dim_equals_the_list_merge(dim):
    outs, lses = _partials(4, shape=(3, 2, 5))
    want = merge_states_ref(outs, lses)
    got = merge_lse(torch.stack(outs, dim), torch.stack(lses, dim), dim)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_split_attention_merges_back_to_the_whole():
    from graphtune.ir.ops import attention_cpu

    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 50, 16), torch.randn(2, 4, 50, 16)
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, :20] = False  # query 1 sees nothing of the first chunk
    parts = [attention_cpu(q, k[:, :, a:b], v[:, :, a:b], mask[:, a:b]) for a, b in ((0, 20), (20, 33), (33, 50))]
    out, lse = merge_states_ref([p[0] for p in parts], [p[1] for p in parts])
    want_o, want_l = attention_cpu(q, k, v, mask)
    torch.testing.assert_close(out, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_l, atol=1e-5, rtol=1e-5)


# -- the one mask normalizer ----------------------------------------------------------------

def test_additive_mask_converts_bool_keeps_float_and_adds_causality():
    b = torch.tensor([[True, False, True], [False, True, True]])
    got = additive_mask(b, False, 2, 3, torch.float16)
    assert got.dtype == torch.float16 and torch.equal(torch.isneginf(got), ~b) and bool((got[b] == 0).all())
    f = torch.randn(2, 3)
    assert additive_mask(f, False, 2, 3, torch.float16) is f  # already additive: kept, dtype too
    assert additive_mask(None, False, 2, 3, torch.float32) is None
    c = additive_mask(None, True, 2, 3, torch.float32)
    assert torch.equal(torch.isneginf(c), ~causal_mask(2, 3))
    both = additive_mask(b, True, 2, 3, torch.float32, rank=4)
    assert both.shape == (1, 1, 2, 3)
    assert torch.equal(torch.isneginf(both[0, 0]), ~(b & causal_mask(2, 3)))
    # a float mask plus causality: the mask's values where causality allows
    fc = additive_mask(f, True, 2, 3, torch.float32)
    allowed = causal_mask(2, 3)
    assert torch.equal(fc[allowed], f[allowed]) and bool(torch.isneginf(fc[~allowed]).all())


def test_additive_mask_matches_sdpa():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    m = torch.rand(2, 1, 4, 6) > 0.3
    m[..., 0] = True
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(m, False, 4, 6, q.dtype))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask(None, True, 4, 6, q.dtype))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_the_torch_merges_and_mask_conversions_have_one_implementation():
    # every torch merge path calls merge_lse; no second copy of the numerics or the mask conversion
    import inspect

    from graphtune.codegen.attention import cpu as attn_cpu
    from graphtune.codegen.lean_decode import cpu as lean_cpu
    from graphtune.codegen.merge_states import cpu as merge_cpu
    from graphtune.codegen.shared_prefix import decompose
    from graphtune.ir import ops

    for mod in (attn_cpu, lean_cpu, merge_cpu, decompose, ops):
        src = inspect.getsource(mod)
        dups = ("logaddexp", "logsumexp", "_merge_dim", "_merge_cpu", "masked_fill_(~mask")
        assert not any(w in src for w in dups), mod
