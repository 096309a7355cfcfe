"""Worker backends: tasks and results, the process pool's kill-on-timeout and retry-on-death, and the
tuning database after a worker is killed mid-run (results merged once by the coordinator)."""
import os
import random
import signal
import threading
import time

import pytest

import worker_fakes as fakes
from graphtune import flags
from graphtune.autotune import AttentionShape, Budget, TuningDB, fingerprint, tune_shape, tune_shapes
from graphtune.autotune.measure import Candidate
from graphtune.autotune.tuner import default_candidate, load_impls
from graphtune.autotune.workers import (InProcess, ProcessPool, Result, Task, make_backend, measure_task, merge,
                                        to_measurement)
from graphtune.errors import OptionError

SHAPE = AttentionShape(1, 4, 2, 1, 300, 16)


@pytest.fixture
def db(tmp_path):
    d = TuningDB(tmp_path / "t.db")
    yield d
    d.close()


@pytest.fixture(scope="module")
def pool():
    p = ProcessPool(1)
    yield p
    p.close()


def _tag() -> int:
    tag = random.randrange(1 << 30)
    if os.path.exists(fakes.pidfile(tag)):
        os.unlink(fakes.pidfile(tag))
    return tag


def kill_when_running(tag: int, times: int = 1, timeout: float = 60.0) -> threading.Thread:
    """Kill (SIGKILL) the worker running a fake with ``tag``, ``times`` times, as soon as it starts."""
    killed: set[int] = set()

    def killer():
        t_end = time.monotonic() + timeout
        while len(killed) < times and time.monotonic() < t_end:
            try:
                pid = int(open(fakes.pidfile(tag)).read())
            except (OSError, ValueError):
                pid = 0
            if pid and pid not in killed and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.01)

    th = threading.Thread(target=killer, daemon=True)
    th.killed = killed  # the pids it killed
    th.start()
    return th


def test_in_process_backend_runs_a_task_and_reports_this_device():
    [r] = InProcess().run([Task("call", "math:factorial", 6)])
    assert r.ok and r.value == 720 and r.fingerprint == fingerprint.current("cpu") and r.worker == f"pid {os.getpid()}"


def test_a_raising_task_is_an_error_result_not_an_exception():
    [r] = InProcess().run([Task("call", "math:factorial", -1)])
    assert not r.ok and r.error.startswith("crashed: ValueError")


def test_measure_tasks_are_picklable_and_resolve_the_impl_by_name_in_a_worker(pool):
    load_impls("cpu")
    c = default_candidate(SHAPE.op, "cpu")
    [r] = pool.run([measure_task(c, SHAPE, reps=3)])
    m = to_measurement(c, r)
    assert r.ok and m.ok and m.n_samples == 3, r.error
    assert r.worker != f"pid {os.getpid()}" and r.fingerprint == fingerprint.current("cpu")


def test_pool_kills_a_hung_candidate_and_its_next_task_runs_on_a_fresh_worker(pool):
    tag = _tag()
    c = Candidate(fakes.HANG, fakes.cfg(tag))
    t0 = time.monotonic()
    [r] = pool.run([measure_task(c, SHAPE, reps=2, timeout=1.0)])
    assert time.monotonic() - t0 < 60  # did not wait for the 120 s hang (5 s with 4 busy processes on 2 cores)
    assert not r.ok and r.error.startswith("timeout") and "killed" in r.error
    pid = int(open(fakes.pidfile(tag)).read())
    with pytest.raises(ProcessLookupError):  # the hung worker is gone, not abandoned
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    [r2] = pool.run([Task("call", "math:factorial", 4)])
    assert r2.ok and r2.value == 24 and r2.worker != f"pid {pid}"


def test_a_segfaulting_candidate_is_retried_then_reported_and_the_tuner_goes_on(db):
    tag = _tag()
    bad = Candidate(fakes.SEGFAULT, fakes.cfg(tag))
    with ProcessPool(1, retries=1) as p:
        res = tune_shape(SHAPE, "exhaustive", Budget(reps=2), db=db, candidates=[bad], backend=p)
        [r] = p.run([measure_task(bad, SHAPE, reps=2)])
    assert r.attempts == 2 and r.error == f"worker died: pid {int(open(fakes.pidfile(tag)).read())} killed by SIGSEGV"
    assert res.impl == "cpu.flash" and any("fake.segfault" in f and "SIGSEGV" in f for f in res.failures)
    assert len(db.records()) == 1


