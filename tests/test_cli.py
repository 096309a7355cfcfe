"""The ``graphtune`` command line, called in-process through ``main([...])``."""
import json

import pytest

from graphtune import cli
from graphtune.autotune import db as dbmod
from graphtune.autotune.db import Record, TuningDB


@pytest.fixture(autouse=True)
def _no_shipped_records(tmp_path_factory, monkeypatch):
    # these tests count records: fresh databases start empty (tests/autotune/test_db.py loads the shipped ones)
    monkeypatch.setattr(dbmod, "SHIPPED_DIR", tmp_path_factory.mktemp("no-shipped-records"))


@pytest.fixture
def dbpath(tmp_path):
    p = str(tmp_path / "cli.db")
    yield p
    dbmod.forget_db(p)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------- tune

def test_tune_explicit_shapes_prints_summary_and_stores_winners(capsys, dbpath):
    rc, out, err = run(capsys, "--db", dbpath, "tune", "--shape", "1,4,2,1,300,16", "--shape", "1,2,2,9,9,8,causal",
                       "--merge", "2,1,4,1,16", "--budget", "4s", "--strategy", "exhaustive")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["shape", "winner"] and len(lines) == 5
    assert "B=1 H=4/2 L=1 S=300 D=16" in out and "causal" in lines[3] and "merge N=2" in lines[4]
    assert all(line.split()[-3].endswith("x") for line in lines[2:])  # a speedup per shape
    assert "[1/3]" in err and "[3/3]" in err  # progress on stderr
    assert TuningDB(dbpath).count() == 3


def test_tune_workload_expands_to_prefill_and_decode(capsys, dbpath):
    rc, out, err = run(capsys, "--db", dbpath, "tune", "--batch", "1,2", "--seq", "16", "--heads", "4", "--kv-heads", "2",
                       "--head-dim", "8", "--budget", "3s,3c", "--no-store", "--quiet")
    assert rc == 0, err
    assert "L=16 S=16" in out and "L=1 S=16" in out and "B=2" in out and err == ""
    assert len(out.strip().splitlines()) == 2 + 4
    assert TuningDB(dbpath).count() == 0
    shapes = cli.workload_shapes([1], [128], 8, 2, 64)
    assert [(s.q_len, s.kv_len, s.causal) for s in shapes] == [(128, 128, True), (1, 128, False)]


def test_tune_with_model_config(capsys, dbpath, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 1, "hidden_size": 32}))
    rc, out, _ = run(capsys, "--db", dbpath, "tune", "--model-config", str(cfg), "--batch", "1", "--seq", "8",
                     "--budget", "2s,2c", "--quiet", "--no-store")
    assert rc == 0 and "H=4/1" in out and "D=8" in out


@pytest.mark.parametrize("argv,msg", [
    (["tune"], "nothing to tune"),
    (["tune", "--shape", "1,2,3"], "not B,H,KVH"),
    (["tune", "--merge", "2,1,4"], "not N,B,H,L,D"),
    (["tune", "--batch", "1", "--seq", "8"], "--heads"),
    (["tune", "--shape", "1,2,2,1,8,8", "--budget", "fast"], "budget"),
    (["tune", "--shape", "1,2,2,1,8,8", "--strategy", "genetic"], "strategy"),
    (["tune", "--shape", "1,2,2,1,8,8", "--target", "volta"], "sm_80"),
])
def test_tune_bad_input_exits_2_naming_the_problem(capsys, dbpath, argv, msg):
    rc, out, err = run(capsys, "--db", dbpath, *argv)
    assert rc == 2 and msg in err


def test_tune_static_target(capsys, dbpath, monkeypatch):
    cc = pytest.importorskip("graphtune.codegen.crosscompile")
    monkeypatch.setattr(cc, "static_rank", lambda name, meta, cfgs, arch: [(c, 0.5, None) for c in cfgs])
    rc, out, err = run(capsys, "--db", dbpath, "tune", "--shape", "1,8,2,1,1024,64,float16", "--target", "sm_80",
                       "--budget", "2c", "--quiet")
    assert rc == 0, err
    assert "static" in out and "triton." in out
    [r] = TuningDB(dbpath).records()
    assert r.mode == "static" and r.device == "cuda:sm_80"


# ---------------------------------------------------------------------------------- db

