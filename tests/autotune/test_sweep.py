"""Sweeps (graphtune/autotune/sweep.py): planning, the resume journal, records, a killed CLI run resumed."""
import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

from graphtune.autotune import sweep  # noqa: E402
from graphtune.autotune.db import TuningDB  # noqa: E402
from graphtune.autotune.sweep import JobOutcome, SweepJournal, plan_sweep, run_sweep  # noqa: E402
from graphtune.errors import OptionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODELLED = {"attention", "lean_decode", "merge_states", "shared_prefix", "tree_attention"}

# A stand-in for the cross-compiler, importable by the pool's spawned workers (PYTHONPATH): it appends one
# line per job it starts to $SWEEP_COUNT (O_APPEND: whole lines from every process) and sleeps a little.
FAKE = textwrap.dedent("""
    import json, os, time
    from graphtune.autotune.sweep import JobOutcome

    def run(jobs):
        out = []
        for j in jobs:
            with open(os.environ["SWEEP_COUNT"], "a") as f:
                f.write(j.key + "\\n")
            time.sleep(float(os.environ.get("SWEEP_SLEEP", "0.01")))
            score = (int(j.key[:6], 16) % 1000 + 1) / 1001
            out.append(JobOutcome(j.key, score, {"registers": 64, "fake": True}))
        return out
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    (tmp_path / "fake_runner.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SWEEP_COUNT", str(tmp_path / "count.txt"))
    import fake_runner

    return fake_runner, tmp_path / "count.txt"


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _record_keys(db_path) -> list[tuple]:
    db = TuningDB(str(db_path))
    try:
        return [(r.op, r.device, r.shape_key, r.q_bucket, r.kv_bucket, str(sorted(r.shape.items()))) for r in db.records()]
    finally:
        db.close()


def test_plan_covers_every_family_with_a_triton_kernel_for_every_target():
    jobs = plan_sweep(["sm_80", "sm_90"], max_configs=2)
    assert {j.family for j in jobs} == MODELLED
    per = collections.Counter((j.family, j.impl, str(j.shape), str(j.config)) for j in jobs)
    assert set(per.values()) == {2}  # each (problem, config) once per target
    assert len({j.key for j in jobs}) == len(jobs)


def test_job_key_changes_with_the_kernel_source_and_target_but_group_ignores_config():
    j = plan_sweep(["sm_90"], ["merge_states"], max_configs=2)
    a, b = j[0], j[1]
    assert a.group == b.group and a.key != b.key
    edited = sweep.SweepJob(a.family, a.impl, "another-hash", a.shape, a.config, a.target)
    assert edited.key != a.key
    assert sweep.SweepJob(a.family, a.impl, a.source_hash, a.shape, a.config, "sm_80").group != a.group


def test_bad_target_or_family_raises_option_error_naming_it():
    with pytest.raises(OptionError, match="sm_75"):
        plan_sweep(["sm_75"])
    with pytest.raises(OptionError, match="attn"):
        plan_sweep(["sm_90"], ["attn"])


def test_rerun_skips_journaled_jobs_and_stores_each_record_once(fake, tmp_path):
    runner, counter = fake
    jobs = plan_sweep(["sm_80", "sm_90"], ["merge_states", "tree_attention"], max_configs=3)
    db = TuningDB(str(tmp_path / "t.db"))
    first = run_sweep(jobs, workers=0, db=db, quiet=True, runner=runner.run)
    assert first.ran == len(jobs) == _count(counter) and first.skipped == 0
    groups = {j.group for j in jobs}  # every family tuned by shape has its records kept (KNOWN_OPS is derived)
    assert first.unstored_ops == set() and {j.family for j in jobs} == {"merge_states", "tree_attention"}
    assert len(first.records) == len(groups) == len(db.records())
    again = run_sweep(jobs, workers=0, db=db, quiet=True, runner=runner.run)
    assert again.ran == 0 and again.skipped == len(jobs) and again.records == []
    assert _count(counter) == len(jobs) and len(db.records()) == len(groups)
    # the stored winner is the best-scoring config of its group
    best = {g: max((j for j in jobs if j.group == g), key=lambda j: ((int(j.key[:6], 16) % 1000 + 1) / 1001, j.key))
            for g in groups}
    assert len(best) == len(groups) > 0
    stored = {(r.shape_key, r.device, str(sorted(r.shape.items()))): r.config for r in db.records()}
    for g, j in best.items():
        k = j.shape.key()
        assert stored[(k.shape_key, f"cuda:{j.target}", str(sorted(j.shape.to_dict().items())))] == j.config.to_dict()


def test_group_finished_before_a_kill_but_not_stored_is_stored_on_resume(fake, tmp_path):
    runner, _ = fake
    jobs = plan_sweep(["sm_90"], ["merge_states"], max_configs=2)
    jr_path = tmp_path / "j.sqlite"
    jr = SweepJournal(jr_path)  # as if killed after journaling every job, before storing the record
    for j in jobs:
        jr.add(j, JobOutcome(j.key, 0.5, {"registers": 1}))
    jr.close()
    db = TuningDB(str(tmp_path / "t.db"))
    res = run_sweep(jobs, workers=0, db=db, journal=jr_path, quiet=True, runner=runner.run)
    assert res.ran == 0 and len(res.records) == len({j.group for j in jobs}) == len(db.records())


def test_real_cross_compile_on_a_process_pool_scores_and_stores(tmp_path):
    jobs = plan_sweep(["sm_90"], ["merge_states"], max_configs=1)
    db = TuningDB(str(tmp_path / "t.db"))
    res = run_sweep(jobs, workers=2, db=db, quiet=True)
    assert res.ran == len(jobs) and res.failed == 0
    [r1, r2] = db.records()
    assert r1.mode == r2.mode == "static" and r1.device == "cuda:sm_90" and 0 < r1.score <= 1
    assert r1.details["resources"]["spill_bytes"] == 0


def _cli(db, tmp_path, counter, sleep):
    # a terminal's Ctrl-C: the CLI starts with SIGINT's default disposition. Python keeps SIGINT ignored when
    # it starts with it ignored, as it does under a background job of a non-interactive shell (`make test &`
    # in CI): the sweep then rightly ignores the signal and the SIGINT case exits 0
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "import fake_runner, graphtune.autotune.sweep as s; s.RUNNER = fake_runner.run; "
            "from graphtune.cli import main; raise SystemExit(main(['--db', %r, 'tune', '--all-families', "
            "'--targets', 'sm_80,sm_90', '--jobs', '2', '--quiet']))" % str(db))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "SWEEP_COUNT": str(counter),
           "SWEEP_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(tmp_path), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_sweep_killed_halfway_resumes_with_at_most_5_percent_extra_work_and_no_duplicate_records(fake, tmp_path, sig):
    _, _ = fake
    sleep = 0.02
    full_db, full_count = tmp_path / "full" / "t.db", tmp_path / "full.count"
    full_db.parent.mkdir()
    p = _cli(full_db, tmp_path, full_count, sleep)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    n = _count(full_count)
    assert n > 100 and f"sweep: {n} job(s)" in out

    db, count = tmp_path / "killed" / "t.db", tmp_path / "killed.count"
    db.parent.mkdir()
    p = _cli(db, tmp_path, count, sleep)
    deadline = time.monotonic() + 600
    while _count(count) < n // 2 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, sig)  # the CLI and its pool workers (their own session)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "rerun the same command" in err, err
    before = _count(count)
    assert 0.4 * n <= before <= 0.7 * n, (before, n)

    p = _cli(db, tmp_path, count, sleep)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    total = _count(count)
    print(f"sweep resume: {n} jobs uninterrupted; killed after {before}, {total} in all ({total / n:.3f}x)")
    assert total <= 1.05 * n, (before, total, n)
    assert "already done" in out and f"{n} job(s)" in out
    keys = _record_keys(db)
    assert len(keys) == len(set(keys)) == len(_record_keys(full_db))


def test_spearman_is_one_for_the_same_order_and_minus_one_for_the_reverse():
    from graphtune.autotune.validate_static import spearman

    assert spearman([3, 1, 2, 5], [30, 10, 20, 50]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties share the average rank
    assert spearman([1, 2], [1, 2]) != spearman([1, 2], [1, 2])  # nan below 3 pairs


def test_validate_static_runs_under_the_interpreter_and_reports_spearman(capsys, tmp_path):
    from graphtune.cli import main

    assert os.environ.get("TRITON_INTERPRET") == "1"
    rc = main(["--db", str(tmp_path / "t.db"), "tune", "--validate-static", "--all-families", "--family",
               "merge_states", "--budget", "4c", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "triton.merge_states" in out and "mean Spearman rho over" in out
    row = next(line for line in out.splitlines() if "triton.merge_states" in line)
    assert row.split()[-5] != "0"  # configs measured


def test_validate_static_on_a_cpu_without_the_interpreter_raises_option_error_saying_how(monkeypatch):
    from graphtune.autotune.shapes import MergeShape
    from graphtune.autotune.validate_static import validate_static

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(OptionError, match="TRITON_INTERPRET=1"):
        validate_static([MergeShape(2, 1, 4, 1, 32)], max_configs=2)


def test_sweep_on_the_shared_process_pool_backend_runs_every_job_once_and_resumes(fake, tmp_path, monkeypatch):
    from graphtune.autotune.workers import ProcessPool

    runner, counter = fake
    # the pool's spawned workers import the stand-in runner from tmp_path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    jobs = plan_sweep(["sm_90"], ["merge_states"], max_configs=4)
    db = TuningDB(str(tmp_path / "t.db"))
    with ProcessPool(2) as pool:
        waves = []
        real = pool.run
        monkeypatch.setattr(pool, "run", lambda tasks: waves.append(len(tasks)) or real(tasks))
        first = run_sweep(jobs, db=db, quiet=True, runner=runner.run, backend=pool, chunk=2)
        assert sum(waves) == -(-len(jobs) // 2) and max(waves) <= 4  # chunks of 2, waves of 2 per worker
        assert first.ran == len(jobs) == _count(counter) and first.failed == 0
        again = run_sweep(jobs, db=db, quiet=True, runner=runner.run, backend=pool)
    assert again.ran == 0 and again.skipped == len(jobs) and _count(counter) == len(jobs)
    assert len(db.records()) == len({j.group for j in jobs})
