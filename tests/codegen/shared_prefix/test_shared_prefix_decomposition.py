"""Shared-prefix (Hydragen) decomposition vs attention over each row's concatenated KV."""
import random

import pytest
import torch

from graphtune.codegen.shared_prefix.decompose import (
    Partial,
    Segment,
    merge_partials,
    prefix_attention,
    shared_prefix_attention,
    suffix_attention,
)
from graphtune.errors import PlanError, ShapeError
from graphtune.ir.reference import attention_ref

# (dtype, atol, rtol) of the decomposition vs the fp32 reference over the concatenated cache
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)]


def random_tree(rng, B, levels, Hkv, D, prefix_lens, dtype):
    """Segments of a random sharing tree over shuffled (non-contiguous) rows, and each row's path."""
    segments, paths = [], [[] for _ in range(B)]

    def split(rows, depth):
        if depth == levels or not rows:
            return
        n = prefix_lens[depth] if depth < len(prefix_lens) else rng.choice([0, 1, 17, 40])
        k, v = torch.randn(Hkv, n, D, dtype=dtype), torch.randn(Hkv, n, D, dtype=dtype)
        segments.append(Segment(torch.tensor(rows), k, v))
        for r in rows:
            paths[r].append(len(segments) - 1)
        parts = rng.randint(1, min(3, len(rows)))
        shuffled = rows[:]
        rng.shuffle(shuffled)
        for i in range(parts):
            sub = sorted(shuffled[i::parts])
            if rng.random() < 0.8:  # some subsets stop sharing early
                split(sub, depth + 1)

    split(list(range(B)), 0)
    return segments, paths


