"""The ``linear`` op family: every registered CPU implementation and config against the float64
reference, the PAD knob, the tuning key (``LinearShape``), tuning a linear shape into a database,
and the measurement changes it came with (cold operand copies, CPU timing on the caller's thread,
one intra-op thread on the watched worker, references without an LSE)."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from graphtune import flags
from graphtune.autotune import Budget, TuningDB, tune_shape
from graphtune.autotune import measure, workers
from graphtune.autotune.measure import Bench, Candidate, _compare, run_with_timeout
from graphtune.autotune.tuner import default_candidate, is_valid, load_impls
from graphtune.codegen.family import family, tolerance
from graphtune.codegen.linear import FAMILY
from graphtune.codegen.linear.cpu import PADS, linear_aten, linear_wt
from graphtune.codegen.linear.key import EXACT_ROWS, LinearShape, parse_linear_shape
from graphtune.codegen.linear.reference import linear_ref
from graphtune.codegen.registry import Impl, KernelConfig, get_impl, impls_for
from graphtune.codegen.tuning_key import ShapeKey
from graphtune.errors import OptionError, ShapeError

load_impls("cpu")

ROWS = (1, 2, 3, 5, 17)
FEATURES = ((7, 13), (33, 5), (64, 48))  # (out, in)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _args(rows: int, out_f: int, in_f: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    w = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    return x, w, b


def _strides(t: torch.Tensor) -> list[int]:
    return [s for s, n in zip(t.stride(), t.shape) if n > 1]


def _onednn_here(dtype: torch.dtype) -> bool:
    # oneDNN's packed linear runs fp32 and bf16 (fp16 needs AVX-512 FP16 / AVX-NE-CONVERT)
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and dtype in (torch.float32, torch.bfloat16))


def _all_candidates(args: tuple) -> list[tuple[Impl, KernelConfig]]:
    out = []
    for impl in impls_for("linear", "cpu"):
        if impl.name == "cpu.onednn" and not impl.supports(args):
            assert not _onednn_here(args[0].dtype), "cpu.onednn refused operands it should run"
            continue
        assert impl.supports(args), impl.name
        for cfg in dict.fromkeys([impl.default_config(args), *impl.configs(args)]):
            out.append((impl, cfg))
    return out


# ------------------------------------------------------------------------------ implementations


def test_linear_family_declares_cpu_aten_default_and_both_impls_are_registered():
    assert family("linear") is FAMILY and FAMILY.default_impls == {"cpu": "cpu.aten"}
    names = [i.name for i in impls_for("linear", "cpu")]
    assert names == ["cpu.aten", "cpu.wt", "cpu.onednn"]
    assert default_candidate("linear", "cpu").impl is get_impl("linear", "cpu.aten")
    assert PADS == (1, 2, 4)
    # the declared tolerances are what the tuner checks against
    for dt in DTYPES:
        assert tolerance("linear", dt) == FAMILY.tolerance(dt)
    assert FAMILY.tolerance(torch.float32) == (1e-4, 1e-4)


def test_wt_config_space_offers_only_pads_above_the_row_count():
    wt = get_impl("linear", "cpu.wt")
    space = {m: [c["PAD"] for c in wt.configs(_args(m, 8, 8, False, torch.float32))] for m in (1, 2, 3, 4, 5)}
    assert space == {1: [1, 2, 4], 2: [1, 4], 3: [1, 4], 4: [1], 5: [1]}
    assert get_impl("linear", "cpu.aten").configs(_args(2, 8, 8, False, torch.float32)) == [KernelConfig.make()]


def test_linear_impls_support_only_2d_cpu_operands_with_matching_inner_dim():
    for impl in impls_for("linear", "cpu"):
        x, w, _ = _args(2, 4, 8, False, torch.float32)
        assert impl.supports((x, w, None))
        assert not impl.supports((x[None], w, None))  # [B, M, K]: the router flattens first
        assert not impl.supports((torch.randn(2, 7), w, None))
        assert not impl.supports((x.to("meta"), w.to("meta"), None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_every_impl_and_config_matches_float64_reference_on_odd_shapes(dtype, bias):
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else tolerance("linear", dtype)
    n = 0
    for rows in ROWS:
        for out_f, in_f in FEATURES:
            args = _args(rows, out_f, in_f, bias, dtype, seed=rows * 100 + out_f)
            want, none = linear_ref(*args)
            assert none is None and want.dtype == dtype
            base = F.linear(*args)
            for impl, cfg in _all_candidates(args):
                y, lse = impl.fn(*args, config=cfg)
                where = f"{impl.name}[{cfg}] rows={rows} out={out_f} in={in_f}"
                assert lse is None, where
                assert y.shape == base.shape and y.dtype == base.dtype, where
                assert y.is_contiguous() and base.is_contiguous(), where
                assert _strides(y) == _strides(base), where  # (a size-1 dim's stride is immaterial)
                torch.testing.assert_close(y.float(), want.float(), atol=atol, rtol=rtol, msg=where)
                n += 1
    # aten + wt with PAD 1 (+ onednn where it runs) for every shape, PAD 2/4 for the few-row ones
    extra = 1 if _onednn_here(dtype) else 0
    assert n == sum(2 + extra + sum(1 for p in PADS if p > r) for r in ROWS) * len(FEATURES)


def test_aten_impl_is_bit_identical_to_f_linear():
    for bias in (False, True):
        args = _args(3, 33, 5, bias, torch.float32)
        assert torch.equal(linear_aten(*args)[0], F.linear(*args))


class _MatmulShapes(TorchFunctionMode):
    """Records the operand shapes of every matmul run inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm):
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows,pad,padded_to", [(1, 4, 4), (3, 4, 4), (1, 2, 2), (3, 2, 3), (4, 4, 4),
                                                (5, 4, 5), (2, 1, 2)])
