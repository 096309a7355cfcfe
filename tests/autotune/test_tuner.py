"""The autotuner: failing candidates score inf, measured CPU tuning picks a valid winner, strategies,
cost models, static mode, shape keys and budgets."""
import math
import time

import pytest
import torch

from graphtune import flags
from graphtune.autotune import (AttentionShape, Budget, MergeShape, TuningDB, key_for_args, parse_budget, parse_shape,
                                pow2_bucket, summary_table, tune_shape, tune_shapes, tune_static)
from graphtune.autotune import search
from graphtune.autotune.measure import Candidate, Measurement, run_with_timeout
from graphtune.autotune.tuner import default_candidate, is_valid
from graphtune.codegen.attention.cpu import flash_attention
from graphtune.codegen.registry import Impl, KernelConfig, get_impl
from graphtune.errors import OptionError, ShapeError
from graphtune.ir.reference import attention_ref

SHAPE = AttentionShape(1, 4, 2, 1, 300, 16)


def fake(name, fn):
    return Candidate(Impl("attention_with_lse", name, "cpu", fn, KernelConfig.make(X=0), lambda a: [], "h"),
                     KernelConfig.make(X=1))


def crash(*a, config):
    raise RuntimeError("kernel exploded")


def wrong(*a, config):
    out, lse = flash_attention(*a)
    return out + 0.5, lse


def hang(*a, config):
    time.sleep(60.0)  # far past the bound below, which leaves room for a loaded machine
    return flash_attention(*a)


def slow_but_right(*a, config):
    # 50 ms: a loaded CI machine (2 xdist workers on 2 cores) once let a 2 ms sleeper beat the real kernel
    time.sleep(0.05)
    return flash_attention(*a)


@pytest.fixture
def db(tmp_path):
    d = TuningDB(tmp_path / "t.db")
    yield d
    d.close()


def test_crashing_wrong_and_hanging_candidates_score_inf_and_do_not_stop_the_run(db):
    cands = [fake("crash", crash), fake("wrong", wrong), fake("hang", hang), fake("slow", slow_but_right)]
    with flags.Context(TUNE_TIMEOUT=0.5):
        t0 = time.monotonic()
        res = tune_shape(SHAPE, "exhaustive", Budget(reps=3), db=db, candidates=cands)
        assert time.monotonic() - t0 < 30.0  # did not wait for the hung candidate (3.5 s on a loaded machine)
    why = {f.split("[")[0]: f for f in res.failures}
    assert set(why) == {"crash", "wrong", "hang"}
    assert "crashed: RuntimeError: kernel exploded" in why["crash"]
    assert "wrong: out differs" in why["wrong"] and "timeout" in why["hang"]
    assert res.impl == "cpu.flash"  # the default beats the 50 ms sleeper
    assert res.median_us is not None and math.isfinite(res.median_us)
    # the worker abandoned to the hang is replaced: later runs still work
    assert run_with_timeout(lambda: 41 + 1, 5.0) == 42


def test_measured_tuning_on_cpu_stores_a_valid_winner(db):
    shape = AttentionShape(1, 8, 2, 1, 1024, 32)
    res = tune_shape(shape, "exhaustive", Budget(seconds=20, reps=3), db=db)
    assert res.n_tried >= 10 and not res.failures
    impl = get_impl("attention_with_lse", res.impl)
    cfg = KernelConfig.from_dict(res.config)
    args = shape.make_args(seed=3)
    assert impl.supports(args)
    out, lse = impl.fn(*args, config=cfg)
    want = attention_ref(*args)
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=0)
    [r] = db.records()
    assert (r.impl, r.mode, r.record_id) == (res.impl, "measured", res.record_id) and is_valid(r)
    assert r.median_us == res.median_us and r.p20_us <= r.median_us <= r.p80_us and r.n_samples >= 3
    assert r.default_us == res.default_us and (r.q_bucket, r.kv_bucket) == (1, 1024)
    assert res.speedup >= 1.0  # a challenger displaces the default only when faster
    assert res.impl in summary_table([res]) and "x" in summary_table([res]).splitlines()[2]