def _seed(dbpath):
    d = TuningDB(dbpath)
    from graphtune.autotune import AttentionShape, tune_shape
    from graphtune.autotune.search import Budget
    res = tune_shape(AttentionShape(1, 2, 2, 1, 64, 8), "exhaustive", Budget(max_candidates=1, reps=2), db=d)
    stale = Record(**{**d.records()[0].to_json(), "record_id": "", "created_at": "", "source_hash": "oldsource"})
    d.put(stale)
    d.close()
    return res, stale


def test_db_list_show_stats_report_records_and_stale_ones(capsys, dbpath):
    res, stale = _seed(dbpath)
    rc, out, _ = run(capsys, "--db", dbpath, "db", "list")
    assert rc == 0 and "2 record(s)" in out and "STALE" in out and res.impl in out
    rc, out, _ = run(capsys, "--db", dbpath, "db", "show", res.record_id[:12])
    shown = json.loads(out)
    assert rc == 0 and shown["record_id"] == res.record_id and shown["valid"] is True
    rc, out, _ = run(capsys, "--db", dbpath, "db", "show", "1")
    assert rc == 0 and json.loads(out)["record_id"] == res.record_id
    assert run(capsys, "--db", dbpath, "db", "show", "ffffffff")[0] == 1
    rc, out, _ = run(capsys, "--db", dbpath, "db", "stats")
    assert rc == 0 and "records: 2" in out and "stale (implementation gone or its source changed; ignored by lookups): 1" in out
    assert "oldsource" in out


def test_db_export_import_round_trip(capsys, dbpath, tmp_path):
    _seed(dbpath)
    f1, f2 = tmp_path / "a.json", tmp_path / "b.json"
    assert run(capsys, "--db", dbpath, "db", "export", str(f1))[0] == 0
    other = str(tmp_path / "other.db")
    rc, out, _ = run(capsys, "--db", other, "db", "import", str(f1))
    assert rc == 0 and "imported 2 new record(s) of 2" in out
    assert run(capsys, "--db", other, "db", "export", str(f2))[0] == 0
    assert f1.read_text() == f2.read_text()
    rc, out, _ = run(capsys, "--db", dbpath, "db", "export", "-")
    assert json.loads(out) == json.loads(f1.read_text())
    (tmp_path / "bad.json").write_text("{nope")
    rc, _, err = run(capsys, "--db", other, "db", "import", str(tmp_path / "bad.json"))
    assert rc == 2 and "cannot read records" in err


def test_db_prune_removes_stale_and_superseded_only(capsys, dbpath):
    res, stale = _seed(dbpath)
    d = TuningDB(dbpath)
    newer = d.put(Record(**{**d.get(res.record_id).to_json(), "record_id": "", "created_at": ""}))
    d.close()
    rc, out, _ = run(capsys, "--db", dbpath, "db", "prune", "--dry-run")
    assert rc == 0 and "2 record(s) to delete, 3 in the database" in out
    rc, out, _ = run(capsys, "--db", dbpath, "db", "prune")
    assert rc == 0 and "2 record(s) deleted, 1 in the database" in out
    assert [r.record_id for r in TuningDB(dbpath).records()] == [newer.record_id]


def test_db_stats_reports_files_moved_aside(capsys, dbpath):
    with open(dbpath, "wb") as f:
        f.write(b"\x00garbage" * 100)
    with pytest.warns(UserWarning, match="corrupt"):
        rc, out, err = run(capsys, "--db", dbpath, "db", "stats")
    assert rc == 0 and "files moved aside: 1" in out and ".corrupt-" in out and "corrupt" in err


def test_help_and_unknown_command_exit_codes(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["db"]) == 2


def test_subcommands_are_pluggable(capsys):
    @cli.subcommand("hello-test", "say hello", lambda p: p.add_argument("--name", default="x"))
    def _hello(args):
        print(f"hello {args.name}")
        return 0

    try:
        assert run(capsys, "hello-test", "--name", "ada")[:2] == (0, "hello ada\n")
    finally:
        cli._COMMANDS.pop("hello-test")


# ---------------------------------------------------------------------------------- errors are one line, exit 2

