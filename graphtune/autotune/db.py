"""The SQLite tuning database (through sqlite-utils, WAL mode).

Records are append-only: tuning the same key again adds a row, and lookups pick the best valid
one (measured over static, then newest), so no record is ever lost to a race or a re-tune;
``prune`` removes stale and superseded rows when asked. Several processes may write at once
(WAL + a 30 s busy timeout; every write is one short transaction).

Opening a file that is not a SQLite database (corrupt) or that holds some other schema
(foreign: other tables, another app, a newer schema version) never overwrites it: the file is
reported with a warning, renamed to ``<path>.<corrupt|foreign>-<UTC timestamp>-<pid>`` and a
fresh database is created. Fresh and old databases are brought up to date by applying
``tuning_db/migrations/NNNN_*.sql`` in order; shipped records ``tuning_db/records/*.json`` are
imported once per file content.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sqlite3
import threading
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlite_utils

from graphtune import flags
from graphtune.errors import TuningDBError

__all__ = ["Record", "TuningDB", "get_db", "generation", "TUNING_DB_DIR", "SCHEMA_APP", "SCHEMA_VERSION"]

TUNING_DB_DIR = Path(__file__).resolve().parents[2] / "tuning_db"
SCHEMA_APP = "graphtune-tuning"
_MIGRATIONS = TUNING_DB_DIR / "migrations"
SCHEMA_VERSION = max((int(p.name.split("_", 1)[0]) for p in _MIGRATIONS.glob("[0-9]*_*.sql")), default=0)

_generation = 0  # bumped on every write in this process: lets caches (dispatch) notice changes
_gen_lock = threading.Lock()


def generation() -> int:
    """Counter of writes made to any tuning database by this process."""
    return _generation


def _bump() -> None:
    global _generation
    with _gen_lock:
        _generation += 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


@dataclass
class Record:
    """One tuning result: the winning (impl, config) for a key on a device."""

    op: str
    impl: str
    source_hash: str
    device: str
    device_name: str
    versions: str
    shape_key: str
    q_bucket: int
    kv_bucket: int
    config: dict
    median_us: float | None
    p20_us: float | None
    p80_us: float | None
    n_samples: int
    default_us: float | None
    mode: str  # "measured" | "static"
    shape: dict = field(default_factory=dict)
    score: float | None = None
    details: dict = field(default_factory=dict)
    created_at: str = ""
    record_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Record":
        names = {f.name for f in fields(cls)}
        missing = {f.name for f in fields(cls) if f.name not in ("shape", "created_at", "record_id", "score", "details")} - set(d)
        if missing:
            raise TuningDBError(f"tuning record lacks fields {sorted(missing)}: {d!r}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def _row(self) -> dict[str, Any]:
        r = asdict(self)
        r["config"] = json.dumps(self.config, sort_keys=True)
        r["shape"] = json.dumps(self.shape, sort_keys=True)
        r["details"] = json.dumps(self.details, sort_keys=True)
        return r

    @classmethod
    def _from_row(cls, row: dict[str, Any]) -> "Record":
        r = {k: v for k, v in row.items() if k != "id"}
        r["config"] = json.loads(r["config"])
        r["shape"] = json.loads(r["shape"])
        r["details"] = json.loads(r["details"])
        return cls(**r)


def _split_sql(text: str) -> list[str]:
    stmts, cur = [], ""
    for line in text.splitlines(keepends=True):
        cur += line
        if sqlite3.complete_statement(cur):
            if cur.strip():
                stmts.append(cur.strip())
            cur = ""
    if cur.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in cur.splitlines()):
        raise TuningDBError(f"incomplete SQL statement in a migration: {cur.strip()[:80]!r}")
    return stmts


class TuningDB:
    """A tuning database file.

    Parameters
    ----------
    path : str or None
        The SQLite file; default ``flags.get("DB")`` (``GRAPHTUNE_DB``, else
        ``~/.cache/graphtune/tuning.db``).
    import_shipped : bool
        Import ``tuning_db/records/*.json`` not yet imported into this file.

    Examples
    --------
    >>> import tempfile, os
    >>> db = TuningDB(os.path.join(tempfile.mkdtemp(), "t.db"))
    >>> db.count()
    0
    """

    def __init__(self, path: str | os.PathLike | None = None, import_shipped: bool = True) -> None:
        self.path = str(path if path is not None else flags.get("DB"))
        self.reports: list[str] = []  # what happened on open (files moved aside), for `db stats`
        self._lock = threading.RLock()
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._open_checked()
            self.db = sqlite_utils.Database(self._conn)
            self._migrate()
        except (OSError, sqlite3.OperationalError) as e:
            raise TuningDBError(f"cannot open the tuning database {self.path}: {e}") from e
        if import_shipped:
            self._import_shipped()

    # ------------------------------------------------------------------ open / safety
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def _inspect(self, conn: sqlite3.Connection) -> str | None:
        """None if usable (fresh or ours), else why not ("corrupt: ..." / "foreign: ...")."""
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            return f"corrupt: {e}"
        if check != "ok":
            return f"corrupt: quick_check says {check}"
        if not tables:
            return None
        if "schema_version" not in tables:
            return f"foreign: tables {sorted(tables)} but no schema_version"
        try:
            rows = conn.execute("SELECT app, version FROM schema_version").fetchall()
        except sqlite3.DatabaseError as e:
            return f"foreign: unreadable schema_version ({e})"
        if len(rows) != 1 or rows[0][0] != SCHEMA_APP:
            return f"foreign: schema_version holds {rows!r}, not ({SCHEMA_APP!r}, n)"
        if rows[0][1] > SCHEMA_VERSION:
            return f"foreign: schema version {rows[0][1]} is newer than this graphtune's {SCHEMA_VERSION}"
        return None

    def _open_checked(self) -> sqlite3.Connection:
        existed = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        try:
            conn = self._connect()
            problem = self._inspect(conn) if existed else None
        except sqlite3.DatabaseError as e:
            conn, problem = None, f"corrupt: {e}"
        if problem is None:
            conn.execute("PRAGMA journal_mode = WAL")
            return conn
        if conn is not None:
            conn.close()
        kind = problem.split(":", 1)[0]
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = f"{self.path}.{kind}-{stamp}-{os.getpid()}"
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            msg = f"tuning database {self.path} is {problem}; moved it to {aside} and started a fresh one"
        except FileNotFoundError:  # another process moved it first
            msg = f"tuning database {self.path} was {problem}; another process moved it aside"
        self.reports.append(msg)
        warnings.warn(msg, stacklevel=3)
        conn = self._connect()
        conn.execute("PRAGMA journal_mode = WAL")
        return conn

    def _migrate(self) -> None:
        migrations = sorted(_MIGRATIONS.glob("[0-9]*_*.sql"))
        if not migrations:
            raise TuningDBError(f"no migrations found in {_MIGRATIONS} (is graphtune's tuning_db/ shipped?)")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")  # one process migrates; the others wait, then see it done
            try:
                has = self._conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
                version = self._conn.execute("SELECT version FROM schema_version").fetchone()[0] if has else 0
                for m in migrations:
                    n = int(m.name.split("_", 1)[0])
                    if n > version:
                        for stmt in _split_sql(m.read_text()):
                            self._conn.execute(stmt)
                        version = n
                self._conn.execute("DELETE FROM schema_version")
                self._conn.execute("INSERT INTO schema_version (app, version) VALUES (?, ?)", (SCHEMA_APP, version))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _import_shipped(self) -> None:
        for f in sorted((TUNING_DB_DIR / "records").glob("*.json")):
            text = f.read_bytes()
            sha = hashlib.sha256(text).hexdigest()
            if self._conn.execute("SELECT 1 FROM shipped_imports WHERE name=? AND sha256=?", (f.name, sha)).fetchone():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise TuningDBError(f"shipped tuning records {f} are not valid JSON: {e}") from None
            n = self.import_records(data, _ledger=(f.name, sha))
            if n:
                warnings.warn(f"imported {n} shipped tuning records from {f.name}", stacklevel=3)

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------ writes
    def put(self, rec: Record) -> Record:
        """Append a record (filling ``record_id`` and ``created_at`` if empty); returns it."""
        if rec.mode not in ("measured", "static"):
            raise TuningDBError(f"record mode must be 'measured' or 'static', got {rec.mode!r}")
        rec.record_id = rec.record_id or uuid.uuid4().hex
        rec.created_at = rec.created_at or _now()
        with self._lock:
            self.db["records"].insert(rec._row())
        _bump()
        return rec

    def import_records(self, data: Iterable[dict[str, Any]], _ledger: tuple[str, str] | None = None) -> int:
        """Import exported records (a list of :meth:`Record.to_json` dicts); returns how many were new.

        Records already present (same ``record_id``) are skipped, so importing twice is harmless.
        """
        if not isinstance(data, list):
            raise TuningDBError(f"tuning records must be a JSON list, got {type(data).__name__}")
        recs = [Record.from_json(d) for d in data]
        for r in recs:
            r.record_id = r.record_id or uuid.uuid4().hex
            r.created_at = r.created_at or _now()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                before = self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
                for r in recs:
                    row = r._row()
                    cols = ", ".join(row)
                    self._conn.execute(f"INSERT OR IGNORE INTO records ({cols}) VALUES ({', '.join('?' * len(row))})",
                                       tuple(row.values()))
                n = self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0] - before
                if _ledger is not None:
                    self._conn.execute("INSERT OR IGNORE INTO shipped_imports VALUES (?, ?, ?, ?)",
                                       (*_ledger, n, _now()))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        _bump()
        return n

    def delete(self, record_ids: Iterable[str]) -> int:
        ids = list(record_ids)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            for rid in ids:
                self._conn.execute("DELETE FROM records WHERE record_id = ?", (rid,))
            self._conn.execute("COMMIT")
        _bump()
        return len(ids)

    # ------------------------------------------------------------------ reads
    def count(self) -> int:
        return self.db["records"].count

    def records(self, where: str | None = None, params: Iterable[Any] = (), order: str = "id") -> list[Record]:
        with self._lock:
            rows = list(self.db["records"].rows_where(where, list(params), order_by=order))
        return [Record._from_row(r) for r in rows]

    def export(self) -> list[dict[str, Any]]:
        """Every record as JSON-ready dicts, oldest first (input of :meth:`import_records`)."""
        return [r.to_json() for r in self.records(order="created_at, record_id")]

    def get(self, ident: str) -> Record | None:
        """A record by row id or ``record_id`` (or a unique prefix of it)."""
        if ident.isdigit():
            found = self.records("id = ?", [int(ident)])
            if found:
                return found[0]
        found = self.records("record_id LIKE ?", [ident + "%"])
        if len(found) > 1:
            raise TuningDBError(f"record id prefix {ident!r} is ambiguous ({len(found)} records)")
        return found[0] if found else None

    def candidates(self, op: str, device: str, versions: str, shape_key: str) -> list[Record]:
        return self.records("op = ? AND device = ? AND versions = ? AND shape_key = ?",
                            [op, device, versions, shape_key])

    def lookup(self, op: str, shape_key: str, q_bucket: int, kv_bucket: int, device: str, versions: str,
               is_valid: Callable[[Record], bool], device_name: str = "") -> Record | None:
        """Best valid record: exact buckets, else the nearest in log2 distance; None if none.

        Among equally near records: measured beats static, the same device name beats another,
        newer beats older. ``is_valid`` rejects stale ones (source hash changed, impl gone).
        """
        best, best_rank = None, None
        for r in self.candidates(op, device, versions, shape_key):
            if not is_valid(r):
                continue
            dist = abs(_log2(r.q_bucket) - _log2(q_bucket)) + abs(_log2(r.kv_bucket) - _log2(kv_bucket))
            rank = (dist, r.mode != "measured", r.device_name != device_name, _neg(r.created_at))
            if best_rank is None or rank < best_rank:
                best, best_rank = r, rank
        return best

    def stale(self, is_valid: Callable[[Record], bool]) -> list[Record]:
        return [r for r in self.records() if not is_valid(r)]

    def superseded(self) -> list[Record]:
        """Rows no lookup would pick: all but the newest measured per key (statics too, if measured exists)."""
        groups: dict[tuple, list[Record]] = {}
        for r in self.records():
            groups.setdefault((r.op, r.device, r.versions, r.shape_key, r.q_bucket, r.kv_bucket), []).append(r)
        out = []
        for rs in groups.values():
            rs.sort(key=lambda r: (r.mode != "measured", _neg(r.created_at)))
            out.extend(rs[1:])
        return out


def _log2(n: int) -> int:
    return max(n, 1).bit_length() - 1


def _neg(ts: str) -> tuple:
    # newest first under ascending sort
    return tuple(-ord(c) for c in ts)


_open_dbs: dict[tuple[str, int], TuningDB] = {}
_open_lock = threading.Lock()


def get_db(path: str | None = None) -> TuningDB | None:
    """The process's handle on the tuning database at ``path`` (default: the ``DB`` flag).

    Returns None when ``GRAPHTUNE_CACHELEVEL=0`` (database disabled: defaults only).
    """
    if flags.get("CACHELEVEL") <= 0:
        return None
    p = os.path.abspath(path if path is not None else flags.get("DB"))
    key = (p, os.getpid())  # a connection must not cross a fork
    with _open_lock:
        db = _open_dbs.get(key)
        if db is None:
            db = _open_dbs[key] = TuningDB(p)
        return db


def forget_db(path: str | None = None) -> None:
    """Drop (and close) the cached handle for ``path`` or every path (tests, after moving files)."""
    with _open_lock:
        for key in list(_open_dbs):
            if path is None or key[0] == os.path.abspath(path):
                if key[1] == os.getpid():
                    _open_dbs[key].close()
                del _open_dbs[key]
