"""Lean decode CPU path vs unsplit attention: ragged batches, every tile/worker count of a grid,
GQA, q_len 1 and 4 (bottom-right causal), length-1 sequences, 256K skew, both run modes."""
import pytest
import torch
import torch.nn.functional as F

from graphtune.codegen.lean_decode.cpu import build_cpu_program, lean_attention_cpu
from graphtune.errors import PlanError, ShapeError
from graphtune.ir.reference import attention_ref
from graphtune.codegen.lean_decode.plan import make_plan

LENGTHS = [300, 7, 1, 64, 64, 129, 1, 1]  # ragged, length-1 rows, runs of equal rows (batched calls)


def _batch(lengths, hkv, group, lq, d, dtype=torch.float32, pad=5):
    S = max(lengths) + pad
    B = len(lengths)
    q = torch.randn(B, hkv * group, lq, d, dtype=dtype)
    k = torch.randn(B, hkv, S, d, dtype=dtype)
    v = torch.randn(B, hkv, S, d, dtype=dtype)
    starts = [S - n for n in lengths]  # left padding, as HF pads for generation
    return q, k, v, starts


def _reference(q, k, v, starts, lengths, causal):
    outs, lses = [], []
    for b, (s, n) in enumerate(zip(starts, lengths)):
        o, l = attention_ref(q[b:b + 1], k[b:b + 1, :, s:s + n], v[b:b + 1, :, s:s + n],
                             is_causal=causal, enable_gqa=True, bottom_right=True)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("lq, causal", [(1, False), (4, True), (4, False)])
@pytest.mark.parametrize("group", [1, 3])
def test_lean_cpu_matches_unsplit_attention_for_every_tile_and_worker_count(lq, causal, group):
    q, k, v, starts = _batch(LENGTHS, hkv=2, group=group, lq=lq, d=16)
    ref_o, ref_l = _reference(q, k, v, starts, LENGTHS, causal)
    for tile in (1, 16, 64, 1000):
        for workers in (1, 2, 3, 7, 50):
            plan = make_plan(LENGTHS, 2, tile, workers)
            for mode in ("threads", "serial"):
                o, l = lean_attention_cpu(q, k, v, plan, starts, is_causal=causal, mode=mode)
                where = f"tile={tile} workers={workers} mode={mode}"
                torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5, msg=where)
                torch.testing.assert_close(l, ref_l, atol=1e-5, rtol=1e-5, msg=where)


def test_lean_cpu_equals_masked_sdpa_on_the_padded_batch():
    q, k, v, starts = _batch(LENGTHS, hkv=2, group=2, lq=1, d=32)
    S = k.shape[2]
    keep = torch.arange(S)[None, :] >= torch.tensor(starts)[:, None]  # [B, S]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)
    got, _ = lean_attention_cpu(q, k, v, make_plan(LENGTHS, 2, 32, 2), starts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_lean_cpu_half_precision_within_dtype_tolerance(dtype, atol):
    q, k, v, starts = _batch(LENGTHS, hkv=2, group=2, lq=4, d=64, dtype=dtype)
    ref_o, ref_l = _reference(q, k, v, starts, LENGTHS, True)
    o, l = lean_attention_cpu(q, k, v, make_plan(LENGTHS, 2, 16, 5), starts, is_causal=True)
    assert o.dtype == dtype
    torch.testing.assert_close(o.float(), ref_o.float(), atol=atol, rtol=0)
    torch.testing.assert_close(l, ref_l, atol=1e-2, rtol=0)


def test_lean_cpu_extreme_skew_256k_with_single_keys():
    # one 256K sequence next to 1-key sequences; small heads keep the test cheap
    lengths = [262144, 1, 1, 4096]
    q, k, v, starts = _batch(lengths, hkv=1, group=2, lq=1, d=16, pad=0)
    plan = make_plan(lengths, 1, 4096, 3)
    assert plan.split_outputs == (0,)  # the long sequence is shared by all workers
    o, l = lean_attention_cpu(q, k, v, plan, starts)
    ref_o, ref_l = _reference(q, k, v, starts, lengths, False)
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l, ref_l, atol=1e-4, rtol=1e-5)


def test_program_folds_whole_outputs_of_a_sequence_into_one_call():
    plan = make_plan([1000, 10, 10], num_kv_heads=4, tile=100, num_workers=2)
    prog = build_cpu_program(plan)
    # worker 1 ends seq 0 (heads 2..3 whole after a split head), then all heads of seqs 1 and 2
    assert sum(len(c) for c in prog.calls) < len(plan.segments)
    for calls in prog.calls:
        for c in calls:
            assert c.partial < 0 or c.h1 == c.h0 + 1
    assert len(prog.merges) == len(plan.split_outputs)


