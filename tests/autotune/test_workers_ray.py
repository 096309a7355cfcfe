"""The Ray backend on a local 2-CPU cluster: tasks run on actors, a hung candidate's actor is killed,
and killing an actor's process mid-run retries its task; the tuning database keeps each result once."""
import os

import pytest

ray = pytest.importorskip("ray")

import worker_fakes as fakes  # noqa: E402
from test_workers import SHAPE, _tag, kill_when_running  # noqa: E402

from graphtune.autotune import AttentionShape, Budget, TuningDB, fingerprint, tune_shape  # noqa: E402
from graphtune.autotune.measure import Candidate  # noqa: E402
from graphtune.autotune.tuner import default_candidate, load_impls  # noqa: E402
from graphtune.autotune.workers import Task, measure_task, to_measurement  # noqa: E402
from graphtune.autotune.workers_ray import RayBackend  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    be = RayBackend(1)  # starts a local cluster: ray.init(num_cpus=2)
    yield be
    be.close()  # shuts the local cluster down
    assert not ray.is_initialized()


@pytest.fixture
def db(tmp_path):
    d = TuningDB(tmp_path / "t.db")
    yield d
    d.close()


def test_ray_actor_measures_a_registered_candidate_and_reports_its_fingerprint(backend):
    load_impls("cpu")
    c = default_candidate(SHAPE.op, "cpu")
    # no wall-clock bound: the first run starts the actor (imports torch), which took 135 s with 4 busy
    # processes on 2 cores; the backend's own start_timeout and the task's timeout bound it instead
    [r] = backend.run([measure_task(c, SHAPE, reps=3)])
    assert r.ok and to_measurement(c, r).ok, r.error
    assert r.worker.startswith("ray pid") and r.worker != f"ray pid {os.getpid()}"
    assert r.fingerprint == fingerprint.current("cpu")  # same machine: the same hardware key


def test_ray_kills_the_actor_of_a_hung_candidate_and_goes_on(backend):
    tag = _tag()
    [r] = backend.run([measure_task(Candidate(fakes.HANG, fakes.cfg(tag)), SHAPE, reps=1, timeout=2.0)])
    assert not r.ok and r.error.startswith("timeout") and "actor killed" in r.error
    [r2] = backend.run([Task("call", "math:factorial", 5)])
    assert r2.ok and r2.value == 120


def test_killing_a_ray_worker_pid_mid_run_retries_and_each_shape_is_stored_once(backend, db):
    tag = _tag()
    slow = Candidate(fakes.SLOW, fakes.cfg(tag, sleep_ms=300))
    shapes = [SHAPE, AttentionShape(1, 4, 4, 1, 200, 16)]
    th = kill_when_running(tag)
    res = [tune_shape(s, "exhaustive", Budget(reps=2), db=db, candidates=[slow], backend=backend) for s in shapes]
    th.join()
    assert len(th.killed) == 1  # an actor process really died mid-run
    assert not any("fake.slow" in f for x in res for f in x.failures), [x.failures for x in res]
    recs = db.records()
    assert sorted(r.shape_key for r in recs) == sorted(s.key().shape_key for s in shapes)
    assert {r.record_id for r in recs} == {x.record_id for x in res}
    assert {r.device for r in recs} == {fingerprint.current("cpu").device}
