"""The engine's tuned linear layers (:mod:`graphtune.runtime.engine.linear`).

Routing is inert outside ``LinearRouter.active()`` and with an untuned database; survives deepcopy
and double installation; obeys ``ENGINE_TUNED_LINEAR`` and ``ENGINE_LINEAR_MAX_ROWS``; a model
tuned with ``tune_linears`` (and one forced onto ``cpu.wt`` everywhere) generates exactly HF's
greedy tokens, with and without speculation; a tuned implementation that raises falls back to
``F.linear`` with one warning per shape.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import graphtune  # noqa: E402
from graphtune import flags  # noqa: E402
from graphtune.autotune import db as dbmod  # noqa: E402
from graphtune.autotune import fingerprint  # noqa: E402
from graphtune.autotune.db import Record  # noqa: E402
from graphtune.autotune.tuner import is_valid, load_impls  # noqa: E402
from graphtune.autotune.workers import merge  # noqa: E402
from graphtune.codegen import registry  # noqa: E402
from graphtune.codegen.linear.cpu import linear_wt  # noqa: E402
from graphtune.codegen.linear.key import LinearShape  # noqa: E402
from graphtune.codegen.registry import KernelConfig, get_impl  # noqa: E402
from graphtune.models import build_model  # noqa: E402
from graphtune.runtime import dispatch  # noqa: E402
from graphtune.runtime.engine.linear import LinearRouter, model_linear_shapes, tune_linears  # noqa: E402

load_impls("cpu")

PAD = 0
NEW = 8
_models: dict[str, nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # like the other engine tests: one intra-op thread (tuning keys carry the thread count, so
    # tuning and generation below run at the same one)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="module")
def _no_shipped_records(tmp_path_factory):
    # private databases start empty (no shipped records imported)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dbmod, "SHIPPED_DIR", tmp_path_factory.mktemp("no-shipped-records"))
        yield


def _llama() -> nn.Module:
    if "llama" not in _models:
        _models["llama"] = build_model("llama", "sdpa")
    return _models["llama"]


def _prompts(batch: int, seed: int = 5) -> list[list[int]]:
    """Ragged prompts with repeated phrases (prompt lookup finds matches)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        phrase = torch.randint(3, 512, (3 + i % 3,), generator=g).tolist()
        out.append(phrase * (2 + i % 2) + torch.randint(3, 512, (1 + 5 * i,), generator=g).tolist())
    return out


def _hf_row(model, prompt: list[int], new: int = NEW) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


_hf_cache: dict[tuple, list[int]] = {}


def _hf(prompt: list[int]) -> list[int]:
    k = tuple(prompt)
    if k not in _hf_cache:
        _hf_cache[k] = _hf_row(_llama(), prompt)
    return _hf_cache[k]


def _seq(lin: nn.Linear) -> nn.Sequential:
    return nn.Sequential(lin)


class _Spy:
    """Replaces dispatch.tuned_call: records the calls and answers ``answer``."""

    def __init__(self, answer=None):
        self.calls, self.answer = [], answer

    def __call__(self, op, args):
        self.calls.append((op, tuple(args[0].shape), tuple(args[1].shape), args[2] is not None))
        return self.answer


def _wt_call(pad: int = 4):
    cfg = KernelConfig.make(PAD=pad)
    log = []

    def call(x, w, b=None):
        log.append(x.shape[0])
        return linear_wt(x, w, b, config=cfg)

    call.impl_name, call.config, call.log = "cpu.wt", cfg, log
    return call


def _force_wt(path: str, model: nn.Module, pad: int = 4, rows=tuple(range(1, 17)), impl_name: str = "cpu.wt") -> int:
    """Write records choosing ``impl_name`` at ``PAD=pad`` for every linear shape of ``model`` at
    ``rows`` (exact keys) and for the many-row bucket, at this thread count."""
    impl = get_impl("linear", impl_name)
    fp = fingerprint.current("cpu")
    store = dbmod.get_db(path)
    n = 0
    for out_f, in_f, dt in model_linear_shapes(model):
        for m in (*rows, 64):
            shape = LinearShape(m, out_f, in_f, dt)
            key = shape.key()
            merge(store, Record("linear", impl.name, impl.source_hash, fp.device, fp.device_name, fp.versions,
                                key.shape_key, key.q_bucket, key.kv_bucket, KernelConfig.make(PAD=pad).to_dict(),
                                10.0, 9.0, 11.0, 3, 20.0, "measured", shape.to_dict()))
            n += 1
    return n


