"""The runtime selectors' cost rules: each feature declines where it does not pay, and where it runs
it never gathers the KV cache. Not timing tests (timings are in benchmarks/bench_hf_loop.py): each
test asserts a decision — taken on one batch, declined on another — so a rule that stops declining
(or stops accepting) fails here.

* shared prefix: rows that share only *padding* get no plan (padding is lean decode's business; a
  padding-only plan made every decode step of a ragged batch gather the cache: 0.61x of plain HF);
* lean decode: declines uniform batches without planning (no mask scan at decode), takes a very
  ragged one, and declines a mildly ragged one under the measured rule;
* unpadded prefills: a mask that is exactly causal is handed to SDPA's ``is_causal`` (what HF does
  eagerly), any other mask is kept;
* ``run_dense`` reads consecutive row groups as views and gathers only suffix keys otherwise.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from graphtune import flags
from graphtune.runtime import lean_decode as ld
from graphtune.runtime import shared_prefix as sp
from graphtune.runtime.context import batch_context
from graphtune.runtime.shared_prefix import SharedPrefixPlan, SharedSegment, detect_shared_prefixes, run_dense


@pytest.fixture
def installed():
    sp.install()
    ld.install()
    try:
        yield
    finally:
        ld.uninstall()
        sp.uninstall()


def _left_padded(lengths, vocab=500, seed=0):
    """ids, HF padding mask and generate-style positions of a left-padded batch (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    mask = (torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]).long()
    ids = torch.randint(3, vocab, (len(lengths), S), generator=g) * mask
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, pos


def _lean_calls(monkeypatch):
    calls = []
    real = ld.lean_attention_cpu
    monkeypatch.setattr(ld, "lean_attention_cpu", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    return calls


# -- shared prefix: padding is not a shared prefix --------------------------------------------------

def test_rows_that_share_only_padding_get_no_shared_prefix_plan(installed):
    # 15 rows left-padded by 500 identical pad tokens (same ids, mask and positions: identical K/V
    # there), then 100 distinct tokens each: >= 8 rows sharing >= 256 positions, all of them padding
    ids, mask, pos = _left_padded([600] + [100] * 15)
    assert detect_shared_prefixes(ids, mask, position_ids=pos) is None
    state: dict = {}
    with batch_context(input_ids=ids, attention_mask=mask, position_ids=pos, state=state):
        pass
    assert sp.STATE_KEY not in state


def test_a_real_shared_prompt_after_equal_padding_still_plans_and_padding_does_not_count():
    prompt = torch.randint(3, 500, (1, 300))
    for real, want in ((300, True), (250, False)):  # 256 real tokens needed; 10 pads + 250 real = 260 positions
        ids = torch.cat([torch.zeros(1, 10, dtype=torch.long), prompt[:, :real]], 1).repeat(8, 1)
        mask = (ids != 0).long()
        plan = detect_shared_prefixes(ids, mask)
        assert (plan is not None) == want, (real, plan)
        if want:
            assert plan.segments == (SharedSegment(tuple(range(8)), 0, 10 + real),)


# -- lean decode: declines uniform batches, takes very ragged ones -------------------------------------

def _decode_call(lengths, hq=8, hkv=4, d=16):
    """A decode attention call (q_len 1) of a left-padded batch and its HF ``[B, S]`` mask."""
    S = max(lengths)
    hf_mask = (torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]).long()
    q = torch.randn(len(lengths), hq, 1, d)
    k, v = torch.randn(len(lengths), hkv, S, d), torch.randn(len(lengths), hkv, S, d)
    allowed = hf_mask.bool()[:, None, None, :]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return hf_mask, q, k, v, mask


@pytest.mark.parametrize("lengths, lean", [
    ([1025] * 16, False),               # uniform: nothing to skip
    ([4097] + [257] * 15, True),        # the ragged benchmark batch: padded/real 8.2
    ([1025] * 12 + [700] * 4, False),   # padded/real 1.09 < 1.3
])
def test_lean_takes_very_ragged_decode_batches_only(installed, monkeypatch, lengths, lean):
    calls = _lean_calls(monkeypatch)
    hf_mask, q, k, v, mask = _decode_call(lengths)
    S = hf_mask.shape[1]
    with flags.Context(LEAN_MIN_SKEW=-1.0, NUM_THREADS=1), \
            batch_context(input_ids=torch.ones(len(lengths), 1, dtype=torch.long), attention_mask=hf_mask,
                          past_length=S - 1) as ctx:
        got = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
        batch = ctx.plans.get(ld.PLAN_NAME)
    assert bool(calls) == lean
    if len(set(lengths)) == 1:
        assert batch is None, "an unpadded decode batch must not be planned (nor its mask scanned)"
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)


