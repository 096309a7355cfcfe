"""Lean decode in the plan/run runtime: the planner reads the HF padding mask once per batch, the
selector swaps masked decode attention for the lean path only when it gives the same result, and
HF generate on a ragged, left-padded batch produces identical tokens."""
import pytest
import torch
import torch.nn.functional as F

from graphtune import flags
from graphtune.errors import PlanError
from graphtune.ir.reference import attention_ref
from graphtune.runtime import context
from graphtune.runtime import lean_decode as ld


@pytest.fixture
def installed():
    ld.install()
    try:
        yield
    finally:
        ld.uninstall()


LENGTHS = [40, 3, 17, 1]


def _padded(lengths, hq=4, hkv=2, lq=1, d=16, extra=0):
    S = max(lengths) + extra
    B = len(lengths)
    hf_mask = (torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]).long()  # left padding
    q = torch.randn(B, hq, lq, d)
    k, v = torch.randn(B, hkv, S, d), torch.randn(B, hkv, S, d)
    return hf_mask, q, k, v


def _sdpa_mask(hf_mask, lq, causal, additive):
    S = hf_mask.shape[1]
    allowed = hf_mask.bool()[:, None, None, :].expand(-1, 1, lq, S)
    if causal:
        allowed = allowed & (torch.arange(S)[None, :] <= S - lq + torch.arange(lq)[:, None])
    if not additive:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)  # HF's eager style


@pytest.mark.parametrize("lq, causal, additive", [(1, False, True), (1, False, False), (4, True, False), (4, True, True),
                                                  (3, False, True)])
def test_selector_runs_lean_on_masked_decode_and_matches_masked_attention(installed, lq, causal, additive):
    lengths = [max(n, lq) for n in LENGTHS] if causal else LENGTHS  # every row sees >= 1 key
    hf_mask, q, k, v = _padded(lengths, lq=lq)
    mask = _sdpa_mask(hf_mask, lq, causal, additive)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with flags.Context(LEAN_MIN_SKEW=0.0), context.batch_context(attention_mask=hf_mask) as ctx:
        got = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
        out, lse = torch.ops.graphtune.attention_with_lse(q, k, v, mask, False, None, True)
        batch = ctx.plans[ld.PLAN_NAME]
    assert batch.calls == 2, batch.describe()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    _, ref_lse = attention_ref(q, k, v, _sdpa_mask(hf_mask, lq, causal, additive=False), enable_gqa=True)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert "lean" in batch.describe() and batch.lengths == tuple(lengths)


@pytest.mark.parametrize("case", ["bias", "hole_in_row", "wrong_causal", "per_head_mask", "is_causal", "long_q",
                                  "row_sees_nothing"])
def test_selector_leaves_calls_lean_cannot_reproduce_to_the_default_path(installed, case):
    lq = {"long_q": 20, "wrong_causal": 2, "row_sees_nothing": 4}.get(case, 1)
    hf_mask, q, k, v = _padded(LENGTHS, lq=lq)  # LENGTHS has a 1-key and a 3-key row
    mask = _sdpa_mask(hf_mask, lq, case == "row_sees_nothing", True)
    is_causal = False
    if case == "bias":
        mask = mask + 0.5 * torch.randn(mask.shape)  # a real bias (ALiBi-like): not a padding mask
    elif case == "wrong_causal":  # top-left aligned causal: not the decode alignment lean implements
        S = hf_mask.shape[1]
        top_left = torch.arange(S)[None, :] <= torch.arange(lq)[:, None] + 30
        mask = mask.masked_fill(~top_left, torch.finfo(torch.float32).min)
    elif case == "hole_in_row":
        mask = mask.clone()
        mask[0, 0, 0, -5] = torch.finfo(torch.float32).min
    elif case == "per_head_mask":
        mask = mask.expand(-1, 4, -1, -1)
    elif case == "is_causal":
        mask, is_causal = None, True
    with flags.Context(LEAN_MIN_SKEW=0.0), context.batch_context(attention_mask=hf_mask) as ctx:
        got = torch.ops.graphtune.attention(q, k, v, mask, is_causal, None, True)
        assert ctx.plans[ld.PLAN_NAME].calls == 0
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _ranged(starts, lengths, S, lq, causal):
    """HF ``[B, S]`` mask of one key range per row, and its SDPA mask (bool ``[B, 1, lq, S]``;
    causal: query i sees real keys ``j - start <= len - lq + i``)."""
    j = torch.arange(S)
    st, n = torch.tensor(starts)[:, None], torch.tensor(lengths)[:, None]
    hf = ((j >= st) & (j < st + n)).long()
    allowed = hf.bool()[:, None, None, :].expand(-1, 1, lq, S)
    if causal:
        allowed = allowed & ((j - st)[:, None, None, :] <= (n - lq)[:, None, None, :] + torch.arange(lq)[:, None])
    return hf, allowed


