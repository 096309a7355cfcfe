"""The SQLite tuning database: keys and lookup, safety (concurrency, corrupt/foreign files), export/import."""
import json
import multiprocessing as mp
import os
import re
import sqlite3
import warnings
from pathlib import Path

import pytest

from graphtune import flags
from graphtune.autotune import db as dbmod
from graphtune.autotune.db import Record, TuningDB, get_db
from graphtune.errors import TuningDBError


def rec(impl="cpu.flash", q=1, kv=1024, mode="measured", median=10.0, created_at="", shape_key="sk", src="h1", **kw):
    base = dict(op="attention_with_lse", impl=impl, source_hash=src, device="cpu:test", device_name="n",
                versions="v1", shape_key=shape_key, q_bucket=q, kv_bucket=kv, config={"params": {"THREADS": 1}},
                median_us=median, p20_us=median and median * 0.9, p80_us=median and median * 1.1, n_samples=7, default_us=20.0,
                mode=mode, shape={"q_len": q, "kv_len": kv}, created_at=created_at)
    base.update(kw)
    return Record(**base)


def look(db, q=1, kv=1024, valid=lambda r: True, shape_key="sk"):
    return db.lookup("attention_with_lse", shape_key, q, kv, "cpu:test", "v1", valid, "n")


@pytest.fixture
def db(tmp_path):
    d = TuningDB(tmp_path / "t.db")
    yield d
    d.close()


def test_schema_sql_matches_applied_migrations(tmp_path, db):
    ref = sqlite3.connect(":memory:")
    sql = (dbmod.TUNING_DB_DIR / "schema.sql").read_text()
    for stmt in dbmod._split_sql(sql):
        ref.execute(stmt)

    def shape(conn):
        return sorted((r[0], r[1], tuple(c[1:3] for c in conn.execute(f"PRAGMA table_info({r[1]})")))
                      for r in conn.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))

    assert shape(ref) == shape(db._conn)
    assert db._conn.execute("SELECT app, version FROM schema_version").fetchall() == [("graphtune-tuning", dbmod.SCHEMA_VERSION)]
    assert db._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_lookup_exact_then_nearest_bucket_then_none(db):
    db.put(rec(q=1, kv=1024, impl="exact"))
    db.put(rec(q=1, kv=8192, impl="far"))
    db.put(rec(q=1, kv=2048, impl="near", shape_key="other"))
    assert look(db, kv=1024).impl == "exact"
    assert look(db, kv=2048).impl == "exact"  # log2 distance 1 beats 2
    assert look(db, kv=16384).impl == "far"
    assert look(db, shape_key="nothing") is None
    assert db.lookup("attention_with_lse", "sk", 1, 1024, "cpu:other", "v1", lambda r: True) is None
    assert db.lookup("attention_with_lse", "sk", 1, 1024, "cpu:test", "v2", lambda r: True) is None


def test_measured_supersedes_static_and_newer_wins_but_nothing_is_lost(db):
    db.put(rec(impl="static_new", mode="static", median=None, created_at="2030-01-01T00:00:00+00:00"))
    db.put(rec(impl="measured_old", created_at="2020-01-01T00:00:00+00:00"))
    db.put(rec(impl="measured_new", created_at="2021-01-01T00:00:00+00:00"))
    assert look(db).impl == "measured_new"
    assert db.count() == 3
    assert {r.impl for r in db.superseded()} == {"static_new", "measured_old"}


def test_stale_records_are_skipped_by_lookup(db):
    db.put(rec(impl="a", src="old"))
    db.put(rec(impl="b", src="cur", kv=4096))
    valid = lambda r: r.source_hash == "cur"  # noqa: E731
    assert look(db, kv=1024, valid=valid).impl == "b"
    assert [r.impl for r in db.stale(valid)] == ["a"]


def _writer(path, wid, n, q):
    try:
        d = TuningDB(path)
        for i in range(n):
            d.put(rec(impl=f"w{wid}", kv=2 ** (i % 12), shape_key=f"s{wid}_{i}"))
        d.close()
        q.put(("ok", wid))
    except Exception as e:  # report instead of dying silently
        q.put(("err", repr(e)))


def test_four_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.db")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, w, 100, q)) for w in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(kind == "ok" for kind, _ in results), results
    d = TuningDB(path)
    assert d.count() == 400
    assert {(r.impl, r.shape_key) for r in d.records()} == {(f"w{w}", f"s{w}_{i}") for w in range(4) for i in range(100)}