# ------------------------------------------------------------------------------ the router alone


def test_router_outside_active_is_bit_identical_to_f_linear_and_never_asks_dispatch(monkeypatch):
    spy = _Spy(_wt_call())
    monkeypatch.setattr(dispatch, "tuned_call", spy)
    lin = nn.Linear(13, 7)
    r = LinearRouter(_seq(lin))
    assert "forward" in lin.__dict__ and r.modules == [lin]
    for shape in ((3, 13), (2, 5, 13), (1, 1, 13)):
        x = torch.randn(*shape)
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert spy.calls == [] and r.served == {}
    assert r.describe() == "linear layers: no call routed yet"


def test_router_with_empty_database_routes_to_f_linear_and_reports_cpu_aten(tmp_path):
    lin = nn.Linear(8, 4)
    with flags.Context(DB=str(tmp_path / "empty.db")):
        r = LinearRouter(_seq(lin))
        x = torch.randn(2, 8)
        with torch.no_grad(), r.active():
            y = lin(x)
            y3 = lin(x[None])
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    assert torch.equal(y3, F.linear(x[None], lin.weight, lin.bias)) and y3.shape == (1, 2, 4)
    assert r.served == {(2, 4, 8): "cpu.aten"}
    assert "0 of 1 (rows, out, in) shapes tuned" in r.describe() and "rows seen 2..2" in r.describe()


def test_router_inside_active_calls_the_tuned_callable_on_flattened_rows_and_reshapes(monkeypatch):
    call = _wt_call(pad=4)
    spy = _Spy(call)
    monkeypatch.setattr(dispatch, "tuned_call", spy)
    lin = nn.Linear(13, 7)
    r = LinearRouter(_seq(lin))
    x = torch.randn(1, 3, 13)
    with torch.no_grad(), r.active():
        y = lin(x)
        y2 = lin(x)  # the router's per-forward table answers the repeat
    assert y.shape == (1, 3, 7) and torch.equal(y, y2)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    assert spy.calls == [("linear", (3, 13), (7, 13), True)]
    assert call.log == [3, 3]
    assert r.served == {(3, 7, 13): "cpu.wt[PAD=4;w4;s2]"}
    d = r.describe()
    assert "1 of 1 (rows, out, in) shapes tuned" in d and "cpu.wt[PAD=4;w4;s2]" in d


def test_deepcopy_of_a_routed_model_uses_the_copys_weights(monkeypatch):
    monkeypatch.setattr(dispatch, "tuned_call", _Spy(_wt_call()))
    model = _seq(nn.Linear(8, 4))
    r = LinearRouter(model)
    twin = copy.deepcopy(model)
    assert twin[0].forward.__self__ is twin[0] and model[0].forward.__self__ is model[0]
    with torch.no_grad():
        twin[0].weight.mul_(-2.0)
        twin[0].bias.add_(1.0)
    x = torch.randn(3, 8)
    want_twin = F.linear(x, twin[0].weight, twin[0].bias)
    want_orig = F.linear(x, model[0].weight, model[0].bias)
    assert not torch.allclose(want_twin, want_orig)
    assert torch.equal(twin(x), want_twin) and torch.equal(model(x), want_orig)
    with torch.no_grad(), r.active():
        got_twin, got_orig = twin(x), model(x)
    torch.testing.assert_close(got_twin, want_twin, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_orig, want_orig, atol=1e-5, rtol=1e-5)


