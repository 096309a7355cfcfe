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
    assert {r.impl for r in db.superseded(lambda r: True)} == {"static_new", "measured_old"}


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


@pytest.mark.parametrize("what", ["other_tables", "other_app"])
def test_foreign_database_is_a_clear_error_never_moved_or_overwritten(tmp_path, what):
    # another application's database at GRAPHTUNE_DB: renaming it would lose that application's data
    path = tmp_path / "t.db"
    c = sqlite3.connect(path)
    if what == "other_tables":
        c.execute("CREATE TABLE users (name TEXT)")
        c.execute("INSERT INTO users VALUES ('alice')")
    else:
        c.execute("CREATE TABLE schema_version (app TEXT, version INTEGER)")
        c.execute("INSERT INTO schema_version VALUES (?, ?)", ("someone-else", 1))
    c.commit()
    c.close()
    before = path.read_bytes()
    with pytest.raises(TuningDBError, match="not a graphtune tuning database"):
        TuningDB(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["t.db"]


def test_export_import_round_trips_exactly_and_import_is_idempotent(tmp_path, db):
    db.put(rec(impl="a", median=1.0000000000000002, details={"top": [["x", 1.5]]}))
    db.put(rec(impl="b", mode="static", median=None, p20_us=None, p80_us=None, score=0.4375, default_us=None))
    exported = db.export()
    text = json.dumps(exported, sort_keys=True)
    other = TuningDB(tmp_path / "other.db")
    assert other.import_records(json.loads(text)).added == 2
    assert json.dumps(other.export(), sort_keys=True) == text
    again = other.import_records(json.loads(text))
    assert again.added == 0 and again.duplicates == 2 and other.count() == 2


def test_import_rejects_malformed_records(db):
    report = db.import_records([{"op": "attention_with_lse"}])
    assert report.added == 0 and any("missing fields" in k for k in report.rejected)
    with pytest.raises(TuningDBError, match="JSON list"):
        db.import_records({"op": 1})
    assert db.count() == 0


def test_shipped_records_are_imported_once_on_first_use(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    (shipped / "records").mkdir(parents=True)
    (shipped / "records" / "cpu.json").write_text(json.dumps([rec(impl="shipped", record_id="r1", created_at="2025-01-01").to_json()]))
    monkeypatch.setattr(dbmod, "SHIPPED_DIR", shipped / "records")
    d = TuningDB(tmp_path / "t.db")
    assert [r.impl for r in d.records()] == ["shipped"]
    d.delete(["r1"])  # deleted by the user: reopening must not resurrect it
    d.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TuningDB(tmp_path / "t.db").count() == 0


def test_repository_shipped_records_load_through_the_import_path(tmp_path, monkeypatch):
    # the records graphtune ships: non-empty, and every one passes the same validation as `db import`
    monkeypatch.setattr(dbmod, "SHIPPED_DIR", dbmod.TUNING_DB_DIR / "records")
    files = sorted((dbmod.TUNING_DB_DIR / "records").glob("*.json"))
    assert files
    shipped = [d for f in files for d in json.loads(f.read_text())]
    assert shipped, "tuning_db/records/ ships no records"
    d = TuningDB(tmp_path / "fresh.db")
    assert d.count() == len(shipped)
    assert {r.record_id for r in d.records()} == {s["record_id"] for s in shipped}
    report = d.import_records(shipped)
    assert report.rejected == {} and report.duplicates == len(shipped)


def test_repository_shipped_records_name_the_current_kernel_sources():
    # a stale record is skipped by lookup: after editing a kernel, regenerate the shipped records
    # (sh tuning_db/regenerate.sh, see docs/autotuning.md)
    from graphtune.autotune.tuner import load_impls
    from graphtune.codegen.registry import get_impl

    load_impls()  # every family's implementations: shipped records name attention, merge and lean kernels

    shipped = [d for f in sorted((dbmod.TUNING_DB_DIR / "records").glob("*.json")) for d in json.loads(f.read_text())]
    for rec in shipped:
        impl = get_impl(rec["op"], rec["impl"])
        h = impl.source_hash() if callable(impl.source_hash) else impl.source_hash
        assert rec["source_hash"] == h, f"{rec['impl']} record {rec['record_id']} is stale: regenerate shipped.json"


def test_cachelevel_zero_disables_the_database(tmp_path):
    with flags.Context(DB=str(tmp_path / "x.db"), CACHELEVEL=0):
        assert get_db() is None
    assert not Path(tmp_path / "x.db").exists()
    with flags.Context(DB=str(tmp_path / "x.db")):
        assert get_db() is get_db() and get_db().path == str(tmp_path / "x.db")
    dbmod.forget_db(str(tmp_path / "x.db"))


# ------------------------------------------------------------------ data safety (issue 8)

def test_directory_path_is_a_clear_error_and_is_never_renamed(tmp_path):
    target = tmp_path / "t.db"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(TuningDBError, match="directory"):
        TuningDB(target)
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["t.db"]


def test_device_file_is_a_clear_error(tmp_path):
    with pytest.raises(TuningDBError, match="not a regular file"):
        TuningDB("/dev/null")


def _hold_lock(path, seconds, started):
    # another process writing in a transaction that lasts `seconds` (rollback journal: readers wait too)
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode = DELETE")
    c.execute("BEGIN EXCLUSIVE")
    c.execute("INSERT INTO shipped_imports VALUES ('held', 'x', 0, 'now')")
    started.set()
    import time
    time.sleep(seconds)
    c.execute("COMMIT")
    c.close()


def test_locked_database_waits_then_raises_and_is_never_moved_aside(tmp_path):
    path = str(tmp_path / "t.db")
    d = TuningDB(path)
    d.put(rec(impl="precious"))
    d._conn.execute("PRAGMA journal_mode = DELETE")
    d.close()
    ctx = mp.get_context("fork")
    started = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(path, 5.0, started))
    p.start()
    try:
        assert started.wait(60)
        import time
        t0 = time.monotonic()
        with pytest.raises(TuningDBError, match="locked by another process"):
            TuningDB(path, timeout=0.5)
        assert time.monotonic() - t0 >= 0.4  # it waited (busy timeout) before giving up
        assert not _moved(tmp_path, "corrupt") and not _moved(tmp_path, "foreign")
        d2 = TuningDB(path, timeout=60)  # a lock released within the timeout is simply waited for
        assert [r.impl for r in d2.records()] == ["precious"]
        assert d2._conn.execute("SELECT COUNT(*) FROM shipped_imports WHERE name = 'held'").fetchone()[0] == 1
        d2.close()
    finally:
        p.join(60)
    assert p.exitcode == 0  # the other process's transaction committed: nothing was moved under it
    assert not _moved(tmp_path, "corrupt") and not _moved(tmp_path, "foreign")


def test_wal_refused_is_reported_and_the_database_still_works(tmp_path, monkeypatch):
    # unix-dotfile has no shared memory, like many network file systems: SQLite keeps the rollback journal
    monkeypatch.setattr(dbmod, "_VFS", "unix-dotfile")
    with pytest.warns(UserWarning, match="WAL"):
        d = TuningDB(tmp_path / "t.db")
    assert d.journal_mode == "delete" and any("WAL" in m for m in d.reports)
    d.put(rec())
    assert d.count() == 1


def test_newer_schema_asks_to_upgrade_graphtune_and_keeps_the_file(tmp_path):
    path = tmp_path / "t.db"
    d = TuningDB(path)
    d.put(rec(impl="from_the_future"))
    d._conn.execute("UPDATE schema_version SET version = ?", (dbmod.SCHEMA_VERSION + 1,))
    d.close()
    before = path.read_bytes()
    with pytest.raises(TuningDBError, match="upgrade graphtune"):
        TuningDB(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["t.db"]


def test_newer_user_version_asks_to_upgrade_graphtune(tmp_path):
    path = tmp_path / "t.db"
    TuningDB(path).close()
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {dbmod.SCHEMA_VERSION + 5}")
    c.commit()
    c.close()
    with pytest.raises(TuningDBError, match="upgrade graphtune"):
        TuningDB(path)


def test_prune_never_deletes_the_record_lookup_uses(db):
    # the newest record of the key is stale (its implementation changed); the older one is what lookup picks
    db.put(rec(impl="old_valid", src="cur", created_at="2020-01-01T00:00:00+00:00"))
    db.put(rec(impl="new_stale", src="old", created_at="2021-01-01T00:00:00+00:00"))
    valid = lambda r: r.source_hash == "cur"  # noqa: E731
    assert look(db, valid=valid).impl == "old_valid"
    doomed = {r.record_id for r in db.stale(valid)} | {r.record_id for r in db.superseded(valid)}
    db.delete(doomed)
    assert look(db, valid=valid).impl == "old_valid"


def test_prune_keeps_each_device_names_pick(db):
    # same device key (e.g. cuda:sm_90), two products: each one's lookup prefers its own record
    db.put(rec(impl="for_n", device_name="n", created_at="2020-01-01T00:00:00+00:00"))
    db.put(rec(impl="for_m", device_name="m", created_at="2021-01-01T00:00:00+00:00"))
    db.put(rec(impl="old_n", device_name="n", created_at="2019-01-01T00:00:00+00:00"))
    everything = lambda r: True  # noqa: E731
    picks = {name: db.lookup("attention_with_lse", "sk", 1, 1024, "cpu:test", "v1", everything, name).impl
             for name in ("n", "m", "other")}
    db.delete([r.record_id for r in db.superseded(everything)])
    assert {r.impl for r in db.records()} == {"for_n", "for_m"}
    assert picks == {name: db.lookup("attention_with_lse", "sk", 1, 1024, "cpu:test", "v1", everything, name).impl
                     for name in ("n", "m", "other")}


@pytest.mark.parametrize("field,value,reason", [
    ("q_bucket", "abc", "q_bucket"),
    ("q_bucket", 0, "q_bucket"),
    ("kv_bucket", 2.5, "kv_bucket"),
    ("kv_bucket", True, "kv_bucket"),
    ("op", "convolution", "unknown op"),
    ("op", 3, "op"),
    ("mode", "guessed", "mode"),
    ("median_us", "fast", "median_us"),
    ("median_us", -1.0, "median_us"),
    ("median_us", float("nan"), "median_us"),
    ("config", "BLOCK_M=64", "config"),
    ("config", {"params": {"BLOCK_M": "64"}}, "config"),
    ("config", {"params": {}, "colour": 1}, "config"),
    ("config", {"params": {}, "num_warps": 0}, "config"),
    ("shape", [1, 2], "shape"),
    ("details", None, "details"),
    ("n_samples", -3, "n_samples"),
    ("created_at", "yesterday", "created_at"),
    ("impl", "", "impl"),
    ("device", None, "device"),
    ("record_id", 7, "record_id"),
])
def test_import_rejects_ill_typed_fields_by_reason_and_stores_none_of_them(db, field, value, reason):
    good = rec(impl="good", record_id="good1").to_json()
    bad = {**rec(impl="bad", record_id="bad1").to_json(), field: value}
    report = db.import_records([good, bad])
    assert report.added == 1
    assert [r.impl for r in db.records()] == ["good"]  # the bad one is not stored; list/lookup still work
    [(why, idx)] = report.rejected.items()
    assert reason in why and idx == [1]
    assert look(db).impl == "good"


def test_import_rejects_non_objects_and_unknown_fields(db):
    report = db.import_records([1, "x", None, [], {**rec().to_json(), "colour": "red"}])
    assert report.added == 0 and sum(len(v) for v in report.rejected.values()) == 5
    assert any("not a JSON object" in k for k in report.rejected)
    assert any("unknown fields" in k and "colour" in k for k in report.rejected)
    assert db.count() == 0


def test_put_rejects_ill_typed_records(db):
    with pytest.raises(TuningDBError, match="q_bucket"):
        db.put(rec(q="1"))
    assert db.count() == 0
