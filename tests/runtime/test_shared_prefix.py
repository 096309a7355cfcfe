"""Shared-prefix plans, detection from prompt ids, and automatic use through the runtime selector."""
import pytest
import torch
import torch.nn.functional as F

from graphtune import flags
from graphtune.errors import PlanError
from graphtune.ir.reference import attention_ref
from graphtune.runtime import shared_prefix as sp
from graphtune.runtime.context import batch_context
from graphtune.runtime.shared_prefix import SharedPrefixPlan, SharedSegment, detect_shared_prefixes, run_dense


@pytest.fixture
def installed():
    """The runtime feature on, with thresholds low enough for small test shapes."""
    sp.install()
    with flags.Context(SHARED_PREFIX_MIN_PREFIX=16, SHARED_PREFIX_MIN_ROWS=2):
        yield
    sp.uninstall()


def duplicated_cache(plan, Hkv, S, D, dtype=torch.float32):
    """Per-row caches where rows of each segment hold identical K/V over its range (as HF's cache)."""
    k, v = torch.randn(plan.batch_size, Hkv, S, D, dtype=dtype), torch.randn(plan.batch_size, Hkv, S, D, dtype=dtype)
    for s in plan.segments:
        r0 = s.rows[0]
        for r in s.rows[1:]:
            k[r, :, s.start : s.end] = k[r0, :, s.start : s.end]
            v[r, :, s.start : s.end] = v[r0, :, s.start : s.end]
    return k, v


TREE = SharedPrefixPlan(6, (
    SharedSegment((0, 1, 2, 3, 4, 5), 0, 40),  # system prompt
    SharedSegment((1, 3, 5), 40, 57),  # few-shot block, non-contiguous rows
    SharedSegment((0, 4), 40, 41),
    SharedSegment((3, 5), 57, 70),  # third level
))


# -- plans ------------------------------------------------------------------------------

def test_plan_records_where_each_rows_suffix_starts():
    assert TREE.suffix_starts == (41, 57, 40, 70, 41, 70)
    assert TREE.max_end == 70
    assert "shared by 3 rows [1, 3, 5]" in TREE.describe()


@pytest.mark.parametrize("segments,match", [
    ((SharedSegment((0, 1), 0, 5), SharedSegment((1,), 6, 8)), "gap"),
    ((SharedSegment((0, 1), 0, 5), SharedSegment((1,), 3, 8)), "overlaps"),
    ((SharedSegment((0, 3), 0, 5),), "out of range"),
    ((SharedSegment((1, 1), 0, 5),), "distinct"),
    ((SharedSegment((0, 1), 4, 2),), "bad key range"),
    ((SharedSegment((0, 1), 2, 5),), "gap"),
])
def test_inconsistent_plans_raise_plan_error(segments, match):
    with pytest.raises(PlanError, match=match):
        SharedPrefixPlan(3, segments)


# -- detection --------------------------------------------------------------------------

def test_identical_prompts_share_the_whole_prompt():
    ids = torch.randint(0, 1000, (1, 300)).expand(32, -1)
    plan = detect_shared_prefixes(ids)
    assert plan.segments == (SharedSegment(tuple(range(32)), 0, 300),)


def test_detection_finds_a_three_level_tree_over_non_contiguous_rows():
    base = torch.randint(0, 1000, (100,))
    ids = base.repeat(6, 1)
    ids[[0, 2, 4], 70:] = torch.randint(0, 1000, (30,))  # rows 0,2,4 diverge at 70 together
    ids[[1, 3, 5], 50] = 7  # rows 1,3,5 diverge at 50 ...
    ids[5, 90] = 5  # ... row 5 again at 90
    ids[2, 99], ids[4, 99] = 1, 2
    plan = detect_shared_prefixes(ids, min_prefix=10, min_rows=2)
    assert set(plan.segments) == {
        SharedSegment(tuple(range(6)), 0, 50), SharedSegment((0, 2, 4), 50, 99), SharedSegment((1, 3, 5), 50, 90),
        SharedSegment((1, 3), 90, 100)}


def test_short_shared_ranges_are_pushed_down_to_the_level_below():
    ids = torch.randint(0, 1000, (1, 64)).repeat(4, 1)
    ids[:2, 5] = 1  # rows 0,1 vs 2,3 diverge at 5: the 5-token root is too short alone
    ids[2:, 5] = 2
    plan = detect_shared_prefixes(ids, min_prefix=20, min_rows=2)
    assert set(plan.segments) == {SharedSegment((0, 1), 0, 64), SharedSegment((2, 3), 0, 64)}