def test_installing_the_router_twice_is_idempotent(monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(dispatch, "tuned_call", spy)
    lin = nn.Linear(8, 4)
    model = _seq(lin)
    r1 = LinearRouter(model)
    fwd = lin.__dict__["forward"]
    r2 = LinearRouter(model)
    assert lin.__dict__["forward"] is fwd and r2.modules == [lin]
    x = torch.randn(2, 8)
    with torch.no_grad(), r2.active():
        y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    assert len(spy.calls) == 1 and r2.served == {(2, 4, 8): "cpu.aten"} and r1.served == {}


def test_subclasses_of_linear_keep_their_own_forward():
    class Lora(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 4), Lora(4, 6))
    r = LinearRouter(model)
    assert r.modules == [model[0]] and "forward" not in model[1].__dict__
    assert model_linear_shapes(model) == [(4, 8, "float32")]


def test_engine_tuned_linear_false_at_construction_disables_routing(monkeypatch):
    spy = _Spy(_wt_call())
    monkeypatch.setattr(dispatch, "tuned_call", spy)
    lin = nn.Linear(8, 4)
    with flags.Context(ENGINE_TUNED_LINEAR=False):
        r = LinearRouter(_seq(lin))
    assert not r.enabled
    x = torch.randn(2, 8)
    with torch.no_grad(), r.active():
        y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias)) and spy.calls == [] and r.served == {}
    assert r.describe() == "linear layers: F.linear (ENGINE_TUNED_LINEAR=0)"
    # the flag is read at construction: setting it later does not re-enable this router
    with flags.Context(ENGINE_TUNED_LINEAR=True), torch.no_grad(), r.active():
        lin(x)
    assert spy.calls == []


def test_rows_above_max_rows_and_tensors_requiring_grad_go_to_f_linear(monkeypatch):
    call = _wt_call()
    spy = _Spy(call)
    monkeypatch.setattr(dispatch, "tuned_call", spy)
    lin = nn.Linear(8, 4)
    with flags.Context(ENGINE_LINEAR_MAX_ROWS=4):
        r = LinearRouter(_seq(lin))
    assert r.max_rows == 4
    with r.active():
        with torch.no_grad():
            x5 = torch.randn(5, 8)
            assert torch.equal(lin(x5), F.linear(x5, lin.weight, lin.bias))
            x_b = torch.randn(1, 5, 8)  # 5 rows once flattened
            assert torch.equal(lin(x_b), F.linear(x_b, lin.weight, lin.bias))
            assert spy.calls == []
            lin(torch.randn(4, 8))  # at the limit: routed
            assert len(spy.calls) == 1 and call.log == [4]
        xg = torch.randn(2, 8, requires_grad=True)
        y = lin(xg)
        assert y.requires_grad and torch.equal(y, F.linear(xg, lin.weight, lin.bias))
        y.sum().backward()
        assert xg.grad is not None
    assert len(spy.calls) == 1 and call.log == [4] and set(r.served) == {(4, 4, 8)}


def test_router_drops_its_table_when_the_database_changes(tmp_path):
    lin = nn.Linear(64, 32)
    path = str(tmp_path / "t.db")
    x = torch.randn(2, 64)
    with flags.Context(DB=path):
        r = LinearRouter(_seq(lin))
        with torch.no_grad(), r.active():
            lin(x)
        assert r.served == {(2, 32, 64): "cpu.aten"}
        _force_wt(path, _seq(lin), pad=4, rows=(2,))  # a write: the next active() block re-asks
        with torch.no_grad(), r.active():
            y = lin(x)
    assert r.served == {(2, 32, 64): "cpu.wt[PAD=4;w4;s2]"}
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


