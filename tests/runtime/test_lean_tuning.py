"""The autotuner chooses lean decode's tile and worker counts: the lean CPU path is implementation
``cpu.lean`` of op ``lean_decode`` (knobs TILE, WORKERS, SERIAL), ``tune_shape`` measures it on a
ragged ``LeanShape`` and stores the winner, and the runtime's planner then runs that config for
batches of the same bucket — exact either way, the default when nothing (valid) is tuned."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from graphtune import flags
from graphtune.autotune import fingerprint
from graphtune.autotune.db import Record, get_db
from graphtune.autotune.measure import Bench, Candidate
from graphtune.autotune.search import Budget
from graphtune.autotune.shapes import LEAN_OP, LeanShape, lean_key, parse_lean_shape
from graphtune.autotune.tuner import tune_shape
from graphtune.cli import main as cli_main
from graphtune.codegen.lean_decode import cpu as lean_cpu
from graphtune.codegen.lean_decode.cpu import DEFAULT_CONFIG, IMPL_NAME, lean_decode_cpu, resolve_config
from graphtune.codegen.registry import KernelConfig, get_impl
from graphtune.errors import OptionError, ShapeError
from graphtune.ir.reference import attention_ref
from graphtune.runtime import context
from graphtune.runtime import lean_decode as ld


@pytest.fixture
def fresh_db(tmp_path):
    """A tuning database of this test's own (the runtime lookups read the DB flag)."""
    with flags.Context(DB=str(tmp_path / "tuning.db")):
        ld.clear_tuned_cache()
        yield get_db()
    ld.clear_tuned_cache()


@pytest.fixture
def installed():
    ld.install()
    try:
        yield
    finally:
        ld.uninstall()


def _run_batch(lengths, hq=4, hkv=2, d=16, lq=1, dtype=torch.float32):
    """One decode step of a left-padded batch through the runtime; returns (lean batch, out, SDPA out)."""
    S, B = max(lengths), len(lengths)
    hf_mask = (torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]).long()
    q = torch.randn(B, hq, lq, d).to(dtype)
    k, v = torch.randn(B, hkv, S, d).to(dtype), torch.randn(B, hkv, S, d).to(dtype)
    allowed = hf_mask.bool()[:, None, None, :].expand(B, 1, lq, S)
    if lq > 1:
        allowed = allowed & (torch.arange(S)[None, :] <= S - lq + torch.arange(lq)[:, None])
    with flags.Context(LEAN_MIN_SKEW=0.0), context.batch_context(attention_mask=hf_mask) as ctx:
        got = torch.ops.graphtune.attention(q, k, v, allowed, False, None, True)
        batch = ctx.plans[ld.PLAN_NAME]
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, enable_gqa=True)
    return batch, got, want


def _plan_of(batch):
    (program,) = batch.programs.values()
    return program.plan


def _put(db, shape, config, source_hash=None):
    impl = get_impl(LEAN_OP, IMPL_NAME)
    fp = fingerprint.current("cpu")
    key = shape.key()
    return db.put(Record(LEAN_OP, IMPL_NAME, source_hash or impl.source_hash, fp.device, fp.device_name, fp.versions,
                         key.shape_key, key.q_bucket, key.kv_bucket, config.to_dict(), 10.0, 9.0, 11.0, 5, 20.0,
                         "measured", shape.to_dict()))


# ------------------------------------------------------------------------------ the impl


@pytest.mark.parametrize("lengths, hq, hkv, lq, dtype, atol", [
    ((600, 40, 33, 9, 1), 4, 2, 1, torch.float32, 1e-5),  # skew + a 1-key row, GQA
    ((129, 129, 17), 3, 3, 1, torch.float32, 1e-5),  # MHA, equal rows that fold into one call
    ((300, 20, 8, 4), 4, 1, 4, torch.float32, 1e-5),  # speculative width 4: bottom-right causal
    ((257, 65, 2), 4, 2, 1, torch.bfloat16, 2e-2),
])
def test_cpu_lean_impl_matches_attention_ref_for_every_config_of_its_space(lengths, hq, hkv, lq, dtype, atol):
    shape = LeanShape(lengths, hq, hkv, 16, q_len=lq, dtype=str(dtype).removeprefix("torch."))
    args = shape.make_args(seed=1)
    want_out, want_lse = attention_ref(*args)
    impl = get_impl(LEAN_OP, IMPL_NAME)
    assert impl.supports(args)
    configs = impl.configs(args)
    assert {c["TILE"] for c in configs} >= {64, 128} and {c["SERIAL"] for c in configs} == {0, 1}
    for cfg in [DEFAULT_CONFIG, *configs]:
        out, lse = lean_decode_cpu(*args, config=cfg)
        torch.testing.assert_close(out.float(), want_out.float(), atol=atol, rtol=atol, msg=str(cfg))
        torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4, msg=str(cfg))
    assert Bench(LEAN_OP, args).check(Candidate(impl, configs[-1])) is None  # the tuner's reference check