def _one_line_error(rc, err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("graphtune: error:"), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv,msg", [
    (["tune", "--shape", "1,2,2,1,8,8", "--device", "bogus"], "device"),
    (["db", "list", "--limit", "0"], "--limit"),
    (["db", "list", "--limit", "-3"], "--limit"),
    (["db", "export", "/nonexistent-dir/x/recs.json"], "cannot write records"),
])
def test_bad_options_are_one_line_errors(capsys, dbpath, argv, msg):
    rc, _, err = run(capsys, "--db", dbpath, *argv)
    assert msg in _one_line_error(rc, err)


def test_tune_on_cuda_without_cuda_is_a_one_line_error(capsys, dbpath):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run(capsys, "--db", dbpath, "tune", "--shape", "1,2,2,1,8,8", "--device", "cuda", "--quiet")
    assert "CUDA" in _one_line_error(rc, err)


@pytest.mark.parametrize("content", [[1, 2, 3], ["a"], [[]], [None]])
def test_db_import_of_a_list_of_non_objects_is_a_one_line_error(capsys, dbpath, tmp_path, content):
    f = tmp_path / "recs.json"
    f.write_text(json.dumps(content))
    rc, _, err = run(capsys, "--db", dbpath, "db", "import", str(f))
    assert "not a JSON object" in _one_line_error(rc, err)
    assert TuningDB(dbpath).records() == [] or all(r.record_id for r in TuningDB(dbpath).records())


def test_db_path_that_is_a_device_or_directory_is_a_one_line_error(capsys, tmp_path):
    rc, _, err = run(capsys, "--db", "/dev/null", "db", "stats")
    assert "not a regular file" in _one_line_error(rc, err)
    rc, _, err = run(capsys, "--db", str(tmp_path), "db", "list")
    assert "directory" in _one_line_error(rc, err)
    assert tmp_path.is_dir()


def test_graphtune_db_env_dev_null_from_the_console(tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "GRAPHTUNE_DB": "/dev/null"}
    p = subprocess.run([sys.executable, "-m", "graphtune.cli", "db", "stats"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert "not a regular file" in _one_line_error(p.returncode, p.stderr)


def test_db_import_stores_valid_records_and_reports_rejected_ones_by_reason(capsys, dbpath, tmp_path):
    _seed(dbpath)
    good = TuningDB(dbpath).export()
    bad = [{**good[0], "record_id": "bad1", "q_bucket": "abc"}, {**good[0], "record_id": "bad2", "q_bucket": "x"},
           {**good[0], "record_id": "bad3", "op": "conv"}]
    f = tmp_path / "mixed.json"
    f.write_text(json.dumps(bad + good))
    other = str(tmp_path / "other.db")
    rc, out, err = run(capsys, "--db", other, "db", "import", str(f))
    assert rc == 1 and "imported 2 new record(s) of 5" in out
    assert "rejected 3" in err and "2 x q_bucket" in err and "unknown op" in err
    assert sorted(r.record_id for r in TuningDB(other).records()) == sorted(g["record_id"] for g in good)
    rc, out, _ = run(capsys, "--db", other, "db", "list")
    assert rc == 0 and "2 record(s)" in out


def test_db_prune_keeps_the_record_lookup_uses_when_a_newer_one_is_stale(capsys, dbpath):
    res, stale = _seed(dbpath)  # `stale` is newer than the valid tuned record, same key
    rc, out, _ = run(capsys, "--db", dbpath, "db", "prune")
    assert rc == 0 and "1 record(s) deleted, 1 in the database" in out
    assert [r.record_id for r in TuningDB(dbpath).records()] == [res.record_id]


def test_db_list_survives_an_ill_typed_row_and_prune_removes_it(capsys, dbpath):
    import sqlite3
    res, _ = _seed(dbpath)
    c = sqlite3.connect(dbpath)
    c.execute("UPDATE records SET q_bucket = 'abc' WHERE record_id != ?", (res.record_id,))
    c.commit()
    c.close()
    rc, out, err = run(capsys, "--db", dbpath, "db", "list")
    assert rc == 0 and "1 record(s)" in out
    rc, out, _ = run(capsys, "--db", dbpath, "db", "stats")
    assert rc == 0 and "invalid (ill-typed, ignored by lookups): 1" in out
    rc, out, _ = run(capsys, "--db", dbpath, "db", "prune")
    assert rc == 0 and "invalid" in out and "1 in the database" in out
