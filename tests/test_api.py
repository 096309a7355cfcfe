"""Entry points: optimize / explain / the torch.compile backend, options, odd models."""
import json

import pytest
import torch
import torch.nn.functional as F

import graphtune
from graphtune.errors import OptionError
from graphtune.flags import Context, Options


class EagerAttention(torch.nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        w = torch.matmul(q, k.transpose(-2, -1)) / (D // self.heads) ** 0.5
        w = torch.softmax(w, dim=-1)
        return self.out(torch.matmul(w, v).transpose(1, 2).reshape(B, S, D))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.a(x))


class BreaksGraph(torch.nn.Module):
    """Attention behind data-dependent Python control flow: fx fails, Dynamo breaks the graph."""

    def forward(self, q, k, v):
        if q.sum() > 0:
            q = q * 2
        return F.scaled_dot_product_attention(q, k, v)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


def test_optimize_fx_path_rewrites_and_matches():
    m = EagerAttention().eval()
    x = torch.randn(2, 7, 32)
    fast = graphtune.optimize(m, (x,))
    assert isinstance(fast, torch.fx.GraphModule)
    targets = [n.target for n in fast.graph.nodes]
    assert torch.ops.graphtune.attention.default in targets
    torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    y = torch.randn(3, 11, 32)  # other shapes than the example inputs
    torch.testing.assert_close(fast(y), m(y), atol=1e-5, rtol=1e-5)


def test_optimize_without_example_inputs_captures_lazily_with_dynamo():
    m = EagerAttention().eval()
    fast = graphtune.optimize(m)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
    assert sum(len(r.sites) for r in fast.forward.backend.results) == 1


def test_model_without_attention_comes_back_unchanged_and_report_says_so():
    m = MLP()
    x = torch.randn(2, 8)
    assert graphtune.optimize(m, (x,)) is m
    rep = graphtune.explain(m, (x,))
    assert rep.sites == [] and "no attention sites" in str(rep)


def test_graph_breaks_fall_back_without_crashing():
    q = torch.randn(1, 2, 5, 8)
    rep = graphtune.explain(BreaksGraph(), (q, q, q))
    assert rep.capture == "dynamo" and rep.graph_breaks >= 1
    assert len(rep.sites) == 1
    fast = graphtune.optimize(BreaksGraph(), (q, q, q))
    torch.testing.assert_close(fast(q, q, q), BreaksGraph()(q, q, q), atol=1e-6, rtol=0)


def test_explain_report_lists_sites_and_serializes():
    m = EagerAttention().eval()
    rep = graphtune.explain(m, (torch.randn(2, 7, 32),))
    d = rep.to_dict()
    json.dumps(d)  # JSON-serializable
    (site,) = d["sites"]
    assert site["form"].startswith("eager") and site["q_shape"] == (2, 4, 7, 8)
    # the runtime features that may serve the site, then the default path, are named
    assert "default: SDPA" in site["implementation"], site["implementation"]
    assert "shared-prefix" in site["implementation"] and "lean decode" in site["implementation"]
    assert "attention sites: 1" in str(rep)
    assert "torch.compile(backend='graphtune') gets the rewrites and tuned dispatch only" in str(rep)


@pytest.mark.parametrize("bad,match", [
    ({"no_such_option": 1}, "unknown graphtune option 'no_such_option'"),
    ({"validate": "yes"}, "option validate must be bool"),
    ({"capture": "magic"}, "capture='magic' must be one of"),
    ({"rtol": -1.0}, "rtol and atol"),
    ({"inductor": 1}, "option inductor must be bool"),
])
def test_bad_options_raise_value_error_naming_the_option(bad, match):
    with pytest.raises(OptionError, match=match):
        graphtune.optimize(MLP(), **bad)
    with pytest.raises(ValueError):
        Options.from_kwargs(**bad)


def test_capture_fx_without_example_inputs_is_an_error():
    with pytest.raises(OptionError, match="needs example_inputs"):
        graphtune.optimize(MLP(), capture="fx")


def test_optimize_rejects_non_modules():
    with pytest.raises(OptionError, match="expects an nn.Module"):
        graphtune.optimize(lambda x: x)


def test_backend_rejects_unknown_option_at_first_call():
    f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend="graphtune", options={"bogus": True})
    with pytest.raises(Exception, match="unknown graphtune option 'bogus'"):
        f(torch.randn(1, 2, 4, 8))