def test_a_forced_rule_still_plans_unpadded_batches(installed, monkeypatch):
    calls = _lean_calls(monkeypatch)
    hf_mask, q, k, v, mask = _decode_call([64] * 3)
    with flags.Context(LEAN_MIN_SKEW=0.0), batch_context(attention_mask=hf_mask, past_length=63) as ctx:
        torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
        assert ctx.plans[ld.PLAN_NAME].unpadded
    assert calls


# -- unpadded prefill: an exactly causal mask runs as is_causal -----------------------------------------

def _prefill_call(B=2, L=48, hq=4, hkv=2, d=16):
    q, k, v = torch.randn(B, hq, L, d), torch.randn(B, hkv, L, d), torch.randn(B, hkv, L, d)
    return q, k, v, torch.ones(B, L, dtype=torch.long)


def _causal(B, L, kind):
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L)
    if kind == "bool":
        return allowed
    if kind == "bool_materialized":
        return allowed.clone()
    fill = float("-inf") if kind == "additive_inf" else torch.finfo(torch.float32).min
    return torch.zeros(B, 1, L, L).masked_fill(~allowed, fill)


@pytest.mark.parametrize("kind", ["bool", "bool_materialized", "additive_min", "additive_inf"])
def test_an_unpadded_prefill_with_an_exactly_causal_mask_runs_is_causal(installed, kind):
    q, k, v, hf_mask = _prefill_call()
    B, L = hf_mask.shape
    mask = _causal(B, L, kind)
    with batch_context(input_ids=hf_mask, attention_mask=hf_mask) as ctx:
        got = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
        out, lse = torch.ops.graphtune.attention_with_lse(q, k, v, mask, False, None, True)
        batch = ctx.plans[ld.PLAN_NAME]
    assert batch.unpadded and [ok for _, ok in batch.causal_masks] == [True]
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(got, want)  # the very call plain HF makes eagerly
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("change", ["sliding_window", "bias", "per_head", "padding_row"])
def test_any_other_prefill_mask_is_kept(installed, change):
    q, k, v, hf_mask = _prefill_call()
    B, L = hf_mask.shape
    mask = _causal(B, L, "additive_min").clone()
    if change == "sliding_window":
        mask[:, :, 40:, :8] = torch.finfo(torch.float32).min
    elif change == "bias":
        mask[1, 0, 5, 2] = -0.5
    elif change == "per_head":
        mask = mask.expand(B, q.shape[1], L, L).clone()
    else:  # the HF mask says every row is full, the SDPA mask disagrees: trust neither, keep the mask
        mask[0, :, :, 0] = torch.finfo(torch.float32).min
    with batch_context(input_ids=hf_mask, attention_mask=hf_mask) as ctx:
        got = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
        batch = ctx.plans[ld.PLAN_NAME]
    assert [ok for _, ok in batch.causal_masks] in ([False], [])
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)


def test_padded_prefills_and_decode_steps_are_not_treated_as_causal(installed):
    q, k, v, _ = _prefill_call(B=2, L=48)
    hf_mask = torch.ones(2, 48, dtype=torch.long)
    hf_mask[1, :5] = 0
    with flags.Context(LEAN_MIN_SKEW=-1.0), batch_context(input_ids=hf_mask, attention_mask=hf_mask) as ctx:
        torch.ops.graphtune.attention(q, k, v, _causal(2, 48, "bool"), False, None, True)
        batch = ctx.plans.get(ld.PLAN_NAME)
    assert batch is not None and not batch.unpadded and not batch.causal_masks
    with batch_context(input_ids=hf_mask[:, :1], attention_mask=torch.ones(2, 48, dtype=torch.long),
                       past_length=47) as ctx:
        assert ld.PLAN_NAME not in ctx.plans  # decode of an unpadded batch: no plan at all