def _moved(tmp_path, kind):
    return [p for p in os.listdir(tmp_path) if re.fullmatch(rf"t\.db\.{kind}-\d{{8}}T\d{{6}}-\d+", p)]


def test_corrupt_file_is_reported_moved_aside_and_replaced(tmp_path):
    path = tmp_path / "t.db"
    garbage = b"this is not sqlite " * 200
    path.write_bytes(garbage)
    with pytest.warns(UserWarning, match="corrupt"):
        d = TuningDB(path)
    assert d.count() == 0 and "corrupt" in d.reports[0]
    [aside] = _moved(tmp_path, "corrupt")
    assert (tmp_path / aside).read_bytes() == garbage  # kept, byte for byte
    d.put(rec())
    assert TuningDB(path).count() == 1


@pytest.mark.parametrize("what", ["other_tables", "other_app", "newer_version"])
def test_foreign_schema_is_reported_moved_aside_never_overwritten(tmp_path, what):
    path = tmp_path / "t.db"
    c = sqlite3.connect(path)
    if what == "other_tables":
        c.execute("CREATE TABLE users (name TEXT)")
        c.execute("INSERT INTO users VALUES ('alice')")
    else:
        c.execute("CREATE TABLE schema_version (app TEXT, version INTEGER)")
        c.execute("INSERT INTO schema_version VALUES (?, ?)",
                  ("someone-else", 1) if what == "other_app" else ("graphtune-tuning", dbmod.SCHEMA_VERSION + 1))
    c.commit()
    c.close()
    with pytest.warns(UserWarning, match="foreign"):
        d = TuningDB(path)
    assert d.count() == 0
    [aside] = _moved(tmp_path, "foreign")
    kept = sqlite3.connect(tmp_path / aside)
    assert kept.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchone() is not None


def test_export_import_round_trips_exactly_and_import_is_idempotent(tmp_path, db):
    db.put(rec(impl="a", median=1.0000000000000002, details={"top": [["x", 1.5]]}))
    db.put(rec(impl="b", mode="static", median=None, p20_us=None, p80_us=None, score=0.4375, default_us=None))
    exported = db.export()
    text = json.dumps(exported, sort_keys=True)
    other = TuningDB(tmp_path / "other.db")
    assert other.import_records(json.loads(text)) == 2
    assert json.dumps(other.export(), sort_keys=True) == text
    assert other.import_records(json.loads(text)) == 0 and other.count() == 2


def test_import_rejects_malformed_records(db):
    with pytest.raises(TuningDBError, match="lacks fields"):
        db.import_records([{"op": "attention_with_lse"}])
    with pytest.raises(TuningDBError, match="JSON list"):
        db.import_records({"op": 1})
    assert db.count() == 0


def test_shipped_records_are_imported_once_on_first_use(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    (shipped / "records").mkdir(parents=True)
    (shipped / "records" / "cpu.json").write_text(json.dumps([rec(impl="shipped", record_id="r1", created_at="2025-01-01").to_json()]))
    monkeypatch.setattr(dbmod, "TUNING_DB_DIR", shipped)
    with pytest.warns(UserWarning, match="imported 1 shipped"):
        d = TuningDB(tmp_path / "t.db")
    assert [r.impl for r in d.records()] == ["shipped"]
    d.delete(["r1"])  # deleted by the user: reopening must not resurrect it
    d.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TuningDB(tmp_path / "t.db").count() == 0


def test_repository_shipped_records_are_valid_json_lists():
    files = sorted((dbmod.TUNING_DB_DIR / "records").glob("*.json"))
    assert files
    for f in files:
        data = json.loads(f.read_text())
        assert isinstance(data, list)
        for d in data:
            Record.from_json(d)


def test_cachelevel_zero_disables_the_database(tmp_path):
    with flags.Context(DB=str(tmp_path / "x.db"), CACHELEVEL=0):
        assert get_db() is None
    assert not Path(tmp_path / "x.db").exists()
    with flags.Context(DB=str(tmp_path / "x.db")):
        assert get_db() is get_db() and get_db().path == str(tmp_path / "x.db")
    dbmod.forget_db(str(tmp_path / "x.db"))