def test_killing_a_pool_worker_mid_run_retries_its_task_and_each_shape_is_stored_once(db):
    # the slow fake runs 0.3 s per call; its worker is SIGKILLed once, during its first call
    tag = _tag()
    slow = Candidate(fakes.SLOW, fakes.cfg(tag, sleep_ms=300))
    shapes = [SHAPE, AttentionShape(1, 4, 4, 1, 200, 16)]
    with ProcessPool(1) as p:
        th = kill_when_running(tag)
        [r] = p.run([measure_task(slow, SHAPE, reps=2)])
        th.join()
        assert r.ok and r.attempts == 2 and to_measurement(slow, r).ok, r.error
        th = kill_when_running(tag)
        res = [tune_shape(s, "exhaustive", Budget(reps=2), db=db, candidates=[slow], backend=p) for s in shapes]
        th.join()
    assert len(th.killed) == 1 and all(x.record_id for x in res)
    recs = db.records()
    assert sorted(r.shape_key for r in recs) == sorted(s.key().shape_key for s in shapes)  # none lost, none twice
    assert {r.device for r in recs} == {fingerprint.current("cpu").device}
    assert not any("fake.slow" in f for x in res for f in x.failures)  # the killed task was retried, not failed
    n = db.count()
    for rec in recs:  # merging the same results again adds nothing
        merge(db, type(rec)(**{**rec.to_json(), "record_id": "", "created_at": ""}))
    assert db.count() == n


def test_tune_shapes_through_a_pool_matches_the_in_process_winner_space(db):
    with ProcessPool(1) as p:
        [res] = tune_shapes([SHAPE], budget_s=20, max_candidates=3, db=db, backend=p)
    assert res.impl.startswith("cpu.") and res.median_us and res.n_tried >= 2
    [rec] = db.records()
    assert rec.record_id == res.record_id and rec.device == fingerprint.current("cpu").device


def test_backend_options_are_checked():
    with pytest.raises(OptionError, match="integer >= 1"):
        ProcessPool(0)
    assert make_backend().name == "in-process" and make_backend(workers=2).workers == 2


def test_ray_backend_without_ray_says_how_to_install_it(monkeypatch):
    import sys

    from graphtune.autotune.workers_ray import RayBackend

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(OptionError, match=r"pip install 'graphtune\[distributed\]'"):
        RayBackend(1)


def test_result_errors_make_inf_measurements():
    load_impls("cpu")
    c = default_candidate(SHAPE.op, "cpu")
    m = to_measurement(c, Result("x", "measure", error="worker died: pid 1 killed by SIGKILL"))
    assert not m.ok and m.median_us == float("inf") and m.error.startswith("worker died")


def test_flags_timeout_is_the_default_task_timeout(pool):
    tag = _tag()
    with flags.Context(TUNE_TIMEOUT=0.5):
        [r] = pool.run([measure_task(Candidate(fakes.HANG, fakes.cfg(tag)), SHAPE, reps=1, check=False)])
    assert r.error.startswith("timeout: no result after 0.5 s")


def test_cli_tune_with_worker_processes_prints_the_winner(capsys):
    from graphtune.cli import main

    assert main(["tune", "--shape", "1,4,2,1,300,16", "--budget", "2c", "--workers", "1", "--quiet",
                 "--no-store"]) == 0
    assert "cpu." in capsys.readouterr().out
    assert main(["tune", "--shape", "1,4,2,1,300,16", "--workers", "0", "--no-store"]) == 2
    assert "--workers must be a positive number" in capsys.readouterr().err


def test_pool_workers_get_the_pools_environment_changes(monkeypatch):
    # compile_many's pool removes TRITON_INTERPRET: Triton must be imported without it to compile
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ProcessPool(1, env={"TRITON_INTERPRET": None, "GRAPHTUNE_WORKER_TEST": "x"}) as p:
        got = p.run([Task("call", "os:getenv", "TRITON_INTERPRET"), Task("call", "os:getenv", "GRAPHTUNE_WORKER_TEST")])
    assert [r.value for r in got] == [None, "x"]
