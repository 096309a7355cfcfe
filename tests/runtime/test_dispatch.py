"""Tuned dispatch: the op runs the database's winner for its shape and falls back when it fails."""
import warnings

import pytest
import torch

from graphtune import flags
from graphtune.autotune import AttentionShape, MergeShape, db as dbmod
from graphtune.autotune import fingerprint
from graphtune.autotune.db import Record, get_db
from graphtune.codegen import registry
from graphtune.codegen.attention.cpu import gqa_fold_attention
from graphtune.codegen.registry import Impl, KernelConfig
from graphtune.ir.reference import attention_ref, merge_states_ref
from graphtune.runtime import context, dispatch

SHAPE = AttentionShape(1, 8, 2, 1, 600, 32)


@pytest.fixture
def tuned_db(tmp_path):
    path = str(tmp_path / "t.db")
    with flags.Context(DB=path):
        dispatch.install()
        yield get_db()
        dispatch.uninstall()
    dbmod.forget_db(path)


def put(db, impl_name, config, shape=SHAPE, source_hash=None):
    impl = registry.get_impl("attention_with_lse", impl_name)
    fp, key = fingerprint.current("cpu"), shape.key()
    return db.put(Record("attention_with_lse", impl_name, source_hash or impl.source_hash, fp.device, fp.device_name,
                         fp.versions, key.shape_key, key.q_bucket, key.kv_bucket, config.to_dict(), 10.0, 9.0, 11.0,
                         5, 20.0, "measured", shape.to_dict()))


def chosen(args, op="attention"):
    fn = context._select(op, args)
    return None if fn is None else (fn.impl_name, fn.config)


def test_nothing_tuned_means_the_default_path(tuned_db):
    args = SHAPE.make_args()
    assert chosen(args) is None
    torch.testing.assert_close(torch.ops.graphtune.attention(*args), attention_ref(*args)[0], atol=1e-5, rtol=0)


def test_op_uses_the_database_winner_for_both_attention_ops(tuned_db):
    cfg = KernelConfig.make(THREADS=1)
    put(tuned_db, "cpu.gqa_fold", cfg)
    args = AttentionShape(1, 8, 2, 1, 700, 32).make_args(seed=1)  # same buckets as SHAPE
    assert chosen(args) == ("cpu.gqa_fold", cfg) == chosen(args, "attention_with_lse")
    calls = []
    orig = registry.get_impl("attention_with_lse", "cpu.gqa_fold")
    spy = Impl(orig.op, orig.name, orig.device, lambda *a, config: calls.append(config) or gqa_fold_attention(*a, config=config),
               orig.default, orig.configs, orig.source_hash, orig.supports)
    registry.register_impl(spy)
    try:
        dispatch.clear_cache()
        out = torch.ops.graphtune.attention(*args)
        out2, lse = torch.ops.graphtune.attention_with_lse(*args)
    finally:
        registry.register_impl(orig)
        dispatch.clear_cache()
    assert calls == [cfg, cfg]
    ref = attention_ref(*args)
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=0)


def test_nearest_bucket_is_used_and_default_winner_costs_nothing(tuned_db):
    put(tuned_db, "cpu.gqa_fold", KernelConfig.make(THREADS=0))
    far = AttentionShape(1, 8, 2, 1, 5000, 32).make_args()  # kv bucket 8192: nearest record is 1024
    assert chosen(far)[0] == "cpu.gqa_fold"
    other = AttentionShape(1, 8, 2, 1, 600, 64).make_args()  # head dim differs: exact part of the key
    assert chosen(other) is None
    flash = registry.get_impl("attention_with_lse", "cpu.flash")
    put(tuned_db, "cpu.flash", flash.default, shape=AttentionShape(1, 4, 4, 1, 64, 16))
    assert chosen(AttentionShape(1, 4, 4, 1, 64, 16).make_args()) is None  # the default path already is that


def test_masked_call_falls_back_to_the_unmasked_winner(tuned_db):
    put(tuned_db, "cpu.gqa_fold", KernelConfig.make(THREADS=1))
    masked = AttentionShape(1, 8, 2, 1, 600, 32, mask="additive")
    assert chosen(masked.make_args())[0] == "cpu.gqa_fold"
    put(tuned_db, "cpu.math", KernelConfig.make(BLOCK_M=1), shape=masked)
    assert chosen(masked.make_args())[0] == "cpu.math"  # an exact masked record comes first


def test_new_records_in_this_process_take_effect(tuned_db):
    args = SHAPE.make_args()
    assert chosen(args) is None
    put(tuned_db, "cpu.split_kv", KernelConfig.make(SPLITS=2, BATCHED=1, FOLD=1))
    assert chosen(args)[0] == "cpu.split_kv"


def test_stale_record_is_ignored(tuned_db):
    put(tuned_db, "cpu.gqa_fold", KernelConfig.make(THREADS=1), source_hash="0000stale0000")
    assert chosen(SHAPE.make_args()) is None