def test_config_space_is_pruned_by_length_and_work():
    impl = get_impl(LEAN_OP, IMPL_NAME)
    short = impl.configs(LeanShape((100, 3), 2, 1, 16).make_args())
    assert {c["TILE"] for c in short} == {64, 128}  # tile 128 already covers the longest row
    tiny = impl.configs(LeanShape((5,), 2, 1, 16).make_args())
    assert {c["WORKERS"] for c in tiny} == {1}  # one tile of work: no point in more workers
    assert max(c["WORKERS"] for c in short) <= 2 * (__import__("os").cpu_count() or 1)


@pytest.mark.parametrize("case", ["bias", "hole", "is_causal", "top_left_causal"])
def test_cpu_lean_impl_refuses_masks_it_cannot_reproduce(case):
    q, k, v, mask, _, _, gqa = LeanShape((40, 12), 4, 2, 16, q_len=2).make_args()
    is_causal = False
    if case == "bias":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) + 0.25
    elif case == "hole":
        mask = mask.clone()
        mask[0, 0, :, 5] = False
    elif case == "is_causal":
        is_causal = True
    else:
        mask = mask & (torch.arange(40)[None, :] <= torch.arange(2)[:, None] + 20)
    with pytest.raises(ShapeError):
        lean_decode_cpu(q, k, v, mask, is_causal, None, gqa)


