"""Autotuning on this CPU: tuned vs default config for ``graphtune.attention``, and dispatch overheads.

Run: ``.venv/bin/python -m pytest -q benchmarks/bench_autotune.py -s --benchmark-columns=median,iqr,rounds``

* ``test_tuned_vs_default``: the shapes are tuned once (successive halving, small budget) into
  the benchmark's own database; then the op is timed with tuned dispatch off (default config:
  ATen flash with torch's threads; for merge_states the op's reference path) and on, interleaved
  in the same run, and the ratio printed.
* ``test_lookup_latency``: one selector call (the per-call cost of tuned dispatch) for a tuned
  and an untuned shape; goal < 50 µs.
* ``test_default_path_overhead``: a tiny untuned decode attention with the selector installed
  vs not installed, interleaved (what tuned dispatch costs when nothing is tuned).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from graphtune.autotune import AttentionShape, MergeShape, summary_table, tune_shapes
from graphtune.runtime import context, dispatch

SHAPES = [
    AttentionShape(1, 8, 2, 1, 4096, 64),  # GQA decode, long KV
    AttentionShape(4, 8, 2, 1, 1024, 64),  # batched GQA decode
    AttentionShape(1, 8, 8, 1, 2048, 64),  # MHA decode
    AttentionShape(1, 8, 8, 256, 256, 64, causal=True),  # causal prefill
]
MERGES = [MergeShape(4, 1, 32, 1, 128)]  # lean-decode style: 4 partials of a decode step


def _median_us(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ts)


@pytest.fixture(scope="module")
def tuned():
    results = tune_shapes(SHAPES + MERGES, budget_s=40.0)
    print("\n" + summary_table(results))
    dispatch.install()
    yield {r.shape: r for r in results}
    dispatch.uninstall()


@pytest.mark.parametrize("shape", SHAPES + MERGES, ids=str)
def test_tuned_vs_default(benchmark, tuned, shape):
    args = shape.make_args(seed=1)
    op = torch.ops.graphtune.attention if isinstance(shape, AttentionShape) else torch.ops.graphtune.merge_states
    call = lambda: op(*args)  # noqa: E731
    base, tun = [], []
    for _ in range(5):  # interleave so that load from other processes hits both alike
        dispatch.uninstall()
        base.append(_median_us(call, 10))
        dispatch.install()
        tun.append(_median_us(call, 10))
    d, t = statistics.median(base), statistics.median(tun)
    r = tuned[shape]
    benchmark.extra_info.update(default_us=d, tuned_us=t, ratio=d / t, winner=f"{r.impl} {r.config['params']}")
    print(f"\n{shape}: default {d:.1f} us, tuned ({r.impl} {r.config['params']}) {t:.1f} us, "
          f"speedup {d / t:.2f}x")
    benchmark(call)


@pytest.mark.parametrize("which", ["tuned_shape", "untuned_shape"])
def test_lookup_latency(benchmark, tuned, which):
    shape = SHAPES[0] if which == "tuned_shape" else AttentionShape(1, 3, 3, 1, 77, 16)
    args = shape.make_args()
    context._select("attention", args)  # first call fills the in-process cache
    benchmark(context._select, "attention", args)
    med = benchmark.stats.stats.median * 1e6
    print(f"\ndispatch lookup ({which}): median {med:.2f} us (goal < 50 us)")


def test_default_path_overhead(benchmark):
    # a tiny decode attention nothing was tuned for: the selector's lookup is all it adds
    args = AttentionShape(1, 2, 2, 1, 32, 16).make_args()
    op = torch.ops.graphtune.attention
    call = lambda: op(*args)  # noqa: E731
    plain, inst = [], []
    try:
        for _ in range(7):  # interleaved, as above
            dispatch.uninstall()
            plain.append(_median_us(call, 200))
            dispatch.install()
            inst.append(_median_us(call, 200))
        p, i = statistics.median(plain), statistics.median(inst)
        benchmark.extra_info.update(no_selector_us=p, selector_us=i, overhead_us=i - p)
        print(f"\ndefault path (nothing tuned): no selector {p:.2f} us, tuned dispatch installed {i:.2f} us, "
              f"overhead {i - p:.2f} us")
        benchmark(call)
    finally:
        dispatch.uninstall()