def test_tune_shapes_splits_the_time_budget_and_reports_each_shape(db):
    shapes = [AttentionShape(1, 2, 2, 1, 512, 16), AttentionShape(2, 2, 1, 16, 16, 16, causal=True)]
    t0 = time.monotonic()
    res = tune_shapes(shapes, budget_s=3.0, db=db)
    assert time.monotonic() - t0 < 12.0
    assert [r.shape for r in res] == shapes and all(r.median_us for r in res)
    assert db.count() == 2


def test_merge_states_tuning_checks_against_its_reference(db):
    shape = MergeShape(4, 1, 8, 1, 64)
    broken = fake("merge_wrong", lambda outs, lses, config: (outs[0], lses[0]))
    res = tune_shape(shape, "exhaustive", Budget(reps=3), db=db,
                     candidates=[default_candidate("merge_states", "cpu"), broken,
                                 Candidate(get_impl("merge_states", "cpu.torch"), KernelConfig.make(STACKED=0))])
    assert res.op == "merge_states" and res.impl == "cpu.torch" and res.n_tried == 3
    assert len(res.failures) == 1 and "merge_wrong" in res.failures[0] and "wrong" in res.failures[0]
    [r] = db.records()
    assert r.op == "merge_states" and (r.q_bucket, r.kv_bucket) == (1, 4) and r.shape["n_partials"] == 4


def _fake_measure(costs, log):
    def measure(c, reps):
        log.append((c.config["X"], reps))
        return Measurement(c, costs[c.config["X"]], n_samples=reps)
    return measure


def _cands(n):
    impl = Impl("attention_with_lse", "f", "cpu", crash, KernelConfig.make(X=-1), lambda a: [], "h")
    return [Candidate(impl, KernelConfig.make(X=i)) for i in range(n)]


def test_successive_halving_finds_the_best_with_fewer_reps_than_exhaustive():
    costs = [5.0, 3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 4.0]
    log_sh, log_ex = [], []
    ms = search.successive_halving(_cands(8), _fake_measure(costs, log_sh), Budget(reps=8).start())
    best = min(ms, key=lambda m: (-m.round, m.median_us))
    assert best.candidate.config["X"] == 3
    search.exhaustive(_cands(8), _fake_measure(costs, log_ex), Budget(reps=8).start())
    assert sum(r for _, r in log_sh) < sum(r for _, r in log_ex)
    assert {x for x, r in log_sh if r > 2} < set(range(8))  # losers were not re-measured


def test_random_strategy_is_seeded_and_respects_candidate_budget():
    runs = []
    for seed in (7, 7, 8):
        log = []
        search.random_sample(_cands(10), _fake_measure([1.0] * 10, log), Budget(max_candidates=4).start(), seed)
        runs.append([x for x, _ in log])
    assert runs[0] == runs[1] and len(runs[0]) == 4 and runs[0] != runs[2]


def test_time_budget_stops_the_search():
    def measure(c, reps):
        time.sleep(0.05)
        return Measurement(c, 1.0)
    ms = search.exhaustive(_cands(100), measure, Budget(seconds=0.3).start())
    assert 2 <= len(ms) <= 10


def test_cost_model_preranks_and_prunes():
    class ByX:
        def predict(self, candidate, shape):
            x = candidate.config["X"]
            return math.inf if x == 0 else float(10 - x)

    assert isinstance(ByX(), search.CostModel)
    kept = search.prerank(_cands(8), ByX(), SHAPE, keep=0.5)
    assert [c.config["X"] for c in kept] == [7, 6, 5, 4]


def test_cost_model_order_reaches_the_tuner(db):
    seen = []

    class Last:
        def predict(self, candidate, shape):
            seen.append(candidate.impl.name)
            return 0.0 if candidate.impl.name == "cpu.math" else 1.0

    res = tune_shape(SHAPE, "exhaustive", Budget(max_candidates=1, reps=2), db=db, cost_model=Last())
    assert "cpu.math" in seen and res.n_tried == 2  # the default + the top-ranked one