def test_a_tuned_impl_that_raises_falls_back_to_f_linear_with_one_warning(tmp_path, monkeypatch):
    wt = get_impl("linear", "cpu.wt")
    boom_calls = []

    def boom(x, w, b=None, *, config):
        boom_calls.append(x.shape[0])
        raise RuntimeError("kernel exploded")

    # same name and source hash: the stored record stays valid, the call raises
    monkeypatch.setitem(registry._REGISTRY, ("linear", "cpu.wt"), dataclasses.replace(wt, fn=boom))
    lin = nn.Linear(64, 32)
    path = str(tmp_path / "t.db")
    x = torch.randn(2, 64)
    with flags.Context(DB=path):
        _force_wt(path, _seq(lin), pad=4, rows=(2,))
        r = LinearRouter(_seq(lin))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad(), r.active():
                ys = [lin(x) for _ in range(3)]
            with torch.no_grad(), r.active():
                ys.append(lin(x))
        # dispatch forgets the failed choice for this key
        assert dispatch.tuned_call("linear", (x, lin.weight, lin.bias)) is None
    msgs = [str(w.message) for w in caught if "graphtune" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "cpu.wt[PAD=4;w4;s2] of linear failed on shapes" in msgs[0] and "(RuntimeError: kernel exploded)" in msgs[0]
    assert "using the default path for this shape" in msgs[0]
    want = F.linear(x, lin.weight, lin.bias)
    assert all(torch.equal(y, want) for y in ys)
    assert boom_calls and boom_calls[0] == 2


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory, _no_shipped_records):
    """A private database with tune_linears's records for the tiny llama at rows 1..3."""
    model = _llama()
    path = str(tmp_path_factory.mktemp("linear-tuned") / "t.db")
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the module fixture's count (module fixtures' order is not guaranteed)
    try:
        with flags.Context(DB=path):
            res = tune_linears(model, rows=(1, 2, 3), budget_s=4.0)
    finally:
        torch.set_num_threads(old)
    return path, res


def test_tune_linears_stores_a_valid_record_for_every_linear_shape_of_the_model(tuned_db):
    path, res = tuned_db
    model = _llama()
    shapes = model_linear_shapes(model)
    assert {(o, i) for o, i, _ in shapes} == {(64, 64), (32, 64), (128, 64), (64, 128), (512, 64)}
    assert len(res) == 3 * len(shapes) and all(r.op == "linear" and r.record_id for r in res)
    recs = dbmod.get_db(path).records()
    assert all(r.op == "linear" and is_valid(r) for r in recs)
    got = {(r.shape["out_features"], r.shape["in_features"], r.shape["rows"]) for r in recs}
    assert got == {(o, i, m) for o, i, _ in shapes for m in (1, 2, 3)}
    assert {r.shape["threads"] for r in recs} == {1}
    assert all(r.impl in ("cpu.aten", "cpu.wt") for r in recs)


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_engine_with_tuned_linears_equals_hf_greedy_for_one_and_ragged_rows(tuned_db, speculative):
    path, _ = tuned_db
    model = _llama()
    with flags.Context(DB=path):
        for prompts in (_prompts(1, seed=1), _prompts(4, seed=2)):
            eng = graphtune.Engine(model, speculative=speculative)
            res = eng.generate(prompts, NEW)
            for row, p in enumerate(prompts):
                assert res.sequences[row] == _hf(p), f"batch {len(prompts)} row {row}"
            served = eng.runner.linears.served
            assert served and {k[1:] for k in served} == {(o, i) for o, i, _ in model_linear_shapes(model)}
            d = eng.runner.linears.describe()
            assert f"of {len(served)} (rows, out, in) shapes tuned" in d
            # shapes with a record at 1..3 rows are served by what the database chose
            assert all(v == "cpu.aten" or v.startswith("cpu.wt[") for v in served.values())


