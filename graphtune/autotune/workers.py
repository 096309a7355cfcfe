"""Where tuning candidates run: one task/result form, three backends (in-process, process pool, Ray).

A :class:`Task` is a picklable description of one candidate job: measure an (implementation,
config) on a tuning shape (:func:`measure_task`), or cross-compile one kernel config for a target
(built by :func:`graphtune.codegen.crosscompile.compile_many`). It names the function that runs it
by dotted path (``"module:function"``), so a worker needs nothing but the task. A :class:`Result`
is the function's value or an error, the task id, and the fingerprint of the device the worker
measured on (:mod:`graphtune.autotune.fingerprint`).

Backends run tasks and never touch the tuning database; the coordinator (the tuner) merges
results into it (:func:`merge`, idempotent: a record merged twice is stored once).

* :class:`InProcess`: the caller's process; a watched thread enforces the timeout, and a hung
  candidate's thread is abandoned (Python cannot kill a thread), the run goes on.
* :class:`ProcessPool`: ``n`` spawned worker processes. A task past its timeout gets its worker
  killed (``SIGKILL``); a worker that dies (segfault, OOM kill, ``kill -9``) is replaced and its
  task retried (``retries`` times), then reported failed. The tuner cannot be taken down.
* :class:`~graphtune.autotune.workers_ray.RayBackend` (``workers_ray.py``): ``n`` Ray actors on a cluster (a local 2-CPU one without an address);
  same timeout, kill and retry rules. Needs ``pip install 'graphtune[distributed]'``.

Examples
--------
>>> from graphtune.autotune.workers import InProcess, Task
>>> [r] = InProcess().run([Task("call", "math:factorial", 5)])
>>> r.ok, r.value
(True, 120)
"""
from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from graphtune import flags
from graphtune.autotune import fingerprint
from graphtune.autotune.db import Record, TuningDB
from graphtune.autotune.measure import Bench, Candidate, Measurement, run_with_timeout
from graphtune.codegen.family import load_impl_modules, resolve
from graphtune.codegen.registry import Impl, KernelConfig, get_impl
from graphtune.errors import GraphtuneError, KernelError, OptionError

__all__ = ["Task", "Result", "Backend", "InProcess", "ProcessPool", "measure_task", "to_measurement",
           "execute", "merge", "make_backend"]


@dataclass(frozen=True)
class Task:
    """One candidate job: ``fn(payload)`` run by a worker (``fn`` is ``"module:function"``).

    ``kind`` is ``"measure"``, ``"compile"`` or ``"call"``; ``timeout`` (seconds) defaults to the
    ``TUNE_TIMEOUT`` flag; ``device`` is where a measure task's tensors live (its fingerprint).
    """

    kind: str
    fn: str
    payload: Any
    timeout: float | None = None
    device: str = "cpu"
    task_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Result:
    """What a worker sends back for one :class:`Task`: ``value`` or ``error``, and where it ran."""

    task_id: str
    kind: str
    value: Any = None
    error: str | None = None  # "crashed: ...", "timeout: ...", "worker died: ..."
    fingerprint: fingerprint.Fingerprint | None = None
    worker: str = ""  # "pid 1234", "ray pid 1234"
    attempts: int = 1
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _timeout(task: Task) -> float:
    return float(flags.get("TUNE_TIMEOUT") if task.timeout is None else task.timeout)


def _fingerprint(device: str) -> fingerprint.Fingerprint | None:
    try:
        return fingerprint.current(device)
    except (GraphtuneError, RuntimeError, AssertionError):
        return None


def execute(task: Task) -> Result:
    """Run one task here (every backend's worker side); exceptions become the result's error."""
    t0 = time.perf_counter()
    value, error = None, None
    try:
        value = resolve(task.fn)(task.payload)
    except Exception as e:  # noqa: BLE001 - any failure is the candidate's result
        error = f"crashed: {type(e).__name__}: {e}"
    return Result(task.task_id, task.kind, value, error, _fingerprint(task.device), f"pid {os.getpid()}",
                  seconds=time.perf_counter() - t0)


# ======================================================================================
# Measure tasks
# ======================================================================================


@dataclass(frozen=True)
class _MeasurePayload:
    op: str
    impl: str
    impl_module: str  # imported by the worker: registering modules register the impl on import
    config: KernelConfig
    shape: Any
    reps: int
    seed: int
    device: str
    check: bool
    impl_obj: Impl | None = field(default=None, compare=False)  # in-process only: never pickled

    def __reduce__(self):
        return (_MeasurePayload, (self.op, self.impl, self.impl_module, self.config, self.shape, self.reps,
                                  self.seed, self.device, self.check))