def test_is_causal_mask():
    m = torch.ones(3, 5, dtype=torch.bool).tril(2)  # bottom-right causal: 3 queries after 2 cached keys
    assert ld.is_causal_mask(m[None, None], 4, 3, 5)
    assert ld.is_causal_mask(m[None, None].expand(4, 1, 3, 5), 4, 3, 5)  # stride-0 batch: checked once
    assert ld.is_causal_mask(torch.zeros(3, 5).masked_fill(~m, float("-inf")), 4, 3, 5)
    assert not ld.is_causal_mask(torch.ones(3, 5, dtype=torch.bool).tril()[None, None], 4, 3, 5)  # top-left
    assert not ld.is_causal_mask(m[None, None], 4, 3, 6)
    assert not ld.is_causal_mask(m[None, None].expand(4, 2, 3, 5), 4, 3, 5)  # per-head
    assert not ld.is_causal_mask(torch.zeros(3, 5).masked_fill(~m, -1.0), 4, 3, 5)  # a bias, not a mask
    assert not ld.is_causal_mask(torch.ones(1, 1, 1, 5, dtype=torch.bool), 4, 3, 5)  # broadcast query axis
    assert not ld.is_causal_mask(m.long()[None, None], 4, 3, 5)  # integer masks are not SDPA masks


# -- shared prefix: prefill dedup of identical rows attends with is_causal ------------------------------

@pytest.mark.parametrize("kind, causal", [("bool", True), ("additive_min", True), ("window", False)])
def test_prefill_dedup_uses_is_causal_only_for_an_exactly_causal_mask(installed, monkeypatch, kind, causal):
    seen = []
    real = sp.partial_attention
    monkeypatch.setattr(sp, "partial_attention",
                        lambda q, k, v, m, c, *a: seen.append((m is None, c)) or real(q, k, v, m, c, *a))
    B, L = 4, 300
    ids = torch.randint(3, 500, (1, L)).expand(B, L)
    x = torch.randn(1, 2, L, 16).expand(B, -1, -1, -1)
    mask = _causal(B, L, "bool" if kind == "window" else kind).clone()
    if kind == "window":
        mask[:, :, 200:, :10] = False
    with flags.Context(SHARED_PREFIX_MIN_PREFIX=16, SHARED_PREFIX_MIN_ROWS=2), \
            batch_context(input_ids=ids, attention_mask=torch.ones(B, L, dtype=torch.long)):
        got = torch.ops.graphtune.attention(x, x, x, mask, False, None, False)
    assert seen == [(causal, causal)]  # one call (one distinct row): mask dropped and is_causal iff causal
    torch.testing.assert_close(got, F.scaled_dot_product_attention(x, x, x, attn_mask=mask), atol=1e-5, rtol=1e-5)


# -- run_dense never gathers the cache ----------------------------------------------------------------------

class _IndexSelects(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket == torch.ops.aten.index_select:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows_a", [(0, 1, 2, 3), (0, 2, 4, 6)])
def test_run_dense_reads_row_groups_as_views_and_gathers_only_suffix_keys(rows_a, monkeypatch):
    B, H, D, S = 8, 2, 16, 200
    plan = SharedPrefixPlan(B, (SharedSegment(tuple(range(B)), 0, 100), SharedSegment(rows_a, 100, 150)))
    k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    for x in (k, v):  # make the shared ranges really shared
        x[:, :, :100] = x[:1, :, :100]
        x[list(rows_a), :, 100:150] = x[rows_a[0], :, 100:150]
    q = torch.randn(B, H, 1, D)
    with _IndexSelects() as spy:
        out, _ = run_dense(plan, q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    # suffix groups: rows_a from key 150, rows_b from key 100; consecutive groups are views
    gathered_keys = [s[-2] for s in spy.shapes if len(s) == 4 and s[-2] > 1]  # k/v, not the 1-query q
    assert all(n < S - 100 + 1 for n in gathered_keys), spy.shapes  # never the whole cache
    if rows_a == (0, 1, 2, 3):
        assert gathered_keys == [], spy.shapes
    else:
        assert sorted(gathered_keys) == [50, 50, 100, 100], spy.shapes  # k and v of each group's suffix