def test_unsupported_winner_is_not_used(tuned_db):
    put(tuned_db, "cpu.split_kv", KernelConfig.make(SPLITS=2, BATCHED=1, FOLD=0), shape=AttentionShape(1, 8, 2, 1, 1024, 32))
    short = AttentionShape(1, 8, 2, 1, 100, 32).make_args()  # nearest record, but too short to split
    assert chosen(short) is None


def test_failing_impl_falls_back_with_one_warning(tuned_db):
    def broken(*a, config):
        raise RuntimeError("tuned kernel broke")

    impl = registry.register_impl(Impl("attention_with_lse", "cpu.test_broken", "cpu", broken,
                                       KernelConfig.make(X=0), lambda a: [], "brokenhash"))
    try:
        put(tuned_db, "cpu.test_broken", KernelConfig.make(X=1))
        args = SHAPE.make_args()
        with pytest.warns(UserWarning, match="cpu.test_broken.*tuned kernel broke"):
            out = torch.ops.graphtune.attention(*args)
        torch.testing.assert_close(out, attention_ref(*args)[0], atol=1e-5, rtol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, lse = torch.ops.graphtune.attention_with_lse(*args)  # no second warning, default path
        torch.testing.assert_close(lse, attention_ref(*args)[1], atol=1e-5, rtol=0)
    finally:
        registry._REGISTRY.pop((impl.op, impl.name), None)


def test_cachelevel_zero_and_uninstall_disable_dispatch(tuned_db):
    put(tuned_db, "cpu.gqa_fold", KernelConfig.make(THREADS=1))
    args = SHAPE.make_args()
    with flags.Context(CACHELEVEL=0):
        assert chosen(args) is None
    assert chosen(args)[0] == "cpu.gqa_fold" and dispatch.installed()
    dispatch.uninstall()
    assert not dispatch.installed() and chosen(args) is None
    dispatch.install()
    assert chosen(args)[0] == "cpu.gqa_fold"


def test_merge_states_uses_its_winner_and_other_ops_are_not_touched(tuned_db):
    shape = MergeShape(3, 1, 4, 2, 16)
    fp, key = fingerprint.current("cpu"), shape.key()
    impl = registry.get_impl("merge_states", "cpu.torch")
    tuned_db.put(Record("merge_states", "cpu.torch", impl.source_hash, fp.device, fp.device_name, fp.versions,
                        key.shape_key, key.q_bucket, key.kv_bucket, KernelConfig.make(STACKED=0).to_dict(), 1.0, 1.0,
                        1.0, 3, 2.0, "measured", shape.to_dict()))
    outs, lses = MergeShape(3, 1, 4, 5, 16).make_args(seed=2)  # q bucket 8: the nearest record (2) serves
    fn = context._select("merge_states", (outs, lses))
    assert (fn.impl_name, fn.config) == ("cpu.torch", KernelConfig.make(STACKED=0))
    out, lse = torch.ops.graphtune.merge_states(outs, lses)
    ref = merge_states_ref(outs, lses)
    torch.testing.assert_close(out, ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, ref[1], atol=1e-6, rtol=0)
    assert context._select("merge_states", MergeShape(3, 1, 4, 2, 32).make_args()) is None  # head dim differs
    assert dispatch._selector("some_other_op", (), None) is None


def test_unopenable_database_warns_once_and_uses_the_default_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with flags.Context(DB=str(blocker / "sub" / "t.db")):
        dispatch.install()
        try:
            args = SHAPE.make_args()
            with pytest.warns(UserWarning, match="cannot open the tuning database"):
                out = torch.ops.graphtune.attention(*args)
            torch.testing.assert_close(out, attention_ref(*args)[0], atol=1e-5, rtol=0)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                torch.ops.graphtune.attention(*args)
        finally:
            dispatch.uninstall()


def test_switching_graphtune_db_switches_decisions(tmp_path):
    # no write happens between the two lookups: only the path tells the caches apart
    a, b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    with flags.Context(DB=a):
        put(get_db(), "cpu.gqa_fold", KernelConfig.make(THREADS=1))
    with flags.Context(DB=b):
        put(get_db(), "cpu.split_kv", KernelConfig.make(SPLITS=2, BATCHED=1, FOLD=1))
    dispatch.install()
    try:
        args = SHAPE.make_args()
        for _ in range(2):
            with flags.Context(DB=a):
                assert chosen(args)[0] == "cpu.gqa_fold"
            with flags.Context(DB=b):
                assert chosen(args)[0] == "cpu.split_kv"
            with flags.Context(DB=str(tmp_path / "empty.db")):
                assert chosen(args) is None
    finally:
        dispatch.uninstall()
        for p in (a, b, str(tmp_path / "empty.db")):
            dbmod.forget_db(p)


class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        w = torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1)
        return w @ v


def _spy_impl(calls):
    orig = registry.get_impl("attention_with_lse", "cpu.math")
    return Impl(orig.op, "cpu.test_spy", "cpu", lambda *a, config: calls.append(config) or orig.fn(*a, config=config),
                orig.default, orig.configs, "spyhash", lambda a: True)