def test_engine_forced_onto_cpu_wt_everywhere_equals_hf_greedy(tmp_path):
    model = _llama()
    path = str(tmp_path / "wt.db")
    prompts = _prompts(4, seed=3)
    with flags.Context(DB=path):
        assert _force_wt(path, model, pad=4) == 17 * 5
        for spec in (None, "ngram"):
            eng = graphtune.Engine(model, speculative=spec)
            res = eng.generate(prompts, NEW)
            for row, p in enumerate(prompts):
                assert res.sequences[row] == _hf(p), f"speculative={spec} row {row}"
            served = eng.runner.linears.served
            assert served and all(v == "cpu.wt[PAD=4;w4;s2]" for v in served.values()), served
            assert any(k[0] < 4 for k in served)  # padded rows in a decode step
            d = eng.runner.linears.describe()
            assert f"{len(served)} of {len(served)} (rows, out, in) shapes tuned" in d
            assert "e.g. cpu.wt[PAD=4;w4;s2]" in d


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_forced_onto_onednn_packed_weights_equals_hf_greedy_with_speculation(tmp_path, family):
    """cpu.onednn everywhere (decode, verify and prefill rows; qwen2's q/k/v have biases), every
    drafter kind: still HF's greedy tokens."""
    if family == "llama":
        model = _llama()
    else:
        from graphtune.models import build_model

        model = build_model("qwen2", "sdpa")
    if not get_impl("linear", "cpu.onednn").supports((torch.randn(2, 8), torch.randn(4, 8), None)):
        pytest.skip("oneDNN packed linear unavailable in this torch build")
    path = str(tmp_path / "onednn.db")
    prompts = _prompts(4, seed=5)
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]
    with flags.Context(DB=path):
        _force_wt(path, model, rows=tuple(range(1, 17)), impl_name="cpu.onednn")
        for spec in (None, "ngram", graphtune.DynamicTreeDrafter(layers=1, tokens=6)):
            eng = graphtune.Engine(model, speculative=spec)
            res = eng.generate(prompts, NEW)
            assert res.sequences == want, f"{family} speculative={spec}"
            served = eng.runner.linears.served
            assert served and all(v.startswith("cpu.onednn") for v in served.values()), served


def test_engine_with_a_raising_tuned_linear_still_equals_hf_greedy_warning_once_per_shape(tmp_path, monkeypatch):
    wt = get_impl("linear", "cpu.wt")

    def boom(x, w, b=None, *, config):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(registry._REGISTRY, ("linear", "cpu.wt"), dataclasses.replace(wt, fn=boom))
    model = _llama()
    path = str(tmp_path / "boom.db")
    prompts = _prompts(2, seed=4)
    with flags.Context(DB=path):
        _force_wt(path, model, pad=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng = graphtune.Engine(model)
            res = eng.generate(prompts, NEW)
    for row, p in enumerate(prompts):
        assert res.sequences[row] == _hf(p), f"row {row}"
    msgs = [str(w.message) for w in caught if "kernel exploded" in str(w.message)]
    served = eng.runner.linears.served
    assert msgs and len(msgs) == len(served)  # one warning per (rows, out, in) shape
    # the router stops calling a failed implementation: the shape is served by F.linear from then on
    assert all(v == "cpu.aten (tuned implementation failed)" for v in served.values()), served


def test_engine_with_tuned_linear_disabled_routes_nothing(tmp_path):
    model = _llama()
    path = str(tmp_path / "off.db")
    prompts = _prompts(1, seed=1)
    with flags.Context(DB=path):
        _force_wt(path, model, rows=(1,))
        with flags.Context(ENGINE_TUNED_LINEAR=False):
            eng = graphtune.Engine(model)
        res = eng.generate(prompts, NEW)
    assert res.sequences[0] == _hf(prompts[0])
    assert eng.runner.linears.served == {}
    assert "ENGINE_TUNED_LINEAR=0" in eng.runner.linears.describe()


def test_routed_linears_add_no_graph_break_to_a_dynamo_capture():
    """optimize() builds the engine (and so the routed forwards) before Dynamo captures the model:
    the routing must be invisible to the trace (a ContextVar.get once broke the graph at every
    linear, and the capture then saw one attention site per graph)."""
    import torch._dynamo

    model = _llama()
    LinearRouter(model)
    assert all("forward" in m.__dict__ for m in model.modules() if type(m) is nn.Linear)
    ids = torch.tensor([_prompts(1, seed=2)[0]])
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch._dynamo.explain(model)(ids)
    assert out.graph_break_count == 0, out.break_reasons
    assert out.graph_count == 1