def measure_task(candidate: Candidate, shape: Any, reps: int, *, seed: int = 0, device: str = "cpu",
                 check: bool = True, timeout: float | None = None) -> Task:
    """A task that checks ``candidate`` against the reference on ``shape`` (if ``check``), then times it.

    Its value is a dict (``median_us``, ``p20_us``, ``p80_us``, ``n_samples``, ``error``,
    ``check_failed``); :func:`to_measurement` turns a result into a
    :class:`~graphtune.autotune.measure.Measurement`. The timeout defaults to ``TUNE_TIMEOUT`` for
    the check plus as much for the timing.

    Examples
    --------
    >>> from graphtune.autotune.shapes import AttentionShape
    >>> from graphtune.autotune.tuner import default_candidate, load_impls
    >>> from graphtune.autotune.workers import InProcess, measure_task, to_measurement
    >>> load_impls("cpu")
    >>> shape = AttentionShape(1, 4, 2, 1, 256, 32)
    >>> c = default_candidate(shape.op, "cpu")
    >>> [r] = InProcess().run([measure_task(c, shape, reps=3)])
    >>> to_measurement(c, r).ok
    True
    """
    if timeout is None:
        timeout = flags.get("TUNE_TIMEOUT") * (2 if check else 1)
    impl = candidate.impl
    mod = getattr(impl.fn, "__module__", None) or ""
    p = _MeasurePayload(impl.op, impl.name, mod, candidate.config, shape, int(reps), seed, str(device), check, impl)
    return Task("measure", "graphtune.autotune.workers:_run_measure", p, timeout, str(device))


def to_measurement(candidate: Candidate, result: Result) -> Measurement:
    """The :class:`Measurement` of a measure task's result (``inf`` with the error if it failed)."""
    if not result.ok:
        return Measurement(candidate, error=result.error)
    v = result.value
    return Measurement(candidate, v["median_us"], v["p20_us"], v["p80_us"], v["n_samples"], v["error"])


_BENCHES: dict[tuple, Bench] = {}  # worker side: one Bench (args + reference) per shape, seed, device


def _to(x: Any, dev: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(y, dev) for y in x)
    return x


def _bench_for(p: _MeasurePayload) -> Bench:
    key = (p.op, p.shape, p.seed, p.device)
    b = _BENCHES.get(key)
    if b is None:
        if len(_BENCHES) >= 4:
            _BENCHES.clear()
        args = _to(p.shape.make_args(p.seed), torch.device(p.device))
        b = _BENCHES[key] = Bench(p.op, args, guard=False,  # the backend enforces the timeout
                                  cold=_cold_copies(p, args))
    return b