@pytest.mark.parametrize("tune,capture", [(True, "dynamo"), (False, "dynamo"),
                                          (True, "fx"), (False, "fx")])
def test_optimize_tune_false_stops_tuned_dispatch(tmp_path, tune, capture):
    import graphtune

    path = str(tmp_path / "t.db")
    calls = []
    spy = registry.register_impl(_spy_impl(calls))
    q = torch.randn(1, 2, 5, 64)
    shape = AttentionShape(1, 2, 2, 5, 5, 64)
    try:
        with flags.Context(DB=path):
            put(get_db(), "cpu.test_spy", KernelConfig.make(BLOCK_M=4), shape=shape)
            example = (q, q, q) if capture == "fx" else None
            fast = graphtune.optimize(_Attn(), example, capture=capture, tune=tune)
            dispatch.clear_cache()
            out = fast(q, q, q)
        torch.testing.assert_close(out, _Attn()(q, q, q), atol=1e-5, rtol=1e-5)
        assert bool(calls) is tune, calls
    finally:
        registry._REGISTRY.pop((spy.op, spy.name), None)
        dispatch.clear_cache()
        dbmod.forget_db(path)


def test_switching_the_graphtune_db_environment_variable_switches_decisions(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    with flags.Context(DB=a):
        put(get_db(), "cpu.gqa_fold", KernelConfig.make(THREADS=1))
    with flags.Context(DB=b):
        get_db()
    dispatch.install()
    try:
        args = SHAPE.make_args()
        monkeypatch.setenv("GRAPHTUNE_DB", a)
        assert chosen(args)[0] == "cpu.gqa_fold"
        monkeypatch.setenv("GRAPHTUNE_DB", b)
        assert chosen(args) is None
        monkeypatch.setenv("GRAPHTUNE_DB", a)
        assert chosen(args)[0] == "cpu.gqa_fold"
    finally:
        dispatch.uninstall()
        dbmod.forget_db(a)
        dbmod.forget_db(b)


def test_describe_reports_an_unusable_database_instead_of_raising(tmp_path):
    from types import SimpleNamespace

    with flags.Context(DB=str(tmp_path)):  # a directory
        note = dispatch.describe(SimpleNamespace(details={}), (1, 8, 1, 32), (1, 2, 600, 32))
    assert note.startswith("default:") and "directory" in note


def test_decode_steps_in_one_bucket_read_the_database_once(tuned_db, monkeypatch):
    put(tuned_db, "cpu.gqa_fold", KernelConfig.make(THREADS=1))
    reads = []
    orig = type(tuned_db).candidates
    monkeypatch.setattr(type(tuned_db), "candidates", lambda self, *a: reads.append(a) or orig(self, *a))
    dispatch.clear_cache()
    # a decode loop: the KV length moves on every step, all within the 1024 bucket
    picks = {chosen(AttentionShape(1, 8, 2, 1, n, 32).make_args()) for n in range(600, 640)}
    assert picks == {("cpu.gqa_fold", KernelConfig.make(THREADS=1))}
    assert len(reads) == 1, reads
    put(tuned_db, "cpu.split_kv", KernelConfig.make(SPLITS=2, BATCHED=1, FOLD=1))  # a write drops the memo
    assert chosen(AttentionShape(1, 8, 2, 1, 641, 32).make_args())[0] == "cpu.split_kv"


def test_may_serve_follows_records_tune_and_cachelevel(tuned_db):
    cpu = torch.device("cpu")
    assert not dispatch.may_serve(cpu)  # an empty database
    put(tuned_db, "cpu.gqa_fold", KernelConfig.make(THREADS=1))
    assert dispatch.may_serve(cpu)
    ctx = context.BatchContext(options=flags.Options(tune=False))
    assert not dispatch.may_serve(cpu, ctx)
    with flags.Context(CACHELEVEL=0):
        assert not dispatch.may_serve(cpu)


def test_records_of_ops_dispatch_does_not_serve_do_not_count_for_may_serve(tuned_db):
    from graphtune.codegen.lean_decode.key import LeanShape

    cpu = torch.device("cpu")
    shape = LeanShape((64, 20, 7), 4, 2, 32)
    impl = registry.get_impl("lean_decode", "cpu.lean")
    fp, key = fingerprint.current("cpu"), shape.key()
    tuned_db.put(Record("lean_decode", "cpu.lean", impl.source_hash, fp.device, fp.device_name, fp.versions,
                        key.shape_key, key.q_bucket, key.kv_bucket, impl.default.to_dict(), 10.0, 9.0, 11.0, 5, 20.0,
                        "measured", shape.to_dict()))
    dispatch.clear_cache()
    # lean decode's tuned configs are read by its own selector, inside forwards that have a lean plan
    assert not dispatch.may_serve(cpu)
    put(tuned_db, "cpu.gqa_fold", KernelConfig.make(THREADS=1))
    assert dispatch.may_serve(cpu)
