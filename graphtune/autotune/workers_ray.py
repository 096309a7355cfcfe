"""The Ray backend of :mod:`graphtune.autotune.workers`: tuning tasks on Ray actors.

Ray is optional (``pip install 'graphtune[distributed]'``); it is imported when a
:class:`RayBackend` is made, never by importing graphtune. Without an address a local cluster is
started (``ray.init(num_cpus=2)``, workers get this process's ``sys.path``) and shut down by
:meth:`RayBackend.close`. Each actor takes one CPU and runs one task at a time with
:func:`graphtune.autotune.workers.execute`; a task past its timeout gets its actor killed
(``ray.kill``: the process ends, a hung kernel with it), and a task whose actor died is re-run on
a fresh actor ``retries`` times, then reported failed. Results carry the fingerprint of the
actor's device: a remote node measures under its own hardware key.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import Any, Sequence

from graphtune.autotune.workers import Backend, Result, Task, _timeout, execute
from graphtune.errors import KernelError, OptionError

__all__ = ["RayBackend"]


def _import_ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError:
        raise OptionError("the Ray backend needs Ray: pip install 'graphtune[distributed]' (or pip install ray)") from None
    return ray


class _RayWorker:
    """A Ray actor's state: runs tasks with :func:`execute` (wrapped by ``ray.remote`` at run time)."""

    def __init__(self) -> None:
        # Ray starts a one-CPU actor with OMP_NUM_THREADS=1; a tuned THREADS=0 config means torch's
        # default (one thread per core of the node), so measure with that, as a user's process runs
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cores)

    def pid(self) -> int:
        return os.getpid()

    def run(self, task: Task) -> Result:
        r = execute(task)
        r.worker = f"ray pid {os.getpid()}"
        return r


class RayBackend(Backend):
    """``n`` Ray actors (one CPU each) on the cluster at ``address``, or on a local 2-CPU cluster.

    Parameters
    ----------
    n : int
        Actors; tasks run concurrently on up to ``n`` of them.
    address : str, optional
        A running cluster (``"ray://host:10001"``, ``"auto"``). Without one, a local cluster is
        started with ``num_cpus`` CPUs and shut down by :meth:`close`.
    retries : int
        Re-runs of a task whose actor died, each on a fresh actor.

    Examples
    --------
    >>> from graphtune.autotune.workers import Task
    >>> from graphtune.autotune.workers_ray import RayBackend
    >>> with RayBackend(1) as ray_backend:  # doctest: +SKIP
    ...     [r] = ray_backend.run([Task("call", "math:factorial", 5)])
    """

    name = "ray"

    def __init__(self, n: int = 1, address: str | None = None, *, retries: int = 1, num_cpus: int = 2,
                 start_timeout: float = 180.0) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise OptionError(f"RayBackend(n={n!r}): the number of actors must be an integer >= 1")
        ray = self._ray = _import_ray()
        self.workers, self.retries, self.address, self.start_timeout = n, retries, address, start_timeout
        self._owns = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:  # workers find test modules and the checkout like this process does
                path = os.pathsep.join(p for p in sys.path if p)
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": path}})
                self._owns = True
        self._cls = ray.remote(num_cpus=1, max_restarts=0)(_RayWorker)
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def pids(self) -> list[int]:
        """Process ids of the idle actors (tests kill one)."""
        return self._ray.get([a.pid.remote() for a in self._idle])

    def _take(self, k: int) -> list[Any]:
        new = [self._cls.remote() for _ in range(max(0, k - len(self._idle)))]
        if new:  # started (torch imported) before a task's timeout counts
            try:
                self._ray.get([a.pid.remote() for a in new], timeout=self.start_timeout)
            except self._ray.exceptions.GetTimeoutError:
                for a in new:
                    self._ray.kill(a)
                raise KernelError(f"Ray actors did not start within {self.start_timeout:.0f} s") from None
        self._idle.extend(new)
        got, self._idle = self._idle[:k], self._idle[k:]
        return got

    def run(self, tasks: Sequence[Task]) -> list[Result]:
        with self._lock:
            return self._run(list(tasks))

    def _run(self, tasks: list[Task]) -> list[Result]:
        ray = self._ray
        results: list[Result | None] = [None] * len(tasks)
        attempts = [0] * len(tasks)
        pending = deque(range(len(tasks)))
        busy: dict[Any, tuple[Any, int, float]] = {}  # ref -> (actor, task index, deadline)
        while pending or busy:
            want = min(self.workers - len(busy), len(pending))
            for a in self._take(want) if want > 0 else []:
                i = pending.popleft()
                attempts[i] += 1
                busy[a.run.remote(tasks[i])] = (a, i, time.monotonic() + _timeout(tasks[i]))
            wait = max(0.0, min(d for _, _, d in busy.values()) - time.monotonic())
            done, _ = ray.wait(list(busy), num_returns=1, timeout=wait)
            now = time.monotonic()
            for ref in list(busy):
                a, i, deadline = busy[ref]
                t = tasks[i]
                if ref in done:
                    del busy[ref]
                    try:
                        r = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the actor died (killed, crashed, its node lost)
                        ray.kill(a)
                        if attempts[i] <= self.retries:
                            pending.appendleft(i)
                        else:
                            results[i] = Result(t.task_id, t.kind, error=f"worker died: {type(e).__name__}",
                                                worker="ray", attempts=attempts[i])
                        continue
                    r.attempts = attempts[i]
                    results[i] = r
                    self._idle.append(a)
                elif now >= deadline:
                    del busy[ref]
                    ray.kill(a)  # its process ends, and the hung candidate with it
                    results[i] = Result(t.task_id, t.kind, error=f"timeout: no result after {_timeout(t):.3g} s "
                                        "(Ray actor killed)", worker="ray", attempts=attempts[i])
        return [r for r in results if r is not None]

    def close(self) -> None:
        for a in self._idle:
            self._ray.kill(a)
        self._idle = []
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns = False
