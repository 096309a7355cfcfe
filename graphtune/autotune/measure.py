"""Measuring one tuning candidate: check it against the reference, then time it.

A candidate that raises, returns a wrong answer or runs past the timeout scores ``inf`` and the
tuning run goes on. The tuner runs candidates through a backend of
:mod:`graphtune.autotune.workers`; the in-process one runs them on the worker thread of
:func:`run_with_timeout`, watched from the caller's thread (a hung kernel cannot be killed from
Python; its thread is abandoned, a fresh worker takes over, and the hang is reported), the
process-pool and Ray backends kill the worker process instead. CPU timing: median of ``reps`` individually timed calls after a warm-up,
with the 20th/80th percentiles as the spread; calls shorter than ~200 µs are timed in batches so
the clock's resolution does not matter. GPU timing: ``triton.testing.do_bench``.
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from graphtune import flags
from graphtune.codegen.registry import Impl, KernelConfig
from graphtune.codegen.family import family_of_op, tolerance

__all__ = ["Candidate", "Measurement", "Bench", "run_with_timeout", "tolerance"]

INF = float("inf")


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: an implementation and one of its configs."""

    impl: Impl
    config: KernelConfig

    def __str__(self) -> str:
        return f"{self.impl.name}[{self.config}]"


@dataclass
class Measurement:
    candidate: Candidate
    median_us: float = INF
    p20_us: float = INF
    p80_us: float = INF
    n_samples: int = 0
    error: str | None = None  # why it scores inf: "crashed: ...", "wrong: ...", "timeout: ..."
    round: int = 0  # successive halving: how far it got (winners come from the last round)

    @property
    def ok(self) -> bool:
        return self.error is None and math.isfinite(self.median_us)