def test_wt_pads_rows_with_zeros_only_when_rows_below_pad(rows, pad, padded_to):
    x, w, b = _args(rows, 33, 13, True, torch.float32)
    with _MatmulShapes() as spy:
        y, _ = linear_wt(x, w, b, config=KernelConfig.make(PAD=pad))
    assert spy.shapes == [((33, 13), (13, padded_to))]
    y1, _ = linear_wt(x, w, b, config=KernelConfig.make(PAD=1))
    assert y.shape == (rows, 33)
    torch.testing.assert_close(y, y1, atol=1e-6, rtol=1e-6)  # the padded rows are cut off again
    torch.testing.assert_close(y, linear_ref(x, w, b)[0], atol=1e-5, rtol=1e-5)


def test_wt_padding_does_not_change_the_callers_input():
    x, w, _ = _args(3, 7, 13, False, torch.float32)
    x0 = x.clone()
    linear_wt(x, w, config=KernelConfig.make(PAD=4))
    assert torch.equal(x, x0) and x.shape == (3, 13)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_wt_output_views_like_f_linear(bias):
    for pad in (1, 4):
        x, w, b = _args(3, 64, 48, bias, torch.float32)
        y, _ = linear_wt(x, w, b, config=KernelConfig.make(PAD=pad))
        ref = F.linear(x, w, b)
        assert y.is_contiguous() and y.stride() == ref.stride() == (64, 1)
        torch.testing.assert_close(y.view(1, 3, 64), ref.view(1, 3, 64), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y.view(-1), ref.view(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y.view(3, 8, 8), ref.view(3, 8, 8), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ tuning key


def test_linear_shape_keys_rows_up_to_16_exactly_and_above_as_mbig_pow2_bucket():
    assert EXACT_ROWS == 16
    assert LinearShape(3, 1536, 576, threads=2).key() == ShapeKey("linear", "n1536_k576_float32_t2_m3", 3, 1)
    assert LinearShape(16, 96, 64, threads=2).key() == ShapeKey("linear", "n96_k64_float32_t2_m16", 16, 1)
    assert LinearShape(17, 96, 64, threads=2).key() == ShapeKey("linear", "n96_k64_float32_t2_mbig", 32, 1)
    assert LinearShape(40, 96, 64, threads=2).key() == ShapeKey("linear", "n96_k64_float32_t2_mbig", 64, 1)
    assert LinearShape(64, 96, 64, threads=2).key().q_bucket == 64
    assert LinearShape(65, 96, 64, threads=2).key().q_bucket == 128
    # distinct exact keys per small row count (the winner flips between 2, 3 and 4 rows)
    assert len({LinearShape(m, 96, 64, threads=2).key().shape_key for m in range(1, 17)}) == 16
    assert LinearShape(1, 96, 64, threads=2).key().op == LinearShape.op == "linear"


def test_linear_shape_key_holds_thread_count_and_normalized_dtype():
    k1 = LinearShape(2, 96, 64, threads=1).key().shape_key
    k4 = LinearShape(2, 96, 64, threads=4).key().shape_key
    assert "_t1_" in k1 and "_t4_" in k4 and k1 != k4
    assert LinearShape(2, 96, 64).threads == torch.get_num_threads()
    s = LinearShape(2, 96, 64, "bf16", threads=1)
    assert s.dtype == "bfloat16" and s.key().shape_key == "n96_k64_bfloat16_t1_m2"
    assert LinearShape(2, 96, 64, "fp16", threads=1).key().shape_key == "n96_k64_float16_t1_m2"
    assert s.to_dict() == {"rows": 2, "out_features": 96, "in_features": 64, "dtype": "bfloat16", "threads": 1}
    assert "M=2 N=96 K=64 bfloat16 threads=1" in str(s)


@pytest.mark.parametrize("kw", [dict(rows=0), dict(rows=-1), dict(out_features=0), dict(in_features=0),
                                dict(threads=0), dict(rows=True), dict(rows=2.0), dict(dtype="int8"),
                                dict(dtype="float64")])
def test_linear_shape_rejects_bad_fields_with_shape_error(kw):
    base = dict(rows=2, out_features=96, in_features=64, dtype="float32", threads=1)
    with pytest.raises(ShapeError):
        LinearShape(**{**base, **kw})


def test_parse_linear_shape_accepts_m_n_k_and_optional_dtype():
    s = parse_linear_shape("2,49152,576")
    assert (s.rows, s.out_features, s.in_features, s.dtype, s.threads) == (2, 49152, 576, "float32",
                                                                             torch.get_num_threads())
    s = parse_linear_shape(" 3 , 64 ,32, bf16 ")
    assert (s.rows, s.out_features, s.in_features, s.dtype) == (3, 64, 32, "bfloat16")


@pytest.mark.parametrize("text", ["", "2,3", "a,b,c", "1,2,3,float32,5", "0,4,4", "1,-2,3", "1,2,3,int8",
                                  "1.5,2,3", "1,,3"])
def test_parse_linear_shape_rejects_bad_text_with_option_error(text):
    with pytest.raises(OptionError, match="not M,N,K"):
        parse_linear_shape(text)


def test_keys_of_call_equals_linear_shape_key_at_the_current_thread_count():
    x, w, b = _args(5, 7, 13, True, torch.float32)
    assert LinearShape.keys_of_call((x, w, b)) == [LinearShape(5, 7, 13).key()]
    xb, wb, _ = _args(40, 7, 13, False, torch.bfloat16)
    assert LinearShape.keys_of_call((xb, wb, None)) == [LinearShape(40, 7, 13, "bfloat16").key()]
    old = torch.get_num_threads()
    other = 1 if old != 1 else 2
    torch.set_num_threads(other)
    try:
        [k] = LinearShape.keys_of_call((x, w, b))
        assert k == LinearShape(5, 7, 13, threads=other).key() and f"_t{other}_" in k.shape_key
    finally:
        torch.set_num_threads(old)


def test_make_args_is_deterministic_per_seed_and_meta_args_match_it():
    s = LinearShape(3, 40, 24, "bfloat16", threads=1)
    a, b, c = s.make_args(0), s.make_args(0), s.make_args(1)
    assert all(torch.equal(p, q) for p, q in zip(a[:2], b[:2]))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    x, w, bias = a
    assert bias is None and x.shape == (3, 24) and w.shape == (40, 24) and x.dtype == w.dtype == torch.bfloat16
    assert float(w.float().std()) < 0.5  # scaled like a trained layer (1/sqrt(in))
    mx, mw, mb = s.meta_args()
    assert mb is None and mx.device.type == "meta" and (mx.shape, mw.shape, mw.dtype) == (x.shape, w.shape, w.dtype)
    assert LinearShape.cold_bytes == 96 << 20
    for ex in LinearShape.examples():
        args = ex.make_args()
        assert all(i.supports(args) for i in impls_for("linear", "cpu"))


# ------------------------------------------------------------------------------ tuning


@pytest.fixture
def db(tmp_path):
    d = TuningDB(tmp_path / "t.db", import_shipped=False)
    yield d
    d.close()


def _fake(name, fn):
    return Candidate(Impl("linear", name, "cpu", fn, KernelConfig.make(), lambda a: [], "fakehash"),
                     KernelConfig.make())


def test_tuning_a_linear_shape_stores_one_valid_record_whose_winner_matches_reference(db):
    shape = LinearShape(2, 96, 64)
    res = tune_shape(shape, "exhaustive", Budget(seconds=5, reps=3), db=db)
    assert res.op == "linear" and not res.failures
    # cpu.aten, cpu.wt PAD=1, cpu.wt PAD=4 (+ cpu.onednn)
    assert res.n_tried == 3 + _onednn_here(torch.float32)
    [r] = db.records()
    assert r.op == "linear" and r.record_id == res.record_id and r.mode == "measured"
    assert (r.shape_key, r.q_bucket, r.kv_bucket) == ("n96_k64_float32_t%d_m2" % torch.get_num_threads(), 2, 1)
    assert r.shape == shape.to_dict()
    impl = get_impl("linear", r.impl)
    assert impl is not None and impl.name in ("cpu.aten", "cpu.wt", "cpu.onednn") and is_valid(r)
    assert r.median_us is not None and r.p20_us <= r.median_us <= r.p80_us and r.n_samples >= 3
    args = shape.make_args(seed=7)
    y, lse = impl.fn(*args, config=KernelConfig.from_dict(r.config))
    assert lse is None
    torch.testing.assert_close(y, linear_ref(*args)[0], atol=1e-4, rtol=1e-4)


def test_tuning_reports_a_candidate_inventing_an_lse_or_a_wrong_output_as_wrong(db):
    lse = _fake("fake.lse", lambda x, w, b=None, *, config: (F.linear(x, w, b), torch.zeros(x.shape[0])))
    off = _fake("fake.off", lambda x, w, b=None, *, config: (F.linear(x, w, b) + 0.1, None))
    flat = _fake("fake.flat", lambda x, w, b=None, *, config: F.linear(x, w, b))
    res = tune_shape(LinearShape(2, 96, 64), "exhaustive", Budget(seconds=5, reps=3), db=db,
                     candidates=[default_candidate("linear", "cpu"), lse, off, flat])
    why = {f.split("[")[0]: f for f in res.failures}
    assert set(why) == {"fake.lse", "fake.off", "fake.flat"}
    assert "wrong: lse is a Tensor, the reference returns None" in why["fake.lse"]
    assert "wrong: out differs from the reference" in why["fake.off"]
    assert "wrong: returned Tensor, not (out, lse)" in why["fake.flat"]
    assert res.impl == "cpu.aten"
    [r] = db.records()
    assert r.impl == "cpu.aten"


# ------------------------------------------------------------------------------ measurement


def test_compare_accepts_a_reference_without_lse_and_rejects_an_invented_one():
    x, w, b = _args(3, 7, 13, True, torch.float32)
    want = linear_ref(x, w, b)
    y = F.linear(x, w, b)
    assert _compare((y, None), want, 1e-4, 1e-4) is None
    assert _compare([y, None], want, 1e-4, 1e-4) is None
    assert _compare((y, torch.zeros(3)), want, 1e-4, 1e-4) == "lse is a Tensor, the reference returns None"
    assert _compare((y, 0.0), want, 1e-4, 1e-4) == "lse is a float, the reference returns None"
    assert _compare((y + 1e-2, None), want, 1e-4, 1e-4).startswith("out differs from the reference by")
    assert _compare((y[:2], None), want, 1e-4, 1e-4).startswith("out has shape")
    assert _compare((None, None), want, 1e-4, 1e-4).startswith("out has shape None")
    assert _compare(y, want, 1e-4, 1e-4) == "returned Tensor, not (out, lse)"
    # an op with an LSE still requires one
    lse = torch.randn(3)
    assert _compare((y, None), (y, lse), 1e-4, 1e-4).startswith("lse has shape None")
    assert _compare((y, lse), (y, lse), 1e-4, 1e-4) is None


def _recording_impl(log: list):
    def fn(x, w, b=None, *, config):
        log.append((id(w), threading.get_ident(), torch.get_num_threads()))
        return F.linear(x, w, b), None
    return Candidate(Impl("linear", "fake.rec", "cpu", fn, KernelConfig.make(), lambda a: [], "h"),
                     KernelConfig.make())


def test_bench_times_through_every_cold_copy_in_turn_and_checks_on_the_first_args():
    shape = LinearShape(2, 96, 64, threads=1)
    args = shape.make_args(0)
    copies = [args] + [shape.make_args(s) for s in (1, 2, 3)]
    log: list = []
    c = _recording_impl(log)
    bench = Bench("linear", args, guard=False, cold=copies)
    assert bench.check(c) is None
    assert [e[0] for e in log] == [id(args[1])]
    log.clear()
    m = bench.time(c, reps=5)
    assert m.ok and m.n_samples == 5
    per_copy = Counter(e[0] for e in log)
    assert set(per_copy) == {id(cp[1]) for cp in copies}  # every copy is used
    assert max(per_copy.values()) - min(per_copy.values()) <= 1  # in turn
    assert sum(per_copy.values()) == len(log) >= 6  # warm-up + 5 timed reps
    # without copies, timing uses the bench's args
    log.clear()
    Bench("linear", args, guard=False).time(c, reps=3)
    assert {e[0] for e in log} == {id(args[1])}


def test_bench_checks_cpu_candidates_on_watched_thread_but_times_them_on_caller():
    args = LinearShape(2, 96, 64).make_args(0)
    log: list = []
    c = _recording_impl(log)
    bench = Bench("linear", args, timeout=10.0)  # guard=True: the check runs on the watched worker
    assert bench.check(c) is None
    me = threading.get_ident()
    assert log[0][1] != me and log[0][2] == 1
    log.clear()
    assert bench.time(c, reps=3).ok
    assert {e[1] for e in log} == {me} and {e[2] for e in log} == {torch.get_num_threads()}


def test_in_process_backend_checks_on_worker_and_times_on_caller_through_cold_copies():
    shape = LinearShape(2, 96, 64)
    log: list = []
    c = _recording_impl(log)
    [r] = workers.InProcess().run([workers.measure_task(c, shape, reps=3, timeout=20.0)])
    m = workers.to_measurement(c, r)
    assert m.ok and m.n_samples == 3, m.error
    me = threading.get_ident()
    (w0, t0, n0), *timed = log
    assert t0 != me and n0 == 1  # the check: on the watched worker, one intra-op thread
    assert timed and {t for _, t, _ in timed} == {me}
    assert {n for _, _, n in timed} == {torch.get_num_threads()}
    assert len({w for w, _, _ in timed}) > 1  # cycled through cold copies of the operands
    # enough copies of a small shape to exceed cold_bytes (capped at 64)
    p = workers._MeasurePayload("linear", "x", "", KernelConfig.make(), shape, 3, 0, "cpu", True)
    cold = workers._cold_copies(p, shape.make_args(0))
    assert len(cold) == 64
    assert workers._cold_copies(p, (torch.empty(LinearShape.cold_bytes // 4 + 1),)) is None


def test_run_with_timeout_worker_uses_one_thread_and_leaves_callers_count_unchanged(monkeypatch):
    before = torch.get_num_threads()
    assert run_with_timeout(lambda: torch.get_num_threads(), 5) == 1
    assert torch.get_num_threads() == before
    # a fresh worker, started while the caller runs 2 threads, leaves the caller at 2
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(measure, "_worker", None)
        assert run_with_timeout(lambda: torch.get_num_threads(), 5) == 1
        assert torch.get_num_threads() == 2
        assert run_with_timeout(lambda: threading.current_thread().name, 5) == "graphtune-tune-worker"
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ oneDNN packed weights


def test_onednn_packs_a_weight_once_rebuilds_after_in_place_change_and_drops_it_with_the_weight():
    if not _onednn_here(torch.float32):
        pytest.skip("oneDNN packed linear unavailable in this torch build")
    import gc

    from graphtune.codegen.linear import cpu as lcpu

    x, w, b = _args(5, 33, 48, True, torch.float32)
    p1 = lcpu.packed_weight(w)
    assert lcpu.packed_weight(w) is p1  # cached
    y1, _ = lcpu.linear_onednn(x, w, b)
    torch.testing.assert_close(y1, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        w.mul_(2.0)  # an in-place change (load_state_dict does this): the pack is rebuilt
    assert lcpu.packed_weight(w) is not p1
    torch.testing.assert_close(lcpu.linear_onednn(x, w, b)[0], F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    key = id(w)
    assert key in lcpu._PACKS
    del w
    gc.collect()
    assert key not in lcpu._PACKS  # no second copy outlives its weight


def test_linear_packed_flag_off_keeps_the_tuner_from_onednn():
    args = _args(4, 16, 8, False, torch.float32)
    onednn = get_impl("linear", "cpu.onednn")
    with flags.Context(LINEAR_PACKED=False):
        assert not onednn.supports(args)
    assert onednn.supports(args) == _onednn_here(torch.float32)
