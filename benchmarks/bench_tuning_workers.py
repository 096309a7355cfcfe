"""Tuning throughput of the worker backends, in one run: in-process, process pool (1, 2 workers), Ray (1, 2 actors).

Run: ``.venv/bin/python -m pytest -q benchmarks/bench_tuning_workers.py -s`` (Ray rows need
``pip install 'graphtune[distributed]'``; they are left out without it).

For each backend, the same measure tasks (every registered CPU candidate of one GQA decode shape,
checked against the reference and timed with 5 repetitions) run as one batch after the workers
have started, in three rounds interleaved across the backends (this machine is shared and its load
drifts); the one-worker rows are the two-worker pool and Ray backend limited to one worker.
Printed per backend (medians of the rounds):

* ``start_s``: starting the workers (spawn + import torch; Ray: actors on a local 2-CPU cluster);
* ``cand/min``: candidates measured per minute of wall-clock time;
* ``overhead_ms``: per candidate, worker-seconds spent outside the task
  (``(wall x workers - sum of in-task seconds) / candidates``): scheduling, pickling, transport;
* ``noop_ms``: round trip of an empty task (one worker at a time);
* ``winner_us``: the median time of the fastest candidate measured there, against in-process:
  two workers timing kernels at once on a 2-core machine slow each other down.
"""
from __future__ import annotations

import statistics
import time

import pytest

from graphtune.autotune.shapes import AttentionShape
from graphtune.autotune.tuner import _candidates, default_candidate, load_impls
from graphtune.autotune.workers import InProcess, ProcessPool, Task, measure_task, to_measurement

SHAPE = AttentionShape(1, 8, 2, 1, 1024, 64)
REPS = 5
ROUNDS = 3


def _tasks():
    load_impls("cpu")
    args = SHAPE.make_args(0)
    cands = _candidates(SHAPE.op, "cpu", args, default_candidate(SHAPE.op, "cpu", args))
    return cands, [measure_task(c, SHAPE, REPS) for c in cands]


def _start(be) -> float:
    t0 = time.perf_counter()
    be.run([Task("call", "math:factorial", 1)] * be.workers)  # start every worker
    return time.perf_counter() - t0


def _noop_ms(be) -> float:
    ts = []
    for _ in range(20):
        t0 = time.perf_counter()
        be.run_one(Task("call", "math:factorial", 1))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def test_tuning_worker_throughput():
    cands, tasks = _tasks()
    backends = {"in-process": InProcess(), "process pool": ProcessPool(2)}
    if _have_ray():
        from graphtune.autotune.workers_ray import RayBackend

        backends["ray (local)"] = RayBackend(2)  # one local 2-CPU cluster: 2 actors, or 1 of them
    start = {name: _start(be) for name, be in backends.items()}
    rows = [(name, w) for name, be in backends.items() for w in ([1] if name == "in-process" else [1, 2])]
    stats: dict = {r: {"wall": [], "inside": [], "winner": [], "ok": []} for r in rows}
    noop = {}
    for name, be in backends.items():
        be.workers = 1
        noop[name] = _noop_ms(be)
        be.workers = 1 if name == "in-process" else 2
        be.run(tasks)  # warm every worker's Bench (args + reference) for the shape
    for _ in range(ROUNDS):  # interleaved: a load change on this shared machine hits every backend alike
        for name, w in rows:
            be = backends[name]
            be.workers = w
            t0 = time.perf_counter()
            results = be.run(tasks)
            st = stats[(name, w)]
            st["wall"].append(time.perf_counter() - t0)
            st["inside"].append(sum(r.seconds for r in results))
            ms = [to_measurement(c, r) for c, r in zip(cands, results)]
            st["ok"].append(sum(m.ok for m in ms))
            st["winner"].append(min(m.median_us for m in ms if m.ok))
    for be in reversed(list(backends.values())):
        be.close()
    n = len(tasks)
    base = statistics.median(stats[("in-process", 1)]["winner"])
    print(f"\n{n} candidates of {SHAPE}, {REPS} reps each; medians of {ROUNDS} interleaved rounds")
    print(f"{'backend':<14}{'workers':>8}{'start_s':>9}{'cand/min':>10}{'overhead_ms':>13}{'noop_ms':>9}"
          f"{'winner_us':>11}{'vs in-proc':>11}")
    for name, w in rows:
        st = stats[(name, w)]
        wall, inside = statistics.median(st["wall"]), statistics.median(st["inside"])
        win = statistics.median(st["winner"])
        print(f"{name:<14}{w:>8}{start[name]:>9.2f}{n / wall * 60:>10.0f}{max(0.0, wall * w - inside) / n * 1e3:>13.2f}"
              f"{noop[name]:>9.2f}{win:>11.1f}{win / base:>10.2f}x")
    assert all(k == n for st in stats.values() for k in st["ok"])


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