def _cold_copies(p: _MeasurePayload, args: tuple) -> list[tuple] | None:
    """Enough copies of ``args`` to exceed the shape's ``cold_bytes`` (None: the shape has none)."""
    want = getattr(p.shape, "cold_bytes", 0)
    size = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
    if not want or not size or size >= want:
        return None
    n = min(64, -(-want // size))
    return [args] + [_to(p.shape.make_args(p.seed + i), torch.device(p.device)) for i in range(1, n)]


def _resolve_impl(p: _MeasurePayload) -> Impl:
    if p.impl_obj is not None:
        return p.impl_obj
    impl = get_impl(p.op, p.impl)
    if impl is None and p.impl_module:  # registered on import, or a module-level Impl there (tests' fakes)
        mod = importlib.import_module(p.impl_module)
        impl = get_impl(p.op, p.impl) or next((v for v in vars(mod).values() if isinstance(v, Impl)
                                                and (v.op, v.name) == (p.op, p.impl)), None)
    if impl is None:
        load_impl_modules(torch.device(p.device).type)
        impl = get_impl(p.op, p.impl)
    if impl is None:
        raise KernelError(f"implementation {p.impl!r} of {p.op} is not registered in the worker (module "
                          f"{p.impl_module!r} registers nothing by that name)")
    return impl


def _run_measure(p: _MeasurePayload) -> dict[str, Any]:
    c = Candidate(_resolve_impl(p), p.config)
    bench = _bench_for(p)
    m = bench.check(c) if p.check else None
    failed = m is not None
    if m is None and p.reps <= 0:  # check only (InProcess times CPU candidates on its own thread)
        return {"median_us": float("inf"), "p20_us": float("inf"), "p80_us": float("inf"), "n_samples": 0,
                "error": None, "check_failed": False}
    if m is None:
        m = bench.time(c, p.reps)
    return {"median_us": m.median_us, "p20_us": m.p20_us, "p80_us": m.p80_us, "n_samples": m.n_samples,
            "error": m.error, "check_failed": failed}


# ======================================================================================
# Merging into the tuning database (coordinator only)
# ======================================================================================


def merge(db: TuningDB, rec: Record) -> Record:
    """Store ``rec`` in ``db`` once: its ``record_id`` is derived from its content, so merging the
    same result again (a retried task, a re-sent batch) adds nothing.

    Examples
    --------
    >>> import os, tempfile
    >>> from graphtune.autotune.db import Record, TuningDB
    >>> from graphtune.autotune.workers import merge
    >>> db = TuningDB(os.path.join(tempfile.mkdtemp(), "t.db"), import_shipped=False)
    >>> r = Record("merge_states", "cpu.torch", "h", "cpu:x", "x", "v", "k", 1, 1, {"params": {}}, 5.0, 4.0, 6.0,
    ...            3, 6.0, "measured")
    >>> merge(db, r).record_id == merge(db, Record(**{**r.to_json(), "record_id": ""})).record_id
    True
    >>> db.count()
    1
    """
    if not rec.record_id:
        d = rec.to_json()
        d.pop("record_id"), d.pop("created_at")
        rec.record_id = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]
    report = db.import_records([rec.to_json()])
    if report.rejected:
        raise KernelError(f"tuning result for {rec.op} {rec.impl} rejected by the database: "
                          f"{report.rejected_summary()}")
    return db.get(rec.record_id) or rec


# ======================================================================================
# Backends
# ======================================================================================


class Backend:
    """Runs tasks and returns one :class:`Result` per task, in order (never raises for a task)."""

    name = "backend"
    workers = 1

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        raise NotImplementedError

    def run_one(self, task: Task) -> Result:
        return self.run([task])[0]

    def close(self) -> None:
        pass

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(workers={self.workers})"


class InProcess(Backend):
    """Runs tasks in this process, one at a time, on the watched tuning thread (the old ``measure._Worker``)."""

    name = "in-process"

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        out = []
        for t in tasks:
            p = t.payload
            if t.kind == "measure" and torch.device(t.device).type == "cpu" and p.reps > 0:
                # an OpenMP thread team belongs to the thread that starts it: a multi-threaded CPU
                # kernel timed on the watched thread competes with this thread's team (measured
                # 92 us instead of 48 us for a 2-thread product). So only the check, which may
                # hang, runs there; a candidate that passed it is timed here, where models run.
                if p.check:
                    r = self._watched(replace(t, payload=replace(p, reps=0)))
                    if not r.ok or r.value["check_failed"]:
                        out.append(r)
                        continue
                out.append(execute(replace(t, payload=replace(p, check=False))))
                continue
            out.append(self._watched(t))
        return out

    @staticmethod
    def _watched(t: Task) -> Result:
        try:
            return run_with_timeout(lambda: execute(t), _timeout(t))
        except TimeoutError as e:  # the thread is abandoned; the next task gets a fresh one
            return Result(t.task_id, t.kind, error=f"timeout: {e}", fingerprint=_fingerprint(t.device),
                          worker="in-process")


def _process_main(conn: multiprocessing.connection.Connection, env: dict[str, str | None]) -> None:
    # worker process: apply the pool's environment before anything imports Triton, then serve tasks
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(execute(task))


class _Proc:
    def __init__(self, ctx: Any, env: dict[str, str | None]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_process_main, args=(child, env), daemon=True, name="graphtune-tune-worker")
        self.proc.start()
        child.close()
        self.pid: int | None = None

    def wait_ready(self, timeout: float) -> None:
        if not self.conn.poll(timeout):
            self.kill()
            raise KernelError(f"a tuning worker process did not start within {timeout:.0f} s")
        try:
            kind, self.pid = self.conn.recv()
        except (EOFError, OSError):
            raise KernelError(f"a tuning worker process died while starting (exit code {self.proc.exitcode})") from None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def died(self) -> str:
        self.proc.join(5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            return f"worker died: pid {self.pid} killed by {signal.Signals(-code).name}"
        return f"worker died: pid {self.pid} exited with code {code}"


class ProcessPool(Backend):
    """``n`` worker processes (spawned, started on first use, kept between runs).

    Parameters
    ----------
    n : int
        Worker processes; tasks run concurrently on up to ``n`` of them.
    retries : int
        How many times a task whose worker died is re-run on a fresh worker before it is
        reported failed. A timed-out task is not retried (it would hang again).
    env : dict, optional
        Environment changes for the workers (``None`` removes a variable), applied before the
        worker imports anything heavy: ``compile_many`` removes ``TRITON_INTERPRET``.
    start_timeout : float
        Seconds a worker may take to start (importing torch), not counted in a task's timeout.

    Examples
    --------
    >>> from graphtune.autotune.workers import ProcessPool, Task
    >>> with ProcessPool(1) as pool:
    ...     [r] = pool.run([Task("call", "math:factorial", 5)])
    >>> r.value, r.worker.startswith("pid")
    (120, True)
    """

    name = "process-pool"

    def __init__(self, n: int = 1, *, retries: int = 1, env: dict[str, str | None] | None = None,
                 start_timeout: float = 180.0) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise OptionError(f"ProcessPool(n={n!r}): the number of worker processes must be an integer >= 1")
        if retries < 0:
            raise OptionError(f"ProcessPool(retries={retries!r}) must be >= 0")
        self.workers, self.retries, self.env, self.start_timeout = n, retries, dict(env or {}), start_timeout
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch's thread pools
        self._idle: list[_Proc] = []
        self._lock = threading.Lock()  # one run at a time

    def _take(self, k: int) -> list[_Proc]:
        for w in [w for w in self._idle if not w.proc.is_alive()]:  # died between runs
            self._idle.remove(w)
            w.kill()
        new = [_Proc(self._ctx, self.env) for _ in range(max(0, k - len(self._idle)))]
        for w in new:  # all started before any is waited for: they import torch in parallel
            w.wait_ready(self.start_timeout)
        self._idle.extend(new)
        got, self._idle = self._idle[:k], self._idle[k:]
        return got

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        with self._lock:
            return self._run(list(tasks))

    def _run(self, tasks: list[Task]) -> list[Result]:
        results: list[Result | None] = [None] * len(tasks)
        attempts = [0] * len(tasks)
        pending = deque(range(len(tasks)))
        busy: dict[_Proc, tuple[int, float]] = {}  # worker -> (task index, deadline)
        try:
            while pending or busy:
                want = min(self.workers - len(busy), len(pending))
                for w in self._take(want) if want > 0 else []:
                    i = pending.popleft()
                    attempts[i] += 1
                    try:
                        w.conn.send(tasks[i])
                    except OSError:  # it died after _take looked: another worker takes the task
                        w.kill()
                        attempts[i] -= 1
                        pending.appendleft(i)
                        continue
                    busy[w] = (i, time.monotonic() + _timeout(tasks[i]))
                if not busy:
                    continue
                wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
                ready = multiprocessing.connection.wait([w.conn for w in busy], timeout=wait)
                now = time.monotonic()
                for w in list(busy):
                    i, deadline = busy[w]
                    t = tasks[i]
                    if w.conn in ready:
                        try:
                            r = w.conn.recv()
                        except (EOFError, OSError):
                            del busy[w]
                            why = w.died()
                            w.kill()
                            if attempts[i] <= self.retries:
                                pending.appendleft(i)  # a fresh worker runs it again
                            else:
                                results[i] = Result(t.task_id, t.kind, error=why, worker=f"pid {w.pid}",
                                                    attempts=attempts[i])
                            continue
                        r.attempts = attempts[i]
                        results[i] = r
                        del busy[w]
                        self._idle.append(w)
                    elif now >= deadline:
                        del busy[w]
                        w.kill()  # a hung kernel dies with its process
                        results[i] = Result(t.task_id, t.kind, error=f"timeout: no result after {_timeout(t):.3g} s "
                                            f"(worker pid {w.pid} killed)", worker=f"pid {w.pid}", attempts=attempts[i])
        finally:
            for w in busy:  # interrupted (KeyboardInterrupt): leave no half-used worker behind
                w.kill()
        return [r for r in results if r is not None]

    def close(self) -> None:
        for w in self._idle:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.proc.join(2)
            w.kill()
        self._idle = []


def make_backend(workers: int | None = None, ray: str | bool | None = None) -> Backend:
    """The backend the CLI's ``--workers N`` / ``--ray [ADDRESS]`` ask for (in-process without either).

    >>> make_backend().name
    'in-process'
    """
    if ray is not None and ray is not False:
        ray_backend = resolve("graphtune.autotune.workers_ray:RayBackend")  # by name: workers_ray imports this module
        return ray_backend(workers or 1, None if ray is True or ray == "" else str(ray))
    if workers:
        return ProcessPool(workers)
    return InProcess()
