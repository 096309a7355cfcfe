"""SharedPrefixKVCache: shared segments stored once, exact attention, plan and bytes accounting."""
import pytest
import torch

from graphtune.errors import PlanError, ShapeError
from graphtune.ir.reference import attention_ref
from graphtune.runtime.prefix_cache import SharedPrefixKVCache
from graphtune.runtime.shared_prefix import SharedSegment


def kv(L, *shape):
    return torch.randn(L, *shape), torch.randn(L, *shape)


def reference_rows(cache, q, layer, causal, gqa):
    k, v, valid = cache.dense(layer)
    outs = []
    for b in range(q.shape[0]):
        n = int(valid[b].sum())
        o, _ = attention_ref(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], is_causal=causal,
                             enable_gqa=gqa, bottom_right=True)
        outs.append(o)
    return torch.cat(outs)


def build_tree_cache(L=2, Hkv=2, D=16):
    c = SharedPrefixKVCache(batch_size=5, num_kv_heads=Hkv, head_dim=D, num_layers=L)
    c.add_shared(range(5), *kv(L, Hkv, 64, D))  # system prompt
    c.add_shared([1, 3, 4], *kv(L, Hkv, 17, D))  # few-shot block, non-contiguous rows
    c.add_shared([3, 4], *kv(L, Hkv, 1, D))
    c.add_shared([0], *kv(L, Hkv, 9, D))  # a single-row "shared" segment is still exact
    return c


@pytest.mark.parametrize("G,Lq", [(1, 1), (4, 1), (2, 3)])
def test_cache_attention_equals_attention_over_each_rows_concatenated_kv(G, Lq):
    L, Hkv, D = 2, 2, 16
    c = build_tree_cache(L, Hkv, D)
    c.append(*kv(L, 5, Hkv, 4, D), lens=torch.tensor([4, 3, 4, 3, 4]))  # ragged
    c.append(*kv(L, 5, Hkv, Lq, D))  # the new tokens, then attend
    q = torch.randn(5, Hkv * G, Lq, D)
    for layer in range(L):
        out = c.attention(q, layer=layer, is_causal=True, enable_gqa=G > 1)
        ref = reference_rows(c, q, layer, True, G > 1)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cache_with_empty_suffixes_attends_to_the_prefix_only():
    c = build_tree_cache(1)
    q = torch.randn(5, 2, 1, 16)
    out = c.attention(q, is_causal=False)
    torch.testing.assert_close(out, reference_rows(c, q, 0, False, False), atol=1e-5, rtol=1e-5)


def test_plan_describes_the_tree_and_seq_lens_count_each_rows_tokens():
    c = build_tree_cache(1)
    c.append(*kv(1, 5, 2, 2, 16))
    plan = c.plan()
    assert plan.segments[1] == SharedSegment((1, 3, 4), 64, 81)
    assert plan.suffix_starts == (73, 81, 64, 82, 82)
    assert c.seq_lens().tolist() == [75, 83, 66, 84, 84]


def test_shared_segments_are_stored_once():
    B, Hkv, D, P = 32, 8, 64, 4096
    c = SharedPrefixKVCache(B, Hkv, D)
    c.add_shared(range(B), *kv(1, Hkv, P, D))
    for _ in range(3):  # grow the suffix buffer by decoding steps
        c.append(*kv(1, B, Hkv, 1, D))
    token = 2 * Hkv * D * 4
    assert c.nbytes(allocated=False) == (P + 3 * B) * token
    assert c.per_row_nbytes() == B * (P + 3) * token
    assert c.nbytes() >= c.nbytes(allocated=False)
    assert c.per_row_nbytes() / c.nbytes() > 25


def test_grown_suffix_buffer_keeps_earlier_tokens():
    c = SharedPrefixKVCache(2, 1, 8)
    c.add_shared([0, 1], *kv(1, 1, 5, 8))
    for step in range(40):  # several reallocations
        c.append(*kv(1, 2, 1, 1, 8))
    q = torch.randn(2, 1, 1, 8)
    torch.testing.assert_close(c.attention(q), reference_rows(c, q, 0, True, False), atol=1e-5, rtol=1e-5)


def test_inconsistent_building_raises_clear_errors():
    c = SharedPrefixKVCache(3, 2, 8)
    c.add_shared([0, 1], *kv(1, 2, 4, 8))
    with pytest.raises(PlanError, match="different shared segments"):
        c.add_shared([1, 2], *kv(1, 2, 4, 8))
    with pytest.raises(PlanError, match="distinct rows"):
        c.add_shared([0, 3], *kv(1, 2, 4, 8))
    with pytest.raises(ShapeError, match="k must be"):
        c.add_shared([2], *kv(1, 3, 4, 8))
    c.append(*kv(1, 3, 2, 1, 8))
    with pytest.raises(PlanError, match="already have suffix tokens"):
        c.add_shared([0, 1], *kv(1, 2, 4, 8))
    with pytest.raises(ShapeError, match="lens"):
        c.append(*kv(1, 3, 2, 1, 8), lens=torch.tensor([1, 2, 0]))
    with pytest.raises(PlanError, match="overlap the shared prefix"):
        c.attention(torch.randn(3, 2, 2, 8), is_causal=True)  # 2 queries, 1 suffix token