def test_detection_respects_flags_and_returns_none_without_sharing():
    ids = torch.randint(0, 1000, (1, 100)).expand(4, -1)
    with flags.Context(SHARED_PREFIX_MIN_ROWS=5):
        assert detect_shared_prefixes(ids) is None
    with flags.Context(SHARED_PREFIX_MIN_PREFIX=101):
        assert detect_shared_prefixes(ids) is None
    with flags.Context(SHARED_PREFIX_MIN_PREFIX=100, SHARED_PREFIX_MIN_ROWS=4):
        assert detect_shared_prefixes(ids).segments[0].end == 100
    assert detect_shared_prefixes(torch.arange(400).view(4, 100), min_prefix=1) is None


def test_left_padding_shares_only_identically_padded_positions():
    ids = torch.randint(1, 1000, (1, 50)).repeat(4, 1)
    mask = torch.ones(4, 50, dtype=torch.long)
    mask[2:, :3] = 0  # rows 2,3 left-padded by 3: same tokens, but shifted positions
    plan = detect_shared_prefixes(ids, mask, min_prefix=1, min_rows=2)
    assert set(plan.segments) == {SharedSegment((0, 1), 0, 50), SharedSegment((2, 3), 0, 50)}


# -- running on a duplicated cache --------------------------------------------------------

@pytest.mark.parametrize("Hkv,G,Lq", [(2, 1, 1), (2, 4, 1), (1, 8, 3), (4, 2, 2)])
def test_run_dense_equals_sdpa_over_the_duplicated_cache(Hkv, G, Lq):
    S, D = 85, 32
    k, v = duplicated_cache(TREE, Hkv, S, D)
    q = torch.randn(TREE.batch_size, Hkv * G, Lq, D)
    out, lse = run_dense(TREE, q, k, v, enable_gqa=G > 1)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=G > 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_run_dense_honours_padding_masks_shared_by_the_group(kind):
    plan = SharedPrefixPlan(4, (SharedSegment((0, 1, 2, 3), 0, 30),))
    k, v = duplicated_cache(plan, 2, 40, 16)
    valid = torch.ones(4, 1, 2, 40, dtype=torch.bool)
    valid[:, :, :, :4] = False  # identical left padding in the shared prompt
    valid[1, :, :, 33:35] = False  # row-specific masking in the suffix
    mask = valid if kind == "bool" else torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))
    q = torch.randn(4, 2, 2, 16)
    out, _ = run_dense(plan, q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_run_dense_rejects_masks_that_differ_inside_a_shared_segment_and_overlapping_queries():
    plan = SharedPrefixPlan(2, (SharedSegment((0, 1), 0, 10),))
    k, v = duplicated_cache(plan, 1, 12, 8)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., 3] = False
    with pytest.raises(PlanError, match="attn_mask differs"):
        run_dense(plan, torch.randn(2, 1, 1, 8), k, v, mask)
    with pytest.raises(PlanError, match="overlap the shared prefix"):
        run_dense(plan, torch.randn(2, 1, 3, 8), k, v)


# -- automatic use through batch_context ---------------------------------------------------

def _prefill(state, ids):
    with batch_context(input_ids=ids, attention_mask=torch.ones_like(ids), past_length=0, state=state):
        pass