@pytest.mark.parametrize("lq, causal", [(1, False), (3, False), (3, True)])
def test_right_padded_and_windowed_ranges_run_lean_exactly(installed, lq, causal):
    starts, lengths, S = [0, 0, 5, 2], [30, 7, 20, 3], 40  # right padding, and ranges padded on both sides
    hf, mask = _ranged(starts, lengths, S, lq, causal)
    q, k, v = torch.randn(4, 4, lq, 16), torch.randn(4, 2, S, 16), torch.randn(4, 2, S, 16)
    with flags.Context(LEAN_MIN_SKEW=0.0), context.batch_context(attention_mask=hf) as ctx:
        got = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
        assert ctx.plans[ld.PLAN_NAME].calls == 1, ctx.plans[ld.PLAN_NAME].describe()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sdpa_mask", ["all_keys", "left_aligned_causal"])
def test_keys_after_a_right_padded_range_are_never_dropped(installed, sdpa_mask):
    # The HF mask says rows end early, but the call's own mask lets them see later keys: lean
    # (which reads only each row's range) would drop those keys, so the selector must decline.
    starts, lengths, S, lq = [0, 0, 0, 0], [30, 7, 20, 3], 40, 1
    hf, _ = _ranged(starts, lengths, S, lq, False)
    mask = torch.ones(4, 1, lq, S, dtype=torch.bool)
    if sdpa_mask == "left_aligned_causal":  # bottom-right causal over all S keys: not the row ranges
        lq = 3
        hf, _ = _ranged(starts, [max(n, lq) for n in lengths], S, lq, False)
        mask = (torch.arange(S) <= S - lq + torch.arange(lq)[:, None]).expand(4, 1, lq, S)
    q, k, v = torch.randn(4, 4, lq, 16), torch.randn(4, 2, S, 16), torch.randn(4, 2, S, 16)
    with flags.Context(LEAN_MIN_SKEW=0.0), context.batch_context(attention_mask=hf) as ctx:
        got = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
        assert ctx.plans[ld.PLAN_NAME].calls == 0
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_masks_with_gaps_are_left_to_masked_attention(installed):
    hf = torch.ones(2, 12, dtype=torch.long)
    hf[0, 4:6] = 0  # a gap inside row 0 (e.g. right padding followed by a decoded token)
    with flags.Context(LEAN_MIN_SKEW=0.0), context.batch_context(attention_mask=hf) as ctx:
        assert ld.PLAN_NAME not in ctx.plans
    with pytest.raises(PlanError, match="contiguous"):
        ld.plan_batch(hf)


def test_planner_skips_masks_with_holes_and_outside_contexts(installed):
    hf_mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    with context.batch_context(attention_mask=hf_mask) as ctx:
        assert ld.PLAN_NAME not in ctx.plans
    q = torch.randn(1, 2, 1, 8)
    torch.ops.graphtune.attention(q, q, q)  # no context: selector declines without error


def test_option_lean_decode_false_turns_the_planner_off(installed):
    from graphtune.flags import Options

    hf_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with context.batch_context(attention_mask=hf_mask, options=Options(lean_decode=False)) as ctx:
        assert ld.PLAN_NAME not in ctx.plans
    with context.batch_context(attention_mask=hf_mask, options=Options()) as ctx:
        assert ctx.plans[ld.PLAN_NAME].lengths == (2, 3)


def test_measured_rule_takes_lean_for_skewed_batches_only():
    with flags.Context(LEAN_MIN_SKEW=-1.0):
        ragged = ld.lean_for_lengths([32768] + [1024] * 31, 32768)
        uniform = ld.lean_for_lengths([4096] * 32, 4096)
        tiny = ld.lean_for_lengths([12, 5, 9], 12)
        assert ragged.skew > 15 and ld.lean_pays(ragged, 8)
        assert uniform.skew == 1.0 and not ld.lean_pays(uniform, 8)
        assert not ld.lean_pays(tiny, 2)  # padding saved is less than the extra call overhead
    with flags.Context(LEAN_MIN_SKEW=1.0):
        assert ld.lean_pays(uniform, 8)


def test_hf_generate_on_ragged_left_padded_batch_gives_identical_tokens(monkeypatch):
    pytest.importorskip("transformers")
    import graphtune
    from graphtune.models import build_model

    torch._dynamo.reset()
    calls = []
    real = ld.lean_attention_cpu
    monkeypatch.setattr(ld, "lean_attention_cpu", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    plain = build_model("llama", "sdpa")
    lengths = [30, 4, 11, 1]
    S = max(lengths)
    ids = torch.randint(3, plain.config.vocab_size, (len(lengths), S))
    mask = (torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]).long()
    ids = ids * mask  # pad id 0 on the left
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = plain.generate(ids, **kw)
        with flags.Context(LEAN_MIN_SKEW=0.0):  # this toy batch is far below the measured threshold
            got = graphtune.optimize(plain, engine=False).generate(ids, **kw)
    torch._dynamo.reset()
    assert torch.equal(got, want)
    assert calls, "the lean path never ran"
    assert all(s[2] == 1 for s in calls)  # decode steps only
