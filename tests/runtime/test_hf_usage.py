"""Hugging Face models driven by hand, as users do: ``model(...)`` with HF's own cache, under the
cache keyword of the installed transformers (``cache=`` from 5.x, ``past_key_values=`` before) or
positionally, with left padding, explicit ``position_ids``, continuation from a prefilled cache,
interleaved requests and threads. The plain model is the oracle: every logit must match, and the
spies check that graphtune's runtime paths really ran (a test that only ever hits the default
path proves nothing)."""
import inspect
import threading

import pytest
import torch

pytest.importorskip("transformers")

import graphtune  # noqa: E402
from graphtune import flags  # noqa: E402
from graphtune.models import build_model  # noqa: E402

ROWS, PROMPT, STEPS = 8, 40, 3
ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
    torch._dynamo.reset()
    plain = build_model("llama", "sdpa")
    yield plain, graphtune.optimize(plain)
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test calls forward with other argument sets; past Dynamo's recompile limit the model
    # would run eagerly (exact, but the spies would see no graphtune path).
    torch._dynamo.reset()


def _cache_keyword(model) -> str:
    """The installed transformers' own keyword (``cache`` from 5.x, ``past_key_values`` before)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _takes_cache_keyword(model, kw) -> bool:
    """Whether ``model(..., kw=cache)`` continues the cache (5.x still maps ``past_key_values``;
    4.x silently drops an unknown ``cache`` into ``**kwargs``)."""
    ids = torch.randint(3, model.config.vocab_size, (1, 4))
    with torch.no_grad():
        _, cache = _call(model, ids, None, _cache_keyword(model))
        try:
            _, cache = _call(model, ids[:, :1], cache, kw)
        except TypeError:
            return False
    return cache is not None and cache.get_seq_length() == 5


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _call(model, ids, cache, how, mask=None, pos=None):
    """One forward with the KV cache passed as ``how``: a keyword, or "positional"."""
    kw = dict(use_cache=True)
    if how == "positional":
        out = model(ids, mask, pos, cache, **kw)  # (input_ids, attention_mask, position_ids, cache)
    else:
        if cache is not None:
            kw[how] = cache
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
    return out.logits, _cache_of(out)


def _drive(model, ids, how="keyword", mask=None, pos=None, chunks=(None,), cache=None, steps=STEPS):
    """Prefill ``ids`` (split at ``chunks``), then greedy decode; logits of every call."""
    how = _cache_keyword(model) if how == "keyword" else how
    logits = []
    bounds = [0, *[c for c in chunks if c is not None], ids.shape[1]]
    for a, b in zip(bounds, bounds[1:]):
        lo, cache = _call(model, ids[:, a:b], cache, how, None if mask is None else mask[:, :b],
                          None if pos is None else pos[:, a:b])
        logits.append(lo)
    for _ in range(steps):
        nxt = logits[-1][:, -1:].argmax(-1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if pos is not None:
            pos = pos[:, -1:] + 1
        lo, cache = _call(model, nxt, cache, how, mask, pos)
        logits.append(lo)
    return logits


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=ATOL, msg=lambda m: f"call {i}: {m}")


def _shared_ids(model, groups=1, rows=ROWS, length=PROMPT):
    """``rows`` prompts in ``groups`` groups of identical prompts (rows r share with r + groups)."""
    base = torch.randint(3, model.config.vocab_size, (groups, length))
    return base.repeat(rows // groups, 1)


# -- 1: cache discovery ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cache", "past_key_values", "positional", "fresh_cache_object"])
def test_decode_with_hfs_cache_uses_the_plan_and_matches_the_plain_model(models, spy, how):
    plain, fast = models
    if how in ("cache", "past_key_values") and not _takes_cache_keyword(plain, how):
        pytest.skip(f"this transformers' forward does not take {how}=")
    ids = _shared_ids(plain)
    with torch.no_grad():
        if how == "fresh_cache_object":  # an empty cache object passed to the prefill itself
            want = _drive(plain, ids, cache=_new_cache(plain))
            got = _drive(fast, ids, cache=_new_cache(plain))
        else:
            want = _drive(plain, ids, how)
            got = _drive(fast, ids, how)
    _assert_same(got, want)
    layers = plain.config.num_hidden_layers
    assert len(spy.decode) >= STEPS * layers, "decode steps did not use the shared-prefix plan"
    assert len(spy.prefill) >= layers


def test_the_other_transformers_keyword_is_found_too(models):
    """A forward taking ``**kwargs`` (ours, or a custom model) gets the cache under either name."""
    from graphtune.runtime.context import find_cache

    cache = _new_cache(models[0])
    for name in ("cache", "past_key_values"):
        assert find_cache(None, (), {name: cache}) is cache
        assert find_cache(["input_ids", "attention_mask", name], (None, None, cache), {}) is cache


# -- 2: plans belong to the cache they were built for ---------------------------------------------

def test_continuation_from_a_prefilled_cache_matches(models, spy):
    plain, fast = models
    ids = _shared_ids(plain)
    with torch.no_grad():
        want = _drive(plain, ids, chunks=(24,))
        got = _drive(fast, ids, chunks=(24,))
    _assert_same(got, want)
    assert spy.decode, "the plan of the first chunk was not used after it"


def test_interleaved_requests_of_one_batch_size_never_use_each_others_plans(models, spy):
    plain, fast = models
    two_groups, one_group = _shared_ids(plain, groups=2), _shared_ids(plain, groups=1)
    how = _cache_keyword(plain)
    with torch.no_grad():
        want = _drive(plain, two_groups)
        lo_a, cache_a = _call(fast, two_groups, None, how)  # request A: rows share by pairs of groups
        _call(fast, one_group, None, how)  # request B, same batch size: every row shares everything
        got = [lo_a]
        for _ in range(STEPS):  # A continues from its own cache: B's plan must not be used
            lo, cache_a = _call(fast, got[-1][:, -1:].argmax(-1), cache_a, how)
            got.append(lo)
    _assert_same(got, want)
    assert spy.decode


def test_a_cache_prefilled_elsewhere_gets_no_plan_of_this_model(models, spy):
    plain, fast = models
    shared, distinct = _shared_ids(plain), torch.randint(3, plain.config.vocab_size, (ROWS, PROMPT))
    how = _cache_keyword(plain)
    with torch.no_grad():
        want = _drive(plain, distinct)
        _call(fast, shared, None, how)  # a shared-prompt request plans on the optimized model
        lo, cache = _call(plain, distinct, None, how)  # another cache, prefilled by the plain model
        got = [lo]
        for _ in range(STEPS):
            lo, cache = _call(fast, got[-1][:, -1:].argmax(-1), cache, how)
            got.append(lo)
    _assert_same(got, want)


def test_a_rolled_back_cache_drops_its_plan(models, spy):
    plain, fast = models
    ids = _shared_ids(plain)
    how = _cache_keyword(plain)
    other = torch.randint(3, plain.config.vocab_size, (ROWS, 30))
    with torch.no_grad():
        results = []
        for m in (plain, fast):
            _, cache = _call(m, ids, None, how)
            cache.crop(10 - PROMPT)  # roll back into the shared prompt, then continue with distinct tokens
            lo, cache = _call(m, other, cache, how)
            lo2, _ = _call(m, lo[:, -1:].argmax(-1), cache, how)
            results.append([lo, lo2])
    _assert_same(results[1], results[0])


# -- 3: what makes rows identical: ids, padding and positions ------------------------------------

def test_identical_ids_at_different_positions_are_not_deduplicated(models, spy):
    plain, fast = models
    ids = _shared_ids(plain)
    pos = torch.arange(PROMPT).repeat(ROWS, 1)
    pos[ROWS // 2:, 20:] += 7  # half the rows skip 7 positions mid-prompt (packed / resumed sequences)
    with torch.no_grad():
        want = _drive(plain, ids, pos=pos)
        got = _drive(fast, ids, pos=pos)
    _assert_same(got, want)
    assert spy.prefill and spy.decode  # rows 0..3 and 4..7 still share among themselves


def test_left_padded_shared_prompts_match(models, spy):
    plain, fast = models
    ids = _shared_ids(plain, groups=2)
    mask = torch.ones_like(ids)
    mask[1::2, :5] = 0  # the second group is left-padded by 5
    ids = ids * mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate computes them
    with torch.no_grad():
        want = _drive(plain, ids, mask=mask, pos=pos)
        got = _drive(fast, ids, mask=mask, pos=pos)
    _assert_same(got, want)
    assert spy.decode


@pytest.mark.parametrize("padding", ["left", "right"])
def test_ragged_batches_with_lean_decode_match(models, padding, monkeypatch):
    """Lean decode reads each row's one key range; right padding followed by decoded tokens
    leaves a gap in the mask, which lean must leave to masked attention."""
    from graphtune.runtime import lean_decode as ld

    plain, fast = models
    lengths = torch.tensor([30, 4, 11, 2])
    real = (torch.arange(30)[None, :] < lengths[:, None]).long()
    mask = real if padding == "right" else real.flip(-1)
    ids = torch.randint(3, plain.config.vocab_size, mask.shape) * mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    calls = []
    real_lean = ld.lean_attention_cpu
    monkeypatch.setattr(ld, "lean_attention_cpu", lambda *a, **kw: calls.append(1) or real_lean(*a, **kw))
    with torch.no_grad(), flags.Context(LEAN_MIN_SKEW=0.0):
        want = _drive(plain, ids, mask=mask, pos=pos)
        got = _drive(fast, ids, mask=mask, pos=pos)
    _assert_same(got, want)
    assert bool(calls) == (padding == "left")


def test_a_4d_attention_mask_turns_sharing_off(models, spy):
    plain, fast = models
    ids = _shared_ids(plain)
    allowed = torch.ones(PROMPT, PROMPT, dtype=torch.bool).tril().repeat(ROWS, 1, 1, 1)
    allowed[ROWS // 2:, :, :, 3] = False  # half the rows never see key 3: same ids, different K/V
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    how = _cache_keyword(plain)
    with torch.no_grad():
        try:
            want = _call(plain, ids, None, how, mask)[0]
        except Exception as e:  # noqa: BLE001 - a transformers version without custom 4-D masks
            pytest.skip(f"this transformers takes no 4-D mask: {e}")
        got = _call(fast, ids, None, how, mask)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert not spy.prefill


def test_other_per_row_inputs_turn_sharing_off():
    """Inputs the planner cannot read (GPT-2's ``token_type_ids``) may make identical ids differ."""
    plain = build_model("gpt2", "sdpa")
    fast = graphtune.optimize(plain)
    ids = _shared_ids(plain)
    types = torch.zeros_like(ids)
    types[ROWS // 2:, 10:] = 1
    with torch.no_grad(), flags.Context(SHARED_PREFIX_MIN_PREFIX=16, SHARED_PREFIX_MIN_ROWS=2):
        want = plain(input_ids=ids, token_type_ids=types).logits
        got = fast(input_ids=ids, token_type_ids=types).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


# -- 4: rows moved in place: beam search's reorder_cache ------------------------------------------

def test_a_reorder_moving_rows_between_groups_of_prompts_that_end_alike_matches(models):
    """F6 (tests/fuzz): ``reorder_cache`` permutes a cache's rows in place, its length unchanged. Two
    prompts that differ but end with the same tokens (a chat template's tail) used to pass the plan's
    spot check (each segment's last key) after rows moved between the groups: logits off by ~3."""
    plain, fast = models
    how = _cache_keyword(plain)
    torch.manual_seed(2)
    a, b, tail = torch.randint(3, 500, (6,)), torch.randint(3, 500, (6,)), torch.randint(3, 500, (2,))
    ids = torch.stack([torch.cat([a, tail]), torch.cat([a, tail]), torch.cat([b, tail]), torch.cat([b, tail])])
    perm = torch.tensor([0, 2, 1, 3])
    with flags.Context(SHARED_PREFIX_MIN_PREFIX=3, SHARED_PREFIX_MIN_ROWS=2), torch.no_grad():
        results = []
        for m in (plain, fast):
            lo, cache = _call(m, ids, _new_cache(plain), how)
            cache.reorder_cache(perm)
            lo, cache = _call(m, lo[perm][:, -1:].argmax(-1), cache, how)
            lo2, _ = _call(m, lo[:, -1:].argmax(-1), cache, how)  # the stale plan stays unused
            results.append([lo, lo2])
    _assert_same(results[1], results[0])


def test_a_reorder_within_the_groups_keeps_the_plan(models, spy):
    plain, fast = models
    how = _cache_keyword(plain)
    ids = _shared_ids(plain, groups=2)  # rows r and r + 2 share their prompt
    perm = torch.tensor([2, 3, 0, 1, 6, 7, 4, 5])  # every row moves, each within its group
    with torch.no_grad():
        results = []
        for m in (plain, fast):
            lo, cache = _call(m, ids, _new_cache(plain), how)
            cache.reorder_cache(perm)
            lo, cache = _call(m, lo[perm][:, -1:].argmax(-1), cache, how)
            results.append([lo])
    _assert_same(results[1], results[0])
    assert len(spy.decode) >= plain.config.num_hidden_layers, "a harmless reorder dropped the plan"


def test_beam_search_generate_matches_the_plain_model(models, spy):
    """``generate(num_beams=4)`` reorders the cache's rows at every step (within each prompt's beams):
    the plan stays valid and in use, and the beams are the plain model's."""
    plain, fast = models
    tail = torch.randint(3, 500, (1, 3)).expand(2, -1)  # two prompts that differ but end alike
    ids = torch.cat([torch.randint(3, 500, (2, PROMPT - 3)), tail], 1)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=4, num_return_sequences=4,
              do_sample=False, early_stopping=False, pad_token_id=0)
    with torch.no_grad():
        want = plain.generate(ids, **kw)
        got = fast.generate(ids, **kw)
    assert torch.equal(got, want)
    # every decode step of every layer was decomposed: no reorder made the plan look stale
    assert len(spy.decode) >= (kw["max_new_tokens"] - 1) * plain.config.num_hidden_layers
    assert len({tuple(r) for r in want[:4, PROMPT:].tolist()}) > 1  # distinct beams: not a degenerate check


# -- threads ----------------------------------------------------------------------------------

def test_two_threads_on_one_optimized_model_match_the_plain_model(models, spy):
    plain, fast = models
    prompts = [_shared_ids(plain, groups=2), _shared_ids(plain, groups=1)]
    with torch.no_grad():
        want = [_drive(plain, p) for p in prompts]
    how = _cache_keyword(plain)
    got: list = [None, None]
    errors: list = []
    # A prefills, then B prefills, then both decode: with one state per model, A would decode
    # with B's plan (every row shares everything), which is wrong for A's two groups.
    a_done, b_done = threading.Event(), threading.Event()

    def request(i, wait, done):
        try:
            with torch.no_grad(), flags.Context(SHARED_PREFIX_MIN_PREFIX=16, SHARED_PREFIX_MIN_ROWS=2):
                if wait is not None:
                    assert wait.wait(300)
                lo, cache = _call(fast, prompts[i], None, how)
                done.set()
                if i == 0:
                    assert b_done.wait(300)
                out = [lo]
                for _ in range(STEPS):
                    lo, cache = _call(fast, out[-1][:, -1:].argmax(-1), cache, how)
                    out.append(lo)
                got[i] = out
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            a_done.set()
            b_done.set()

    threads = [threading.Thread(target=request, args=(0, None, a_done)),
               threading.Thread(target=request, args=(1, a_done, b_done))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for g, w in zip(got, want):
        _assert_same(g, w)
    assert spy.decode


# -- torch.compile(backend="graphtune") --------------------------------------------------------

def test_the_compile_backend_is_exact_and_leaves_per_batch_features_to_optimize(models, spy):
    """The backend has no batch context (graphtune.backend's docstring says why): its users get
    the rewrite and dispatch, never a shared-prefix plan, and the same logits."""
    plain, _ = models
    compiled = torch.compile(plain, backend="graphtune", options={"inductor": False})
    ids = _shared_ids(plain)
    with torch.no_grad():
        want = _drive(plain, ids, steps=1)
        got = _drive(compiled, ids, steps=1)
    _assert_same(got, want)
    assert not spy.decode and not spy.prefill


def test_forwards_nothing_can_speed_up_run_the_models_own_forward(models, spy, tmp_path):
    """Batch-1 decode of an SDPA model with no tuned records: no plan, nothing tuned, so the plain
    forward runs (no Dynamo guards); a shared-prompt batch still takes the graphtune path."""
    plain, fast = models
    ids = torch.randint(3, plain.config.vocab_size, (1, PROMPT))
    with flags.Context(DB=str(tmp_path / "empty.db")), torch.no_grad():
        before = fast.forward.plain_calls
        _assert_same(_drive(fast, ids), _drive(plain, ids))
        assert fast.forward.plain_calls - before == 1 + STEPS  # the prefill (causal, unpadded) and each step
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        before = fast.forward.plain_calls
        with torch.no_grad():
            got = fast(input_ids=padded, attention_mask=mask).logits
        torch.testing.assert_close(got, plain(input_ids=padded, attention_mask=mask).logits, atol=ATOL, rtol=ATOL)
        assert fast.forward.plain_calls == before  # a padded prefill: lean's plan needs the captured graph
        before = fast.forward.plain_calls
        shared = _shared_ids(plain)
        _assert_same(_drive(fast, shared), _drive(plain, shared))
        assert fast.forward.plain_calls == before  # the shared-prefix plan needs the captured graph
    assert spy.decode and spy.prefill


def test_eager_attention_models_always_take_the_rewritten_graph(tmp_path):
    plain = build_model("llama", "eager")
    fast = graphtune.optimize(plain)
    ids = torch.randint(3, plain.config.vocab_size, (1, PROMPT))
    with flags.Context(DB=str(tmp_path / "empty.db")), torch.no_grad():
        _assert_same(_drive(fast, ids), _drive(plain, ids))
    assert fast.forward.plain is None and fast.forward.plain_calls == 0
