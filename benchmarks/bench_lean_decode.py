"""Lean decode on this CPU vs masked SDPA on the padded batch, a per-sequence SDPA loop, and SDPA.

Run: ``.venv/bin/python -m pytest -q benchmarks/bench_lean_decode.py -s --benchmark-columns=median,iqr,rounds``

Every case times its contenders *interleaved in the same run* (rounds alternate between them,
so load from other processes hits all alike) and prints medians and ratios; pytest-benchmark
then times the lean path alone for its table. fp32, d=64, q_len=1, 8 heads (MHA), left padding.

* ``ragged``: 1 x 32K + 31 x 1K. Targets: >= 6x vs masked SDPA on the padded batch (the padding
  is ~16x the real work), not slower than a per-sequence SDPA loop.
* ``uniform``: 32 x 2K, no padding. Target: not slower than SDPA.
* ``long``: B=1, 256K: the lean split vs SDPA (ATen parallelises over heads only).
* ``skew``: where lean starts to pay vs masked SDPA on the padded batch (8 rows, one of length S,
  the rest S / skew), for a large and a small S — how ``MEASURED_MIN_SKEW`` and
  ``CALL_OVERHEAD_KEYS`` of :mod:`graphtune.runtime.lean_decode` were chosen.
* ``modes``: the ragged batch under the two CPU modes (threads with 1 intra-op thread each, or the
  calling thread with ATen's intra-op threads) and worker counts — how the default was chosen.

Memory: the padded ragged batch is 2 x 2 GiB of K/V (fp32).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from graphtune.codegen.lean_decode.cpu import build_cpu_program, lean_attention_cpu
from graphtune.codegen.lean_decode.plan import make_plan

H, D = 8, 64
THREADS = torch.get_num_threads()


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int = 7, reps: int = 1) -> dict[str, float]:
    """Median ms of each function, rounds alternating between them."""
    for f in fns.values():
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            ts[k].append((time.perf_counter() - t0) * 1e3 / reps)
    return {k: statistics.median(v) for k, v in ts.items()}


def _report(name: str, med: dict[str, float], base: str = "lean") -> None:
    print(f"\n[{name}] medians (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    for k, v in med.items():
        if k != base:
            print(f"[{name}] {k} / {base} = {v / med[base]:.2f}x")


def _batch(lengths: list[int], S: int):
    B = len(lengths)
    q = torch.randn(B, H, 1, D)
    k = torch.randn(B, H, S, D)
    v = torch.randn(B, H, S, D)
    starts = [S - n for n in lengths]
    return q, k, v, starts


def _lean(q, k, v, lengths, starts, tile=256, workers=THREADS, mode="threads"):
    plan = make_plan(lengths, H, tile, workers)
    prog = build_cpu_program(plan, starts)  # plan once per batch; the timed call is the per-layer run
    return lambda: lean_attention_cpu(q, k, v, plan, starts, program=prog, mode=mode)


@pytest.fixture(scope="module")
def ragged():
    torch.manual_seed(0)
    lengths = [32768] + [1024] * 31
    q, k, v, starts = _batch(lengths, 32768)
    mask = torch.full((len(lengths), 1, 1, 32768), float("-inf"))
    for b, s in enumerate(starts):
        mask[b, :, :, s:] = 0
    yield lengths, q, k, v, starts, mask
    del q, k, v, mask


def test_ragged_vs_padded_sdpa_and_per_sequence_loop(benchmark, ragged):
    lengths, q, k, v, starts, mask = ragged
    lean = _lean(q, k, v, lengths, starts)
    padded = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731

    def loop():
        return [F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, s:], v[b:b + 1, :, s:])
                for b, s in enumerate(starts)]

    flash = torch._scaled_dot_product_flash_attention_for_cpu

    def loop_flash():  # the same loop on ATen's flash kernel directly (no SDPA dispatch)
        return [flash(q[b:b + 1], k[b:b + 1, :, s:], v[b:b + 1, :, s:]) for b, s in enumerate(starts)]

    med = _interleaved({"lean": lean, "padded_sdpa": padded, "per_seq_loop": loop, "per_seq_loop_flash": loop_flash},
                       rounds=5)
    _report("ragged 1x32K+31x1K", med)
    benchmark.extra_info.update(med)
    benchmark.pedantic(lean, rounds=5, iterations=1)


def test_ragged_modes_and_workers(ragged):
    lengths, q, k, v, starts, _ = ragged
    fns = {}
    for mode in ("threads", "serial"):
        for w in (1, 2, 4, 8):
            fns[f"{mode}_w{w}"] = _lean(q, k, v, lengths, starts, workers=w, mode=mode)
    fns["threads_w2_tile1024"] = _lean(q, k, v, lengths, starts, tile=1024, workers=2)
    med = _interleaved(fns, rounds=5)
    _report("ragged modes", med, base=f"threads_w{THREADS}")


def test_uniform_vs_sdpa(benchmark):
    torch.manual_seed(0)
    lengths = [2048] * 32
    q, k, v, starts = _batch(lengths, 2048)
    lean = _lean(q, k, v, lengths, starts)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    med = _interleaved({"lean": lean, "sdpa": sdpa, "lean_serial": _lean(q, k, v, lengths, starts, mode="serial")},
                       rounds=9)
    _report("uniform 32x2K", med)
    benchmark.extra_info.update(med)
    benchmark.pedantic(lean, rounds=5, iterations=1)


def test_long_single_sequence_vs_sdpa(benchmark):
    torch.manual_seed(0)
    lengths = [262144]
    q, k, v, starts = _batch(lengths, 262144)
    lean = _lean(q, k, v, lengths, starts)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    med = _interleaved({"lean": lean, "sdpa": sdpa}, rounds=7)
    _report("long B=1 256K", med)
    benchmark.extra_info.update(med)
    benchmark.pedantic(lean, rounds=5, iterations=1)


@pytest.mark.parametrize("S", [8192, 256])
def test_skew_crossover_vs_padded_sdpa(S):
    torch.manual_seed(0)
    rows = 8
    for skew in (1.0, 1.15, 1.3, 1.6, 2.0, 4.0):
        short = max(1, round((rows * S / skew - S) / (rows - 1)))  # padded/real = skew
        lengths = [S] + [short] * (rows - 1)
        q, k, v, starts = _batch(lengths, S)
        mask = torch.zeros(rows, 1, 1, S)
        for b, s0 in enumerate(starts):
            mask[b, :, :, :s0] = float("-inf")
        padded = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
        med = _interleaved({"lean": _lean(q, k, v, lengths, starts), "padded_sdpa": padded},
                           rounds=7, reps=1 if S > 1024 else 20)
        _report(f"skew S={S} padded/real={S * rows / sum(lengths):.2f}", med)