def test_additive_padding_mask_is_accepted_like_the_bool_one():
    q, k, v, mask, c, s, gqa = LeanShape((50, 7, 20), 4, 2, 16).make_args()
    add = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(lean_decode_cpu(q, k, v, add, c, s, gqa)[0], attention_ref(q, k, v, mask, c, s, gqa)[0],
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ shapes and keys


def test_lean_key_buckets_batch_exactly_and_lengths_by_max_and_total():
    skewed = lean_key([32768] + [1024] * 31, 8, 8, 64)
    uniform = lean_key([2048] * 32, 8, 8, 64)
    assert skewed.shape_key == uniform.shape_key == "b32_h8_kvh8_d64_q1_float32"
    assert (skewed.q_bucket, skewed.kv_bucket) == (32768, 65536)
    assert (uniform.q_bucket, uniform.kv_bucket) == (2048, 65536)
    assert lean_key([100] * 3, 8, 2, 64, q_len=3, dtype=torch.bfloat16).shape_key == "b4_h8_kvh2_d64_q4_bfloat16"


def test_parse_lean_shape_and_its_errors():
    s = parse_lean_shape("32768+1024x31,8,2,64,4,bf16")
    assert (len(s.lengths), s.lengths[0], s.lengths[1], s.heads, s.kv_heads, s.head_dim, s.q_len, s.dtype) == \
        (32, 32768, 1024, 8, 2, 64, 4, "bfloat16")
    for bad in ("1024x,8,8,64", "1024,8,8", "1024,8,3,64", "2,8,8,64,4", "1024,8,8,64,float99", "abc,8,8,64"):
        with pytest.raises(OptionError):
            parse_lean_shape(bad)


# ------------------------------------------------------------------------------ tuning -> runtime


def test_tuning_a_ragged_shape_stores_a_record_that_the_planner_then_runs(fresh_db, installed):
    lengths = (700, 60, 45, 9)
    res = tune_shape(LeanShape(lengths, 4, 2, 16), budget=Budget(4.0, 6))
    assert res.op == LEAN_OP and res.impl == IMPL_NAME and res.record_id
    assert not [f for f in res.failures if "timeout" not in f]  # wrong or crashed: a bug (a stall on a busy CPU: not)
    assert res.median_us is not None and res.default_us is not None
    # (the shipped records aside: static GPU ones, and measured CPU ones of other shapes)
    (rec,) = [r for r in fresh_db.records("op = ?", [LEAN_OP]) if r.record_id == res.record_id]
    assert rec.shape["lengths"] == list(lengths)
    tile, workers, mode = resolve_config(KernelConfig.from_dict(rec.config))

    batch, got, want = _run_batch([690, 61, 40, 9])  # another batch of the same buckets
    plan = _plan_of(batch)
    assert (plan.tile, plan.num_workers) == (tile, workers)
    assert batch.configs[(4, 2, 1, 16, torch.float32)] == (tile, workers, mode)
    assert any("tuned record " + rec.record_id[:10] in d for d in batch.decisions.values()), batch.describe()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lq", [1, 4])
def test_planner_runs_the_nearest_tuned_config_and_stays_exact(fresh_db, installed, lq):
    _put(fresh_db, LeanShape((2000, 100, 100, 100), 4, 2, 16, q_len=lq),
         KernelConfig.make(TILE=64, WORKERS=3, SERIAL=1))
    # same exact part (B bucket 4, heads, dim, q bucket), other length buckets: the nearest record
    batch, got, want = _run_batch([500, 30, 20, 7], lq=lq)
    plan = _plan_of(batch)
    assert (plan.tile, plan.num_workers) == (64, 3)
    assert batch.configs[(4, 2, lq, 16, torch.float32)] == (64, 3, "serial")
    assert batch.calls == 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_planner_falls_back_to_the_default_when_nothing_valid_is_tuned(fresh_db, installed):
    default = (256, flags.get("NUM_THREADS") or torch.get_num_threads(), "threads")
    batch, got, want = _run_batch([300, 20, 9])
    assert (_plan_of(batch).tile, _plan_of(batch).num_workers) == default[:2]
    assert any("default: nothing tuned" in d for d in batch.decisions.values())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    shape = LeanShape((300, 20, 9), 4, 2, 16)
    _put(fresh_db, shape, KernelConfig.make(TILE=64, WORKERS=3, SERIAL=0), source_hash="0" * 16)  # stale source
    _put(fresh_db, dataclasses.replace(shape, heads=8), KernelConfig.make(TILE=64, WORKERS=3, SERIAL=0))  # other heads
    batch = _run_batch([300, 20, 9])[0]
    assert (_plan_of(batch).tile, _plan_of(batch).num_workers) == default[:2]

    _put(fresh_db, shape, KernelConfig.make(TILE=128, WORKERS=1, SERIAL=0))
    assert ld.tuned_config(shape.lengths, 4, 2, 16)[0] == KernelConfig.make(TILE=128, WORKERS=1, SERIAL=0)
    with flags.Context(CACHELEVEL=0):  # database disabled: defaults only
        assert ld.tuned_config(shape.lengths, 4, 2, 16) == (DEFAULT_CONFIG, None)


def test_lookups_are_cached_in_process_until_this_process_writes(fresh_db, monkeypatch):
    shape = LeanShape((300, 20, 9), 4, 2, 16)
    _put(fresh_db, shape, KernelConfig.make(TILE=128, WORKERS=2, SERIAL=0))
    calls = []
    real = type(fresh_db).lookup
    monkeypatch.setattr(type(fresh_db), "lookup", lambda self, *a, **kw: calls.append(a) or real(self, *a, **kw))
    for _ in range(3):
        assert ld.tuned_config([290, 30, 9], 4, 2, 16)[0]["TILE"] == 128
    assert len(calls) == 1
    _put(fresh_db, shape, KernelConfig.make(TILE=64, WORKERS=2, SERIAL=0))  # a write drops the cache
    assert ld.tuned_config([290, 30, 9], 4, 2, 16)[0]["TILE"] == 64 and len(calls) == 2


def test_cli_tune_lean_stores_a_lean_record(tmp_path, capsys):
    db = str(tmp_path / "cli.db")
    assert cli_main(["--db", db, "tune", "--lean", "400+30x3,4,2,16", "--budget", "3s,3c", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "cpu.lean" in out and "lean B=4" in out
    assert cli_main(["--db", db, "db", "list", "--op", LEAN_OP]) == 0
    assert "b4_h4_kvh2_d16_q1_float32" in capsys.readouterr().out
    assert cli_main(["--db", db, "tune", "--lean", "400x,4,2,16"]) == 2


def test_program_cache_is_bounded():
    q, k, v, mask, c, s, gqa = LeanShape((64, 3), 2, 1, 16).make_args()
    for tile in range(1, 2 * lean_cpu._CACHE_SIZE):  # one worker: no thread pools are made
        lean_decode_cpu(q, k, v, mask, c, s, gqa, config=KernelConfig.make(TILE=tile, WORKERS=1, SERIAL=0))
    assert len(lean_cpu._programs) <= lean_cpu._CACHE_SIZE and len(lean_cpu._ranges) <= lean_cpu._CACHE_SIZE


@pytest.mark.parametrize("workers, pays", [(1, True), (4, False)])
def test_measured_lean_rule_counts_the_tuned_workers_extra_calls(fresh_db, installed, workers, pays):
    # saved padding 30000 key-heads: above (B + 2W) x 4096 for W=1 (16384), below it for W=4 (40960)
    lengths = [30100, 100]
    _put(fresh_db, LeanShape(tuple(lengths), 2, 1, 16), KernelConfig.make(TILE=256, WORKERS=workers, SERIAL=0))
    S = max(lengths)
    hf_mask = (torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]).long()
    q, k = torch.randn(2, 2, 1, 16), torch.randn(2, 1, S, 16)
    mask = hf_mask.bool()[:, None, None, :]
    with flags.Context(LEAN_MIN_SKEW=-1.0), context.batch_context(attention_mask=hf_mask) as ctx:
        got = torch.ops.graphtune.attention(q, k, k, mask, False, None, True)
        assert ctx.plans[ld.PLAN_NAME].calls == int(pays)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)