def reference(q, segments, paths, sk, sv, lens, causal, gqa):
    """Per row: fp32 reference attention over [its segments..., its suffix], bottom-right causal."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        ks = [segments[s].k for s in paths[b]] + [sk[b, :, : int(lens[b])]]
        vs = [segments[s].v for s in paths[b]] + [sv[b, :, : int(lens[b])]]
        k, v = torch.cat(ks, dim=-2)[None], torch.cat(vs, dim=-2)[None]
        o, l = attention_ref(q[b : b + 1], k, v, is_causal=causal, enable_gqa=gqa, bottom_right=True)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


CASES = [
    # (seed, B, levels, Hkv, G, D, Lq, prefix_lens)
    (0, 1, 1, 2, 1, 16, 1, [17]),  # a single row
    (1, 8, 1, 2, 4, 64, 1, [0]),  # prefix of 0 tokens
    (2, 8, 2, 1, 8, 32, 1, [1, 17]),
    (3, 64, 3, 4, 2, 64, 1, [300, 17, 1]),  # batch 64, 3 levels
    (4, 13, 2, 2, 1, 24, 5, [33, 9]),  # append: 5 queries, causal suffix
    (5, 5, 3, 1, 4, 16, 3, [7, 0, 12]),
    (6, 32, 1, 8, 1, 64, 1, [129]),
    (7, 3, 2, 2, 3, 8, 2, [1, 1]),
]


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("seed,B,levels,Hkv,G,D,Lq,prefix_lens", CASES)
def test_decomposition_matches_concatenated_attention_on_random_trees(
        seed, B, levels, Hkv, G, D, Lq, prefix_lens, dtype, atol, rtol):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    segments, paths = random_tree(rng, B, levels, Hkv, D, prefix_lens, dtype)
    causal = Lq > 1
    lens = torch.tensor([rng.randint(Lq if causal else 0, 20) for _ in range(B)])  # ragged, may be empty
    Ls = int(lens.max()) + rng.randint(0, 3)  # padded buffer longer than needed
    sk, sv = torch.randn(B, Hkv, Ls, D, dtype=dtype), torch.randn(B, Hkv, Ls, D, dtype=dtype)
    q = torch.randn(B, Hkv * G, Lq, D, dtype=dtype)
    out, lse = shared_prefix_attention(q, segments, sk, sv, suffix_lens=lens, is_causal=causal, enable_gqa=G > 1)
    ref_out, ref_lse = reference(q, segments, paths, sk, sv, lens, causal, G > 1)
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=atol * 10, rtol=rtol)


def test_decomposition_with_16k_token_prefix_matches_reference():
    B, Hkv, D = 4, 2, 64
    seg = Segment(torch.arange(B), torch.randn(Hkv, 16384, D), torch.randn(Hkv, 16384, D))
    sk, sv = torch.randn(B, Hkv, 9, D), torch.randn(B, Hkv, 9, D)
    lens = torch.tensor([9, 1, 4, 7])
    q = torch.randn(B, Hkv * 4, 1, D)
    out, lse = shared_prefix_attention(q, [seg], sk, sv, suffix_lens=lens, enable_gqa=True)
    ref_out, ref_lse = reference(q, [seg], [[0]] * B, sk, sv, lens, False, True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


def test_loop_and_padded_suffix_modes_agree_on_ragged_suffixes():
    B, H, D, Lq = 6, 4, 32, 3
    q, sk, sv = torch.randn(B, H, Lq, D), torch.randn(B, H, 11, D), torch.randn(B, H, 11, D)
    lens = torch.tensor([3, 11, 5, 3, 8, 4])
    a = suffix_attention(q, sk, sv, lens, is_causal=True, mode="padded")
    b = suffix_attention(q, sk, sv, lens, is_causal=True, mode="loop")
    torch.testing.assert_close(a.out, b.out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.lse, b.lse, atol=1e-6, rtol=1e-6)


def test_empty_suffix_rows_get_minus_inf_lse_and_zero_output():
    q, sk, sv = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)
    p = suffix_attention(q, sk, sv, torch.tensor([0, 4, 0]))
    assert torch.isneginf(p.lse[[0, 2]]).all() and torch.isfinite(p.lse[1]).all()
    assert (p.out[[0, 2]] == 0).all()


def test_fully_masked_segment_contributes_nothing():
    q = torch.randn(2, 2, 1, 8)
    seg = Segment(torch.tensor([0, 1]), torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.zeros(5, dtype=torch.bool))
    p = prefix_attention(q, seg)
    assert torch.isneginf(p.lse).all() and (p.out == 0).all()


def test_key_mask_on_segment_matches_masked_reference():
    q = torch.randn(3, 4, 1, 16)
    km = torch.tensor([False, False, True, True, True, False, True])  # e.g. left padding
    seg = Segment(torch.tensor([2, 0]), torch.randn(4, 7, 16), torch.randn(4, 7, 16), km)
    p = prefix_attention(q, seg)
    ref, ref_lse = attention_ref(q[[2, 0]], seg.k[None], seg.v[None], attn_mask=km)
    torch.testing.assert_close(p.out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_merge_scatters_disjoint_groups_into_one_level():
    B = 4
    parts = [Partial(torch.tensor([0, 3]), torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1)),
             Partial(torch.tensor([1]), 2 * torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1))]
    out, lse = merge_partials(B, parts)  # row 2 has no keys at all
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 0.0, 1.0]
    assert torch.isneginf(lse[2]).all() and (lse[[0, 1, 3]] == 0).all()


def test_bad_plans_raise_plan_error_naming_the_problem():
    q, sk, sv = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    kv = torch.randn(2, 4, 8)
    with pytest.raises(PlanError, match="out of range"):
        shared_prefix_attention(q, [Segment(torch.tensor([0, 2]), kv, kv)], sk, sv)
    with pytest.raises(PlanError, match="repeat"):
        shared_prefix_attention(q, [Segment(torch.tensor([1, 1]), kv, kv)], sk, sv)
    with pytest.raises(PlanError, match="exceed"):
        shared_prefix_attention(q, [], sk, sv, suffix_lens=torch.tensor([1, 4]))
    with pytest.raises(PlanError, match="overlap the shared prefix"):
        shared_prefix_attention(torch.randn(2, 2, 3, 8), [], sk, sv, suffix_lens=torch.tensor([3, 2]), is_causal=True)
    with pytest.raises(ShapeError, match="enable_gqa"):
        shared_prefix_attention(torch.randn(2, 4, 1, 8), [Segment(torch.tensor([0]), kv, kv)], sk, sv)
    with pytest.raises(ValueError, match="mode"):
        suffix_attention(q, sk, sv, mode="ragged")
