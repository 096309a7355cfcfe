"""The selectors' cost rules in a Hugging Face loop driven by hand (``model(...)`` with HF's own
cache, as benchmarks/bench_hf_loop.py times it): the plain model is the oracle for every logit.

* a ragged, left-padded batch whose short rows share only padding gets no shared-prefix plan (that
  plan made every decode step gather the cache), and lean decode serves its decode steps instead;
* an unpadded prompt's causal mask (materialized by HF under Dynamo) runs as SDPA ``is_causal``.
"""
import inspect

import pytest
import torch

pytest.importorskip("transformers")

import graphtune  # noqa: E402
from graphtune import flags  # noqa: E402
from graphtune.models import build_model  # noqa: E402
from graphtune.runtime import lean_decode as ld  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
    torch._dynamo.reset()
    plain = build_model("llama", "sdpa")
    yield plain, graphtune.optimize(plain, engine=False)
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def _loop(model, ids, mask, steps=3):
    """Prefill with generate-style positions, then greedy decode steps: logits of every call."""
    kw = _cache_kw(model)
    cache = _new_cache(model)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
        logits = [out.logits]
        pos = pos[:, -1:]
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            out = model(input_ids=logits[-1][:, -1:].argmax(-1), attention_mask=mask, position_ids=pos,
                        use_cache=True, **{kw: cache})
            logits.append(out.logits)
    return logits


def _same(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=ATOL, msg=lambda m: f"call {i}: {m}")


def test_a_ragged_batch_sharing_only_padding_decodes_with_lean_not_shared_prefix(models, spy, monkeypatch):
    plain, fast = models
    lengths = [60] + [12] * 5  # 5 rows share 48 identically padded positions (>= the spy's 16 tokens, 2 rows)
    S = max(lengths)
    mask = (torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]).long()
    ids = torch.randint(3, plain.config.vocab_size, mask.shape) * mask
    lean = []
    real = ld.lean_attention_cpu
    monkeypatch.setattr(ld, "lean_attention_cpu", lambda *a, **kw: lean.append(a[0].shape) or real(*a, **kw))
    with flags.Context(LEAN_MIN_SKEW=0.0):  # toy sizes: far below the measured rule
        want = _loop(plain, ids, mask)
        got = _loop(fast, ids, mask)
    _same(got, want)
    assert not spy.decode, "a plan of shared padding was used at decode"
    assert len(lean) >= 3 * plain.config.num_hidden_layers, "lean decode did not serve the decode steps"


def test_an_unpadded_prompts_causal_mask_runs_as_is_causal(models, monkeypatch):
    plain, fast = models
    # the captured graph (what runs when tuned records exist or the model's attention is eager): an
    # SDPA model without either runs its own forward for this prefill, which skips the mask itself
    monkeypatch.setattr(fast.forward, "plain", None)
    ids = torch.randint(3, plain.config.vocab_size, (2, 40))
    verdicts = []
    real = ld.is_causal_mask
    monkeypatch.setattr(ld, "is_causal_mask", lambda *a: verdicts.append(real(*a)) or verdicts[-1])
    want = _loop(plain, ids, torch.ones_like(ids))
    got = _loop(fast, ids, torch.ones_like(ids))
    _same(got, want)
    assert verdicts and all(verdicts), "the prefill's mask was not recognised as causal"