def test_backend_registered_by_entry_point_runs_rewrite():
    from torch._dynamo import list_backends

    assert "graphtune" in list_backends(exclude_tags=())
    f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                      backend="graphtune", options={"inductor": False})
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    torch.testing.assert_close(f(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=0)


def test_flags_context_overrides_and_validates():
    with Context(DEBUG=2):
        assert graphtune.flags.get("DEBUG") == 2
    assert graphtune.flags.get("SPEC") is True  # tests run with the verifier on
    with pytest.raises(OptionError, match="unknown graphtune flag"):
        Context(NOPE=1)
    with pytest.raises(OptionError, match="must be int"):
        Context(DEBUG="x")


def _plain_only(x):
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain_only(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_plain_only(v) for v in x)
    return x is None or isinstance(x, (str, int, float, bool))


def test_explain_report_holds_plain_data_even_given_fake_tensors_and_symbolic_sizes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from graphtune.api import SiteReport

    env = ShapeEnv()
    with FakeTensorMode(shape_env=env) as mode:
        fake = mode.from_tensor(torch.randn(2, 3))
    sym = env.create_symintnode(env.create_symbol(7, source=torch._dynamo.source.ConstantSource("s")), hint=7)
    rep = graphtune.api.Report("M", "dynamo", 1, 0, sites=[
        SiteReport(0, "n", "m.attn", "sdpa", {"bias": fake, "len": sym}, "default", (2, 4, sym, 8), (2, 4, 7, 8))])
    d = rep.to_dict()
    json.dumps(d)
    assert _plain_only(d)
    assert d["sites"][0]["q_shape"] == (2, 4, 7, 8) and d["sites"][0]["details"]["bias"] == "tensor(2, 3):float32"


def test_explain_after_optimized_generate_serializes():
    pytest.importorskip("transformers")
    from graphtune.models import build_model

    m = build_model("llama", "sdpa")
    ids = torch.randint(3, 500, (2, 9))
    kw = dict(attention_mask=torch.ones_like(ids))
    fast = graphtune.optimize(m, engine=False)
    fast.generate(ids, **kw, max_new_tokens=3, do_sample=False, pad_token_id=0)  # decode recompiles: dynamic dims
    for model in (m, fast):
        d = graphtune.explain(model, {"input_ids": ids, **kw}).to_dict()
        json.dumps(d)
        assert _plain_only(d) and len(d["sites"]) == m.config.num_hidden_layers


def test_optimize_leaves_the_callers_model_untouched_and_shares_weights():
    pytest.importorskip("transformers")
    from graphtune.models import build_model

    m = build_model("llama", "sdpa")
    head, layer0 = m.lm_head, m.model.layers[0]
    fast = graphtune.optimize(m)
    fast.lm_head = torch.nn.Linear(1, 1)
    fast.model.layers[0] = torch.nn.Identity()
    fast.train()
    assert m.lm_head is head and m.model.layers[0] is layer0
    assert not any(mod.training for mod in m.modules()), "train() on the copy changed the original"
    assert all(mod.training for mod in fast.modules())
    # weights are shared, not copied
    fast2 = graphtune.optimize(m)
    assert fast2.model.embed_tokens.weight is m.model.embed_tokens.weight
    assert fast2.model.layers[1].self_attn is not m.model.layers[1].self_attn


def test_sparse_prefill_option_refuses_values_it_does_not_know_by_name():
    with pytest.raises(OptionError, match="sparse_prefill=True: want one of"):
        graphtune.optimize(MLP(), sparse_prefill=True)
    assert graphtune.flags.Options().sparse_prefill is None  # off unless asked


class TinyLM(torch.nn.Module):
    """The shape of a generation model to optimize(): ``generate`` and ``config`` make it Dynamo-captured."""

    config = None

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, q):
        return F.scaled_dot_product_attention(self.proj(q), q, q)

    def generate(self, *a, **k):  # pragma: no cover - never called
        raise NotImplementedError


def test_many_optimized_models_of_one_class_all_run_graphtune():
    # Dynamo keeps compiled code and its recompile limit (8) per code object: optimized models of
    # one class sharing `forward`'s code would silently fall back to eager after the 8th.
    q = torch.randn(1, 2, 5, 8)
    for i in range(12):
        m = TinyLM().eval()
        fast = graphtune.optimize(m)
        torch.testing.assert_close(fast(q), m(q), atol=1e-5, rtol=1e-5)
        assert sum(len(r.sites) for r in fast.forward.backend.results) == 1, f"model {i} ran without graphtune"


def test_recompiles_in_new_threads_keep_running_graphtune():
    import threading

    m = TinyLM().eval()
    fast = graphtune.optimize(m)
    errors = []

    def call(n):
        try:
            x = torch.randn(1, 2, n, 8)
            torch.testing.assert_close(fast(x), m(x), atol=1e-5, rtol=1e-5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    for n in range(3, 15):  # new shapes: recompiles, each from a fresh thread (default Dynamo config)
        t = threading.Thread(target=call, args=(n,))
        t.start()
        t.join()
    assert not errors, errors
    assert all(r.sites for r in fast.forward.backend.results)
    assert len(fast.forward.backend.results) >= 2


def test_deprecated_hydragen_flag_names_still_work_and_warn(monkeypatch):
    with pytest.warns(DeprecationWarning, match="use SHARED_PREFIX_MIN_ROWS"):
        with Context(HYDRAGEN_MIN_ROWS=3):
            assert graphtune.flags.get("SHARED_PREFIX_MIN_ROWS") == 3
    with pytest.warns(DeprecationWarning, match="use SHARED_PREFIX_MIN_PREFIX"):
        assert graphtune.flags.get("HYDRAGEN_MIN_PREFIX") == graphtune.flags.get("SHARED_PREFIX_MIN_PREFIX")
    monkeypatch.setenv("GRAPHTUNE_HYDRAGEN_MIN_PREFIX", "77")
    with pytest.warns(DeprecationWarning, match="GRAPHTUNE_HYDRAGEN_MIN_PREFIX is deprecated"):
        assert graphtune.flags.get("SHARED_PREFIX_MIN_PREFIX") == 77
    monkeypatch.setenv("GRAPHTUNE_SHARED_PREFIX_MIN_PREFIX", "12")  # the new name wins
    assert graphtune.flags.get("SHARED_PREFIX_MIN_PREFIX") == 12