class _Worker:
    """A daemon thread running submitted callables one at a time."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        prev = torch.get_num_threads()
        started = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(started,), daemon=True, name="graphtune-tune-worker")
        self.thread.start()
        started.wait()
        torch.set_num_threads(prev)  # set_num_threads also moved the process default: restore it

    def _loop(self, started: threading.Event) -> None:
        # One intra-op thread here. Why: while a thread holding a multi-threaded OpenMP team is
        # alive, every other team's parallel regions are throttled (more managed threads than
        # cores): a 2-thread product on the caller ran at 187 us instead of 102 us (measured).
        # This thread only checks candidates and runs GPU or compile work; CPU timing happens on
        # the caller (Bench.time, workers.InProcess).
        torch.set_num_threads(1)
        torch.get_num_threads()  # ATen fixes a thread's count at its first query
        started.set()
        while True:
            fn, box, done = self.jobs.get()
            try:
                box.append(("ok", fn()))
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                box.append(("err", e))
            done.set()


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A forked child has none of the parent's threads: a worker inherited from the parent would
    # never answer (every measurement a timeout), and the lock may have been held at fork time.
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def run_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """Run ``fn()`` on the tuning worker thread; raise ``TimeoutError`` after ``timeout`` seconds.

    On timeout the worker is abandoned (it keeps running, as a daemon, until ``fn`` returns) and
    the next call starts a new one.
    """
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _Worker()
        w = _worker
    box: list = []
    done = threading.Event()
    w.jobs.put((fn, box, done))
    if not done.wait(timeout):
        with _worker_lock:
            if _worker is w:
                _worker = None
        raise TimeoutError(f"no result after {timeout:.3g} s")
    kind, val = box[0]
    if kind == "err":
        raise val
    return val


def _reference(op: str, args: tuple) -> tuple:
    # the op family's declared pure-torch reference
    return family_of_op(op).reference_fn()(*args)


def _compare(got: Any, want: tuple, atol: float, rtol: float) -> str | None:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"returned {type(got).__name__}, not (out, lse)"
    for name, g, w in (("out", got[0], want[0]), ("lse", got[1], want[1])):
        if w is None:  # an op without an LSE (linear): the candidate must not invent one
            if g is not None:
                return f"{name} is a {type(g).__name__}, the reference returns None"
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            return f"{name} has shape {getattr(g, 'shape', None)}, expected {tuple(w.shape)}"
        g, w = g.detach().float().cpu(), w.float().cpu()
        fin = torch.isfinite(w)
        if not torch.equal(torch.isfinite(g), fin) or not torch.equal(g[~fin], w[~fin]):
            return f"{name} has inf/nan where the reference has not (or vice versa)"
        err = (g[fin] - w[fin]).abs() - rtol * w[fin].abs()
        if err.numel() and float(err.max()) > atol:
            return f"{name} differs from the reference by {float((g[fin] - w[fin]).abs().max()):.3g}"
    return None


class Bench:
    """Checks and times candidates for one op call ``(op, args)`` on the args' device."""

    def __init__(self, op: str, args: tuple, timeout: float | None = None, guard: bool = True,
                 cold: list[tuple] | None = None) -> None:
        self.op, self.args = op, args
        # timing cycles through these copies of the args (shapes with ``cold_bytes``): their
        # operands then come from memory as in a model, not from a cache the last call warmed
        self.cold = cold or [args]
        self._turn = 0
        self.timeout = flags.get("TUNE_TIMEOUT") if timeout is None else timeout
        self.guard = guard  # False: call directly (a worker backend enforces the timeout around the task)
        self.want = _reference(op, args)
        if op == "merge_states":
            (t0, *_), _ = args  # outs[0] of (outs, lses)
        else:
            t0, *_ = args  # q: the arguments of every attention-like op start (q, k, v, ...)
        self.device = t0.device
        self.atol, self.rtol = tolerance(op, t0.dtype)

    def _call(self, c: Candidate) -> Any:
        return c.impl.fn(*self.args, config=c.config)

    def _call_cold(self, c: Candidate) -> Any:
        self._turn = (self._turn + 1) % len(self.cold)
        return c.impl.fn(*self.cold[self._turn], config=c.config)

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        return run_with_timeout(fn, self.timeout) if self.guard else fn()

    def check(self, c: Candidate) -> Measurement | None:
        """None if the candidate runs and matches the reference, else its ``inf`` measurement."""
        try:
            got = self._guarded(lambda: self._call(c))
        except TimeoutError as e:
            return Measurement(c, error=f"timeout: {e}")
        except Exception as e:  # noqa: BLE001 - any failure scores inf
            return Measurement(c, error=f"crashed: {type(e).__name__}: {e}")
        why = _compare(got, self.want, self.atol, self.rtol)
        return Measurement(c, error=f"wrong: {why}") if why else None

    def time(self, c: Candidate, reps: int) -> Measurement:
        """Median/p20/p80 of ``reps`` timings (microseconds); ``inf`` on failure or timeout."""
        try:
            if self.device.type == "cuda":
                return self._guarded(lambda: self._time_cuda(c, reps))
            # on this thread, never the watched one: a CPU kernel's OpenMP team belongs to the thread
            # that calls it, and models call from theirs (a candidate here has passed its check)
            return self._time_cpu(c, reps)
        except TimeoutError as e:
            return Measurement(c, error=f"timeout: {e}")
        except Exception as e:  # noqa: BLE001
            return Measurement(c, error=f"crashed: {type(e).__name__}: {e}")

    def _time_cpu(self, c: Candidate, reps: int) -> Measurement:
        call = self._call_cold
        for _ in range(len(self.cold) - 1):  # every copy once first: per-operand one-time work (a
            call(c)  # packed weight) must not land in the timed calls
        t0 = time.perf_counter()
        call(c)  # warm-up (allocator, thread team, caches)
        first = time.perf_counter() - t0
        inner = max(1, int(2e-4 / max(first, 1e-7)))
        samples = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            for _ in range(inner):
                call(c)
            samples.append((time.perf_counter() - t0) / inner * 1e6)
        samples.sort()
        return Measurement(c, _quantile(samples, 0.5), _quantile(samples, 0.2), _quantile(samples, 0.8), len(samples))

    def _time_cuda(self, c: Candidate, reps: int) -> Measurement:
        import triton.testing

        ms = triton.testing.do_bench(lambda: self._call(c), rep=max(10, 5 * reps), quantiles=[0.5, 0.2, 0.8])
        return Measurement(c, ms[0] * 1e3, ms[1] * 1e3, ms[2] * 1e3, reps)


def _quantile(xs: list[float], q: float) -> float:
    # linear interpolation on sorted samples
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