def test_selector_decomposes_decode_attention_after_a_shared_prompt_prefill(installed, monkeypatch):
    B, P, Hkv, G, D = 8, 200, 2, 2, 32
    state: dict = {}
    _prefill(state, torch.randint(0, 1000, (1, P)).expand(B, -1))
    plan = state[sp.STATE_KEY]
    calls = []
    monkeypatch.setattr(sp, "run_dense", lambda *a, **kw: calls.append(1) or run_dense(*a, **kw))
    k, v = duplicated_cache(plan, Hkv, P + 3, D)
    q = torch.randn(B, Hkv * G, 1, D)
    with batch_context(input_ids=torch.zeros(B, 1, dtype=torch.long), past_length=P + 2, state=state):
        out = torch.ops.graphtune.attention(q, k, v, None, False, None, True)
        out2, lse = torch.ops.graphtune.attention_with_lse(q, k, v, None, False, 0.3, True)
    assert len(calls) == 2
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-5, rtol=1e-5)
    ref_out, ref_lse = attention_ref(q, k, v, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out2, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_selector_declines_prefill_causal_calls_other_batches_and_unshared_masks(installed, monkeypatch):
    B, P = 4, 100
    state: dict = {}
    _prefill(state, torch.randint(0, 1000, (1, P)).expand(B, -1))
    plan = state[sp.STATE_KEY]
    monkeypatch.setattr(sp, "run_dense", lambda *a, **kw: pytest.fail("decomposition used where it is not exact"))
    k, v = duplicated_cache(plan, 2, P, 16)
    bad = torch.ones(B, 1, 1, P, dtype=torch.bool)
    bad[0, ..., 5] = False
    q1 = torch.randn(B, 2, 1, 16)
    calls = [((q1, k, v, None, True), P - 1),  # SDPA's top-left causal
             ((q1, k, v, bad), P - 1),  # mask differs inside the shared prompt
             ((q1[:2], k[:2], v[:2]), P - 1),  # other batch size
             ((q1, k, v), P + 5),  # keys are not this model's cache (e.g. cross-attention)
             ((q1, k[:, :, :90], v[:, :, :90]), 89)]  # the cache ends inside the shared prompt
    for args, past in calls:
        with batch_context(input_ids=torch.zeros(B, 1, dtype=torch.long), past_length=past, state=dict(state)):
            got = torch.ops.graphtune.attention(*args)
        want = F.scaled_dot_product_attention(*args[:3], attn_mask=args[3] if len(args) > 3 else None,
                                              is_causal=len(args) > 4 and args[4])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_selector_declines_a_cache_whose_rows_no_longer_share(installed, monkeypatch):
    """A plan is checked against the cache it is used on: rows reordered since the prefill
    (so that a shared segment's rows now differ) make the selector decline."""
    B, P = 4, 100
    state: dict = {}
    _prefill(state, torch.randint(0, 1000, (1, P)).expand(B, -1))
    k, v = torch.randn(B, 2, P + 1, 16), torch.randn(B, 2, P + 1, 16)  # rows differ everywhere
    q = torch.randn(B, 2, 1, 16)
    monkeypatch.setattr(sp, "run_dense", lambda *a, **kw: pytest.fail("decomposition of rows that differ"))
    with batch_context(input_ids=torch.zeros(B, 1, dtype=torch.long), past_length=P, state=state):
        got = torch.ops.graphtune.attention(q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def _templated_cache(ids, Hkv=2, D=16):
    """A layer-0-like cache: each key's K/V a function of its token and position only."""
    g = torch.Generator().manual_seed(0)
    emb_k, emb_v = torch.randn(1000, Hkv, D, generator=g), torch.randn(1000, Hkv, D, generator=g)
    rot = torch.randn(ids.shape[1], Hkv, D, generator=g)
    k = (emb_k[ids] + rot).permute(0, 2, 1, 3).contiguous()  # [B, Hkv, S, D]
    v = emb_v[ids].permute(0, 2, 1, 3).contiguous()
    return k, v


def _templated_ids(B=4, P=100, tail=8):
    """Pairs of prompts that differ but end alike (a chat template's tail), then one decoded token."""
    heads = torch.randint(0, 1000, (B // 2, P - tail)).repeat_interleave(2, 0)
    return torch.cat([heads, torch.randint(0, 1000, (1, tail)).expand(B, -1)], 1)


@pytest.mark.parametrize("eager", [True, False], ids=["cpu-equal", "one-sync"])
@pytest.mark.parametrize("perm,moved", [([0, 2, 1, 3], True), ([1, 0, 3, 2], False), ([2, 3, 0, 1], False)])
def test_rows_moved_between_groups_by_a_reorder_make_the_selector_decline(installed, monkeypatch, perm, moved, eager):
    """F6 (tests/fuzz): beam search's ``reorder_cache`` permutes the rows in place. Prompts that differ
    but end alike hold the same LAST key in every row, so the check must compare the whole range; a
    reorder within the groups keeps the plan (and the decomposition) valid."""
    monkeypatch.setattr(sp, "_compare_eagerly", lambda device: eager)
    B, P = 4, 100
    ids = _templated_ids(B, P)
    state: dict = {}
    _prefill(state, ids)
    assert set(state[sp.STATE_KEY].segments) == {SharedSegment((0, 1), 0, P), SharedSegment((2, 3), 0, P)}
    nxt = torch.randint(0, 1000, (B, 1))
    k, v = _templated_cache(torch.cat([ids[perm], nxt], 1))  # the cache after reorder_cache(perm) + 1 token
    q = torch.randn(B, 4, 1, 16)
    calls = []
    monkeypatch.setattr(sp, "run_dense", lambda *a, **kw: calls.append(1) or run_dense(*a, **kw))
    with batch_context(input_ids=nxt, past_length=P, state=state):
        got = [torch.ops.graphtune.attention(q, k, v, None, False, None, True) for _ in range(3)]  # 3 "layers"
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for g in got:
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    assert len(calls) == (0 if moved else 3)
    assert (sp.STATE_KEY in state) != moved  # a plan found stale is dropped for the rest of the request


@pytest.mark.parametrize("eager", [True, False], ids=["cpu-equal", "one-sync"])
@pytest.mark.parametrize("where", ["k_middle", "v_only", "first_key", "none"])
def test_the_check_covers_every_key_of_a_segment_in_k_and_v(installed, monkeypatch, where, eager):
    """Both forms of the check (CPU: torch.equal per block; elsewhere: flags reduced before one sync)."""
    monkeypatch.setattr(sp, "_compare_eagerly", lambda device: eager)
    B, P = 4, 100
    state: dict = {}
    _prefill(state, torch.randint(0, 1000, (1, P)).expand(B, -1))
    k, v = duplicated_cache(state[sp.STATE_KEY], 2, P + 1, 16)
    if where == "k_middle":
        k[2, 0, 50] += 1
    elif where == "v_only":
        v[3, 0, 10, 5] += 1e-3
    elif where == "first_key":
        k[1, 0, 0, 0] = -k[1, 0, 0, 0] - 1
    else:
        k, v = k[:, :, :, :15], v[:, :, :, :15]  # odd head dim: compared as int32, not int64
    q = torch.randn(B, 2, 1, k.shape[-1])
    calls = []
    monkeypatch.setattr(sp, "run_dense", lambda *a, **kw: calls.append(1) or run_dense(*a, **kw))
    with batch_context(input_ids=torch.zeros(B, 1, dtype=torch.long), past_length=P, state=state):
        got = torch.ops.graphtune.attention(q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert len(calls) == (where == "none")  # rows that differ anywhere in a segment are never decomposed


def test_the_check_runs_once_per_forward(installed, monkeypatch):
    B, P = 8, 64
    state: dict = {}
    _prefill(state, torch.randint(0, 1000, (1, P)).expand(B, -1))
    k, v = duplicated_cache(state[sp.STATE_KEY], 2, P + 1, 16)
    q = torch.randn(B, 2, 1, 16)
    checks = []
    real = sp._segments_hold_equal_rows
    monkeypatch.setattr(sp, "_segments_hold_equal_rows", lambda *a: checks.append(1) or real(*a))
    for step in range(2):
        with batch_context(input_ids=torch.zeros(B, 1, dtype=torch.long), past_length=P, state=state):
            for _ in range(4):
                torch.ops.graphtune.attention(q, k, v)
        assert len(checks) == step + 1


def test_prefill_with_a_4d_mask_or_per_row_positions_plans_accordingly(installed):
    ids = torch.randint(0, 1000, (1, 64)).expand(4, -1)
    state: dict = {}
    mask4 = torch.ones(4, 1, 64, 64, dtype=torch.bool).tril()
    with batch_context(input_ids=ids, attention_mask=mask4, state=state) as ctx:
        assert sp.STATE_KEY not in ctx.plans  # a custom mask may make identical ids attend differently
    pos = torch.arange(64).repeat(4, 1)
    pos[2:, 32:] += 3  # rows 2, 3 skip positions: their K/V differ from rows 0, 1 from key 32 on
    with batch_context(input_ids=ids, position_ids=pos, state=state):
        pass
    assert set(state[sp.STATE_KEY].segments) == {
        SharedSegment((0, 1, 2, 3), 0, 32), SharedSegment((0, 1), 32, 64), SharedSegment((2, 3), 32, 64)}


def test_prefill_dedup_needs_the_prompts_own_self_attention(installed, monkeypatch):
    """A call whose keys are not exactly this forward's tokens (a cache the caller did not report)
    is never deduplicated, and at a prefill the decomposition never runs."""
    ids = torch.randint(0, 1000, (1, 32)).expand(4, -1)
    monkeypatch.setattr(sp, "run_dedup", lambda *a, **kw: pytest.fail("dedup of a call with cached keys"))
    monkeypatch.setattr(sp, "run_dense", lambda *a, **kw: pytest.fail("decomposition at a prefill"))
    x = torch.randn(1, 2, 32, 8).expand(4, -1, -1, -1)
    kv = torch.randn(4, 2, 70, 8)  # 38 keys before the queries: more than the 32-token plan
    with batch_context(input_ids=ids, past_length=0):
        got = torch.ops.graphtune.attention(x, kv, kv)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(x, kv, kv), atol=1e-5, rtol=1e-5)


def test_planner_forgets_the_plan_on_a_new_unshared_prefill(installed):
    state: dict = {}
    _prefill(state, torch.randint(0, 1000, (1, 100)).expand(8, -1))
    assert sp.STATE_KEY in state
    _prefill(state, torch.randint(0, 1000, (8, 100)))
    assert sp.STATE_KEY not in state


def test_default_thresholds_skip_small_batches_and_short_prompts():
    assert sp.thresholds() == (sp.DEFAULT_MIN_PREFIX, sp.DEFAULT_MIN_ROWS)
    assert detect_shared_prefixes(torch.randint(0, 1000, (1, sp.DEFAULT_MIN_PREFIX - 1)).expand(32, -1)) is None
    assert detect_shared_prefixes(torch.randint(0, 1000, (1, 2000)).expand(sp.DEFAULT_MIN_ROWS - 1, -1)) is None


def test_uninstalled_planner_makes_no_plan():
    sp.uninstall()
    state: dict = {}
    _prefill(state, torch.randint(0, 1000, (1, 100)).expand(8, -1))
    assert state == {}


def test_describe_says_when_a_site_uses_the_decomposition(installed):
    from types import SimpleNamespace

    decode = sp.describe(SimpleNamespace(details={"mask": "bool"}), (8, 4, 1, 16), (8, 2, 300, 16))
    mp, mr = sp.thresholds()
    assert decode.startswith("shared-prefix on decode") and f">= {mr} rows share >= {mp}" in decode
    # SDPA is_causal sites are never decomposed (queries could overlap a shared prefix)
    assert sp.describe(SimpleNamespace(details={"mask": "causal"}), None, None) is None
    sp.uninstall()
    assert sp.describe(SimpleNamespace(details={"mask": "bool"}), (8, 4, 1, 16), (8, 2, 300, 16)) is None


def test_prefill_of_identical_rows_attends_once_per_distinct_row(installed, monkeypatch):
    P, D = 64, 16
    ids = torch.randint(0, 1000, (1, P)).repeat(6, 1)
    ids[[1, 4], 40:] = 7  # rows {0,2,3,5} identical, rows {1,4} identical: 2 distinct rows
    state: dict = {}
    seen = []
    real = sp.partial_attention
    monkeypatch.setattr(sp, "partial_attention", lambda q, *a: seen.append(q.shape[0]) or real(q, *a))
    base = torch.randn(2, 3, P, D)  # q = k = v per distinct row
    x = base[torch.tensor([0, 1, 0, 0, 1, 0])]
    mask = torch.ones(6, 1, P, P, dtype=torch.bool).tril()
    with batch_context(input_ids=ids, attention_mask=torch.ones_like(ids), past_length=0, state=state):
        causal = torch.ops.graphtune.attention(x, x, x, None, True)
        masked, lse = torch.ops.graphtune.attention_with_lse(x, x, x, mask)
        mask[3, ..., 0] = False  # a row-specific mask: rows differ, no deduplication
        other = torch.ops.graphtune.attention(x, x, x, mask)
    assert seen == [2, 2]
    ref = F.scaled_dot_product_attention(x, x, x, is_causal=True)
    torch.testing.assert_close(causal, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, attention_ref(x, x, x, is_causal=True)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other, F.scaled_dot_product_attention(x, x, x, attn_mask=mask), atol=1e-5, rtol=1e-5)


def test_run_dedup_without_identical_rows_raises_plan_error():
    x = torch.randn(2, 1, 5, 8)
    with pytest.raises(PlanError, match="identical"):
        sp.run_dedup(SharedPrefixPlan(2, (SharedSegment((0, 1), 0, 3),)), x, x, x)


def test_a_models_options_can_turn_the_feature_off(installed):
    from graphtune.flags import Options

    ids = torch.randint(0, 1000, (1, 300)).expand(8, -1)
    state: dict = {}
    with batch_context(input_ids=ids, attention_mask=torch.ones_like(ids), state=state,
                       options=Options(shared_prefix=False)):
        pass
    assert sp.STATE_KEY not in state
    _prefill(state, ids)  # same batch with the feature on: planned
    assert sp.STATE_KEY in state