def test_static_mode_ranks_triton_configs_and_measured_supersedes(db, monkeypatch):
    cc = pytest.importorskip("graphtune.codegen.crosscompile")
    calls = []

    def fake_rank(name, meta, configs, arch):
        calls.append((name, arch, meta[0].device.type))
        return sorted([(c, 1.0 / (1 + i), None) for i, c in enumerate(configs)], key=lambda t: -t[1])

    monkeypatch.setattr(cc, "static_rank", fake_rank)
    shape = AttentionShape(1, 8, 2, 1, 4096, 64, dtype="float16")
    [res] = tune_static([shape], "sm_90", max_candidates=3, db=db)
    assert res.mode == "static" and res.impl.startswith("triton.") and calls[0][1:] == (90, "meta")
    [r] = db.records()
    assert r.device == "cuda:sm_90" and r.mode == "static" and r.score == 1.0 and r.median_us is None
    key = shape.key()
    look = lambda: db.lookup(r.op, key.shape_key, 1, 4096, "cuda:sm_90", r.versions, lambda x: True)  # noqa: E731
    assert look().mode == "static"
    db.put(type(r)(**{**r.to_json(), "record_id": "", "created_at": "", "mode": "measured", "median_us": 5.0}))
    assert look().mode == "measured" and db.count() == 2


def test_static_mode_rejects_bad_targets():
    with pytest.raises(OptionError, match="sm_80"):
        tune_static([SHAPE], "hopper")


def test_shape_keys_bucket_sequence_lengths_and_match_op_args():
    assert [pow2_bucket(n) for n in (1, 2, 3, 17, 128, 129)] == [1, 2, 4, 32, 128, 256]
    for shape in (AttentionShape(3, 8, 2, 1, 1000, 64), AttentionShape(1, 4, 4, 17, 17, 32, "bfloat16", True, "bool")):
        assert key_for_args(shape.make_args()) == shape.key()
        assert AttentionShape.from_args(shape.make_args()) == shape
    k = AttentionShape(3, 8, 2, 1, 1000, 64).key()
    assert (k.q_bucket, k.kv_bucket) == (1, 1024) and k.shape_key.startswith("b4_h8_kvh2_d64")
    assert default_candidate("attention_with_lse", "cpu").impl.name == "cpu.flash"


def test_parse_shape_and_budget_errors_name_the_problem():
    assert parse_shape("2,8,2,1,4096,64,bf16,causal") == AttentionShape(2, 8, 2, 1, 4096, 64, "bfloat16", True)
    assert parse_shape("1,2,2,3,3,8,mask=additive").mask == "additive"
    with pytest.raises(OptionError, match="not B,H,KVH"):
        parse_shape("1,2,3")
    with pytest.raises(OptionError, match="multiple"):
        parse_shape("1,6,4,1,8,8")
    with pytest.raises(ShapeError, match="dtype"):
        AttentionShape(1, 1, 1, 1, 1, 8, dtype="int8")
    assert parse_budget("30") == (30.0, None) and parse_budget("12c") == (None, 12)
    with pytest.raises(OptionError, match="budget"):
        parse_budget("soon")
    with pytest.raises(OptionError, match="strategy"):
        tune_shape(SHAPE, "genetic")


def test_static_mode_with_the_real_cross_compiler(db):
    # one config (the default), really compiled for sm_90: the record carries its resources
    pytest.importorskip("graphtune.codegen.crosscompile")
    [res] = tune_static([AttentionShape(1, 4, 2, 1, 256, 64, dtype="float16")], "sm_90", max_candidates=1, db=db)
    [r] = db.records()
    assert r.mode == "static" and r.score is not None and math.isfinite(r.score) and r.score > 0
    assert r.details["resources"]["spill_bytes"] == 0 and r.details["resources"]["registers"] > 0
    assert is_valid(r) and res.record_id == r.record_id


def test_the_tuning_worker_answers_in_a_forked_child_after_the_parent_used_it():
    import os

    from graphtune.autotune import measure

    assert measure.run_with_timeout(lambda: 1, 5.0) == 1  # the parent's worker thread exists now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's worker thread does not exist here
        try:
            ok = measure.run_with_timeout(lambda: 41 + 1, 5.0) == 42
        except BaseException:  # noqa: BLE001
            ok = False
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"1", "the forked child's measurement timed out"
