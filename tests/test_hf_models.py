"""HF causal LMs (small configs, random weights): every attention site replaced, logits equal,
greedy generate identical under optimize() and torch.compile(backend="graphtune"), with an
all-ones mask and with left padding (rows padded by different amounts, fully masked pad rows)."""
import pytest
import torch

import graphtune
from graphtune.models import ATTN_IMPLEMENTATIONS, FAMILIES, build_model

pytest.importorskip("transformers")

CASES = [(fam, impl) for fam in FAMILIES for impl in ATTN_IMPLEMENTATIONS[fam]]
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _captured_path(monkeypatch):
    # these tests check the captured, rewritten forward; an SDPA model with nothing planned and no
    # tuned record would run its own forward instead (tests/runtime/test_hf_usage.py covers that)
    from graphtune.api import _OptimizedForward

    monkeypatch.setattr(_OptimizedForward, "PLAIN_WHEN_IDLE", False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo caches compiled frames per code object; every test builds new model instances.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(model, batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g)
    return ids, torch.ones_like(ids)


def _left_padded(model, length=9, pads=(0, 2, 5), seed=1):
    """One row per amount of left padding (pad id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("family,impl", CASES)
def test_every_attention_site_is_replaced_and_logits_match(family, impl):
    model = build_model(family, impl)
    ids, mask = _inputs(model)
    report = graphtune.explain(model, {"input_ids": ids, "attention_mask": mask})
    assert len(report.sites) == model.config.num_hidden_layers, str(report)
    assert report.passes["canonicalize_attention"] == model.config.num_hidden_layers
    fast = graphtune.optimize(model)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = fast(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert fast.forward.backend.results, "optimize did not capture the forward"
    assert sum(len(r.sites) for r in fast.forward.backend.results) == model.config.num_hidden_layers


@pytest.mark.parametrize("family,impl", CASES)
def test_generate_identical_tokens_with_optimize(family, impl):
    model = build_model(family, impl)
    ids, mask = _inputs(model)
    ref = _generate(model, ids, mask)
    fast = graphtune.optimize(model, engine=False)  # the captured forward inside HF's loop (the engine: tests/runtime/engine)
    out = _generate(fast, ids, mask)
    assert torch.equal(out, ref)
    # prefill and decode graphs are captured once each, not once per decoding step
    n_graphs = len(fast.forward.backend.results)
    out2 = _generate(fast, ids, mask)
    assert torch.equal(out2, ref)
    assert len(fast.forward.backend.results) == n_graphs
    assert n_graphs <= 4
    assert all(len(r.sites) == model.config.num_hidden_layers for r in fast.forward.backend.results)


@pytest.mark.parametrize("family,impl", CASES)
def test_left_padded_logits_match_at_every_position(family, impl):
    # Pad rows attend to nothing (or only to pads): every position must still equal eager's.
    model = build_model(family, impl)
    ids, mask = _left_padded(model)
    report = graphtune.explain(model, {"input_ids": ids, "attention_mask": mask})
    assert len(report.sites) == model.config.num_hidden_layers, str(report)
    fast = graphtune.optimize(model)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = fast(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert all(len(r.sites) == model.config.num_hidden_layers for r in fast.forward.backend.results)


@pytest.mark.parametrize("family,impl", CASES)
def test_left_padded_generate_identical_tokens(family, impl):
    model = build_model(family, impl)
    ids, mask = _left_padded(model)
    ref = _generate(model, ids, mask)
    fast = graphtune.optimize(model, engine=False)
    assert torch.equal(_generate(fast, ids, mask), ref)
    assert all(len(r.sites) == model.config.num_hidden_layers for r in fast.forward.backend.results)


@pytest.mark.parametrize("family,impl", CASES)
def test_generate_identical_tokens_under_torch_compile_backend(family, impl):
    model = build_model(family, impl)
    ids, mask = _inputs(model)
    ref = _generate(model, ids, mask)
    model.forward = torch.compile(model.forward, backend="graphtune", options={"inductor": False})
    out = _generate(model, ids, mask)
    assert torch.equal(out, ref)


def test_generate_with_optimize_leaves_the_original_model_untouched():
    model = build_model("llama", "sdpa")
    fast = graphtune.optimize(model)
    assert fast is not model and "forward" not in vars(model)
    assert fast.model is not model.model  # its own module tree (see tests/test_api.py) ...
    assert fast.model.embed_tokens.weight is model.model.embed_tokens.weight  # ... sharing the weights


def test_torch_compile_backend_with_inductor_matches_and_hits_fx_graph_cache():
    from torch._dynamo.utils import counters

    model = build_model("llama", "sdpa")
    ids, mask = _inputs(model)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        compiled = torch.compile(model, backend="graphtune")
        out = compiled(ids, attention_mask=mask).logits
        torch.testing.assert_close(out, ref, **FP32_TOL)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="graphtune")
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, ref, **FP32_TOL)
    # the rewritten graph is cacheable: the second compile is an Inductor FX-graph-cache hit
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])


@pytest.mark.parametrize("family", ["gpt2"])
def test_inductor_accepts_transposed_queries(family):
    # GPT-2/OPT feed q to attention as a transposed view; the op's output must still match the
    # contiguous layout its fake implementation promises Inductor.
    model = build_model(family, "eager")
    ids, mask = _inputs(model)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = torch.compile(model, backend="graphtune")(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, **FP32_TOL)