def test_program_with_starts_folds_equal_sequences_into_one_batched_call():
    lengths = [1000] + [10] * 6
    starts = [0] + [990] * 6
    plan = make_plan(lengths, num_kv_heads=2, tile=100, num_workers=2)
    folded = build_cpu_program(plan, starts)
    # worker 1: the tail of seq 0, then the six 10-key sequences in one call
    assert [(c.seq, c.seq_hi, c.h0, c.h1) for c in folded.calls[1]][-1] == (1, 7, 0, 2)
    q, k, v = torch.randn(7, 2, 1, 8), torch.randn(7, 2, 1000, 8), torch.randn(7, 2, 1000, 8)
    got, _ = lean_attention_cpu(q, k, v, plan, starts, program=folded)
    want, _ = _reference(q, k, v, starts, lengths, False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(PlanError, match="other sequence starts"):
        lean_attention_cpu(q, k, v, plan, [0] + [989] * 6, program=folded)


def test_lean_cpu_rejects_inputs_that_do_not_fit_the_plan():
    q, k, v, starts = _batch([5, 3], hkv=2, group=1, lq=1, d=8)
    with pytest.raises(PlanError, match="kv heads"):
        lean_attention_cpu(q, k, v, make_plan([5, 3], 1, 2, 2), starts)
    with pytest.raises(PlanError, match="batch"):
        lean_attention_cpu(q, k, v, make_plan([5], 2, 2, 2), starts[:1])
    with pytest.raises(PlanError, match="exceed"):
        lean_attention_cpu(q, k, v, make_plan([5, 3], 2, 2, 2), [9, 0])
    with pytest.raises(PlanError, match="mode"):
        lean_attention_cpu(q, k, v, make_plan([5, 3], 2, 2, 2), starts, mode="gpu")
    with pytest.raises(ShapeError, match="dtypes differ"):
        lean_attention_cpu(q, k.half(), v, make_plan([5, 3], 2, 2, 2), starts)


def test_lean_cpu_threads_run_in_a_forked_child_after_the_parent_used_them():
    # the parent's pool threads do not exist in a forked child: reusing the pool hung forever
    import os
    import signal
    import time

    from graphtune.codegen.lean_decode import cpu as lean_cpu

    q, k, v, starts = _batch(LENGTHS, hkv=2, group=2, lq=1, d=16)
    plan = make_plan(LENGTHS, 2, 16, 3)
    want, _ = lean_attention_cpu(q, k, v, plan, starts, mode="threads")
    for _ in range(50):  # until every pool thread has started (a child then gets none of them)
        if all(len(p._threads) == p._max_workers for p in lean_cpu._pools.values()):
            break
        lean_attention_cpu(q, k, v, plan, starts, mode="threads")
        time.sleep(0.01)
    assert lean_cpu._pools  # the parent holds a live pool
    pid = os.fork()
    if pid == 0:  # child: exit 0 iff the threaded run finishes with the parent's answer
        code = 1
        try:
            got, _ = lean_attention_cpu(q, k, v, plan, starts, mode="threads")
            code = 0 if torch.allclose(got, want, atol=1e-6, rtol=1e-6) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("lean CPU attention hung in a forked child")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    # and the parent's pool still works after the fork
    got, _ = lean_attention_cpu(q, k, v, plan, starts, mode="threads")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("lq", [1, 3])
@pytest.mark.parametrize("pad", ["left", "right", "both"])
def test_lean_decode_cpu_honours_start_and_length_of_each_row(pad, lq):
    # right padding: keys at j >= start + len are padding and must weigh nothing (not only j < start);
    # lq = 3: bottom-right causal among each row's real keys
    from graphtune.codegen.lean_decode.cpu import lean_decode_cpu
    from graphtune.codegen.registry import KernelConfig

    lengths, S = [5, 40, 3, 33], 48
    q, k, v = torch.randn(4, 4, lq, 16), torch.randn(4, 2, S, 16), torch.randn(4, 2, S, 16)
    if pad == "left":
        starts = [S - n for n in lengths]
    elif pad == "right":
        starts = [0] * 4
    else:
        starts = [3, 1, 20, 7]
    j = torch.arange(S)[None, :]
    st, ln = torch.tensor(starts)[:, None], torch.tensor(lengths)[:, None]
    real = ((j >= st) & (j < st + ln))[:, None, None, :]  # [B, 1, 1, S]
    k = k.masked_fill(~real.transpose(-1, -2), 1e4)  # padding keys would dominate if attended
    i = torch.arange(lq)[None, None, :, None]
    keep = real & ((j[:, None, None, :] - st[:, :, None, None]) <= ln[:, :, None, None] - lq + i)  # [B, 1, lq, S]
    want, want_lse = attention_ref(q, k, v, keep, enable_gqa=True)
    for cfg in (KernelConfig.make(TILE=8, WORKERS=3, SERIAL=0), KernelConfig.make(TILE=64, WORKERS=1, SERIAL=1)):
        for mask in (keep, torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)):
            got, lse = lean_decode_cpu(q, k, v, mask, enable_gqa=True, config=cfg)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
        got, _ = lean_attention_cpu(q, k, v, make_plan(lengths, 2, 8, 3), starts, is_causal=lq > 1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lean_pools_leave_torchs_thread_count_alone_for_threads_started_later():
    import threading

    from graphtune.codegen.lean_decode import cpu as lean_cpu

    want = torch.get_num_threads()
    pool = lean_cpu._pool(3)
    assert {pool.submit(torch.get_num_threads).result() for _ in range(6)} == {1}  # workers: one intra-op thread
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [want] and torch.get_num_threads() == want
