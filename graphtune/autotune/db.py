"""The SQLite tuning database (through sqlite-utils, WAL mode).

Records are append-only: tuning the same key again adds a row, and lookups pick the best valid
one (:func:`rank`: nearest bucket, measured over static, same device name, newest), so no record
is ever lost to a race or a re-tune; ``prune`` removes stale and superseded rows when asked, ranking
exactly as lookups do. Several processes may write at once (WAL + a busy timeout; every write is
one short transaction).

Opening never destroys data:

* a file SQLite reports as corrupt (SQLITE_CORRUPT / SQLITE_NOTADB, or a failed quick_check) is
  reported with a warning, renamed to ``<path>.corrupt-<UTC timestamp>-<pid>`` and replaced by a
  fresh database;
* anything else is a :class:`~graphtune.errors.TuningDBError` and the file is left alone: a
  directory or device, an unreadable file, a database locked by another process for longer than
  the busy timeout, another application's database, or one written by a newer graphtune
  (schema version above :data:`SCHEMA_VERSION`: "upgrade graphtune").

A file system that refuses WAL (some network file systems) keeps SQLite's rollback journal; that
is reported (``TuningDB.reports``, a warning) and the database still works. Fresh and old
databases are brought up to date by applying ``tuning_db/migrations/NNNN_*.sql`` in order; shipped
records ``tuning_db/records/*.json`` are imported once per file content. ``tuning_db/`` is the
package ``graphtune.tuning_db`` in a wheel and the repository's ``tuning_db/`` in a checkout.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.resources
import json
import logging
import os
import sqlite3
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import sqlite_utils

from graphtune import flags
from graphtune.autotune.db_records import ImportReport, Record, RecordError, rank, validate_fields
from graphtune.errors import TuningDBError

__all__ = ["Record", "TuningDB", "ImportReport", "get_db", "generation", "rank", "TUNING_DB_DIR", "SHIPPED_DIR",
           "SCHEMA_APP", "SCHEMA_VERSION"]

log = logging.getLogger("graphtune.autotune")


def _find_tuning_db_dir() -> Path:
    # a wheel ships tuning_db/ as the package graphtune.tuning_db; a checkout (editable or not) has
    # it next to the package
    try:
        d = Path(str(importlib.resources.files("graphtune.tuning_db")))
        if (d / "migrations").is_dir():
            return d
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "tuning_db"


TUNING_DB_DIR = _find_tuning_db_dir()
SCHEMA_APP = "graphtune-tuning"
_MIGRATIONS = TUNING_DB_DIR / "migrations"
SHIPPED_DIR = TUNING_DB_DIR / "records"  # imported into every database once (tests point it elsewhere)
SCHEMA_VERSION = max((int(p.name.split("_", 1)[0]) for p in _MIGRATIONS.glob("[0-9]*_*.sql")), default=0)

# SQLite primary result codes (sqlite3.SQLITE_* exist only from Python 3.11)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26
_VFS: str | None = None  # SQLite VFS override; tests use "unix-dotfile" (no shared memory: WAL refused)

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


def _code(e: sqlite3.Error) -> int | None:
    code = getattr(e, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # extended codes carry the primary one in the low byte


def _is_corrupt(e: sqlite3.Error) -> bool:
    code = _code(e)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    msg = str(e)  # Python 3.10: no error codes
    return "file is not a database" in msg or "malformed" in msg


def _is_busy(e: sqlite3.Error) -> bool:
    code = _code(e)
    return code in (_SQLITE_BUSY, _SQLITE_LOCKED) if code is not None else "locked" in str(e)


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
    timeout : float
        Seconds to wait for another process's lock before raising :class:`TuningDBError`.

    Raises
    ------
    TuningDBError
        The path is a directory, a device or unreadable; the database is locked past ``timeout``;
        it belongs to another application or to a newer graphtune. The file is left untouched.

    Examples
    --------
    >>> import tempfile, os
    >>> db = TuningDB(os.path.join(tempfile.mkdtemp(), "t.db"))
    >>> db.count() >= 0  # the shipped records, if any match nothing here they are simply unused
    True
    """

    def __init__(self, path: str | os.PathLike | None = None, import_shipped: bool = True,
                 timeout: float = 30.0) -> None:
        self.path = str(path if path is not None else flags.get("DB"))
        self.timeout = float(timeout)
        self.reports: list[str] = []  # what happened on open (files moved aside, no WAL), for `db stats`
        self.journal_mode = ""
        self._lock = threading.RLock()
        try:
            self._check_path()
            self._conn = self._open_checked()
        except OSError as e:
            raise TuningDBError(f"cannot open the tuning database {self.path}: {e}") from e
        except sqlite3.Error as e:
            raise self._error(e, "open") from e
        try:
            self.db = sqlite_utils.Database(self._conn)
            self._migrate()
            if import_shipped:
                self._import_shipped()
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------ open / safety
    def _error(self, e: sqlite3.Error, doing: str) -> TuningDBError:
        if _is_busy(e):
            return TuningDBError(f"the tuning database {self.path} is locked by another process (waited "
                                 f"{self.timeout:g} s to {doing} it); try again when that process is done")
        return TuningDBError(f"cannot {doing} the tuning database {self.path}: {e}")

    def _check_path(self) -> None:
        p = self.path
        if os.path.isdir(p):
            raise TuningDBError(f"the tuning database path {p} is a directory; GRAPHTUNE_DB (or --db) must name "
                                f"a file, e.g. {os.path.join(p, 'tuning.db')}")
        if os.path.exists(p) and not os.path.isfile(p):
            raise TuningDBError(f"the tuning database path {p} is not a regular file (a device, FIFO or socket); "
                                "GRAPHTUNE_DB (or --db) must name a file")
        if os.path.exists(p) and not os.access(p, os.R_OK | os.W_OK):
            raise TuningDBError(f"cannot open the tuning database {p}: no permission to read and write it")
        Path(p).parent.mkdir(parents=True, exist_ok=True)

    def _connect(self) -> sqlite3.Connection:
        target, uri = self.path, False
        if _VFS is not None:
            target, uri = f"{Path(self.path).resolve().as_uri()}?vfs={_VFS}", True
        conn = sqlite3.connect(target, timeout=self.timeout, isolation_level=None, check_same_thread=False, uri=uri)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    def _inspect(self, conn: sqlite3.Connection) -> str | None:
        """None if usable (fresh or ours); "corrupt: ..." if damaged. Raises TuningDBError for a
        foreign or newer database; lets other SQLite errors (locked, I/O) through."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            return f"corrupt: quick_check says {check}"
        if not tables:
            return None
        foreign = (f"{self.path} is not a graphtune tuning database (another application's?); it is left as "
                   "it is: set GRAPHTUNE_DB (or --db) to another file")
        if "schema_version" not in tables:
            raise TuningDBError(f"{foreign} [tables {sorted(tables)}, no schema_version]")
        rows = conn.execute("SELECT app, version FROM schema_version").fetchall()
        if len(rows) != 1 or rows[0][0] != SCHEMA_APP or not isinstance(rows[0][1], int):
            raise TuningDBError(f"{foreign} [schema_version holds {rows!r}]")
        self._check_not_newer(max(rows[0][1], conn.execute("PRAGMA user_version").fetchone()[0]))
        return None

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise TuningDBError(f"the tuning database {self.path} has schema version {version}, written by a newer "
                                f"graphtune (this one knows up to {SCHEMA_VERSION}): upgrade graphtune, or set "
                                "GRAPHTUNE_DB (or --db) to another file; the file is left as it is")

    def _open_checked(self) -> sqlite3.Connection:
        existed = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        conn = self._connect()
        try:
            problem = self._inspect(conn) if existed else None
        except sqlite3.DatabaseError as e:
            if not _is_corrupt(e):  # locked, I/O error...: the file may be fine, never move it
                conn.close()
                raise
            problem = f"corrupt: {e}"
        except BaseException:
            conn.close()
            raise
        if problem is not None:
            conn.close()
            self._move_aside(problem)
            conn = self._connect()
        try:
            self._enable_wal(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self, problem: str) -> None:
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
        warnings.warn(msg, stacklevel=4)

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # the pragma answers the mode in force: file systems without shared memory (NFS, SMB...) refuse WAL
        self.journal_mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if self.journal_mode != "wal":
            msg = (f"tuning database {self.path}: SQLite refused WAL journal mode (kept {self.journal_mode!r}; a "
                   "network file system?); it works with a rollback journal, but concurrent writers wait "
                   "longer and network file locking may be unreliable: prefer a local disk for GRAPHTUNE_DB")
            self.reports.append(msg)
            warnings.warn(msg, stacklevel=4)

    @contextlib.contextmanager
    def _tx(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite errors become TuningDBError (a lock past the timeout says so)."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock on upgrade
            except sqlite3.Error as e:
                raise self._error(e, doing) from e
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise self._error(e, doing) from e
                raise

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as e:
                raise self._error(e, "read") from e

    def _migrate(self) -> None:
        migrations = sorted(_MIGRATIONS.glob("[0-9]*_*.sql"))
        if not migrations:
            raise TuningDBError(f"no migrations found in {_MIGRATIONS} (is graphtune's tuning_db/ shipped?)")
        has = self._read("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'")
        if has and self._read("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)] and \
                self._read("PRAGMA user_version") == [(SCHEMA_VERSION,)]:
            return  # up to date: opening takes no write lock
        with self._tx("upgrade") as conn:  # one process migrates; the others wait, then see it done
            has = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
            version = conn.execute("SELECT version FROM schema_version").fetchone()[0] if has else 0
            self._check_not_newer(version)  # a newer graphtune may have migrated since we looked
            for m in migrations:
                n = int(m.name.split("_", 1)[0])
                if n > version:
                    for stmt in _split_sql(m.read_text()):
                        conn.execute(stmt)
                    version = n
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (app, version) VALUES (?, ?)", (SCHEMA_APP, version))
            conn.execute(f"PRAGMA user_version = {int(version)}")

    def _import_shipped(self) -> None:
        for f in sorted(Path(SHIPPED_DIR).glob("*.json")):
            text = f.read_bytes()
            sha = hashlib.sha256(text).hexdigest()
            if self._read("SELECT 1 FROM shipped_imports WHERE name=? AND sha256=?", (f.name, sha)):
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise TuningDBError(f"shipped tuning records {f} are not valid JSON: {e}") from None
            report = self.import_records(data, _ledger=(f.name, sha))
            if report.rejected:  # a packaging bug; tests/autotune/test_db.py guards against it
                warnings.warn(f"shipped tuning records {f.name}: rejected {report.rejected_summary()}", stacklevel=3)
            if report.added:
                log.info("imported %d shipped tuning records from %s", report.added, f.name)

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------ writes
    @staticmethod
    def _insert(conn: sqlite3.Connection, rec: Record) -> int:
        row = rec._row()
        cur = conn.execute(f"INSERT OR IGNORE INTO records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                           tuple(row.values()))
        return cur.rowcount

    def put(self, rec: Record) -> Record:
        """Append a record (filling ``record_id`` and ``created_at`` if empty); returns it.

        Raises :class:`~graphtune.autotune.db_records.RecordError` (a ``TuningDBError``) for an
        ill-typed record; nothing is stored then.
        """
        rec.record_id = rec.record_id or uuid.uuid4().hex
        rec.created_at = rec.created_at or _now()
        validate_fields(rec.to_json())
        with self._tx("write to"):
            if not self._insert(self._conn, rec):
                raise TuningDBError(f"a record with id {rec.record_id!r} is already in {self.path}")
        _bump()
        return rec

    def import_records(self, data: Any, _ledger: tuple[str, str] | None = None) -> ImportReport:
        """Import exported records (a list of :meth:`Record.to_json` dicts).

        Every record is validated first (:func:`~graphtune.autotune.db_records.validate_fields`);
        ill-typed ones are rejected and reported by reason, the others stored in one transaction.
        Records already present (same ``record_id``) are skipped, so importing twice is harmless.

        Returns
        -------
        ImportReport
            ``added`` new records, ``duplicates`` already present, ``rejected`` reason -> indices.
        """
        if not isinstance(data, list):
            raise TuningDBError(f"tuning records must be a JSON list of objects, got {type(data).__name__}")
        report = ImportReport(total=len(data))
        recs = []
        for i, d in enumerate(data):
            try:
                r = Record.from_json(d)
            except RecordError as e:
                report.rejected.setdefault(e.reason, []).append(i)
                continue
            r.record_id = r.record_id or uuid.uuid4().hex
            r.created_at = r.created_at or _now()
            recs.append(r)
        with self._tx("import into") as conn:
            report.added = sum(self._insert(conn, r) for r in recs)
            if _ledger is not None:
                conn.execute("INSERT OR IGNORE INTO shipped_imports VALUES (?, ?, ?, ?)", (*_ledger, report.added, _now()))
        report.duplicates = len(recs) - report.added
        _bump()
        return report

    def delete(self, record_ids: Iterable[str]) -> int:
        """Delete records by ``record_id``; returns how many existed."""
        ids = list(record_ids)
        with self._tx("delete from") as conn:
            n = sum(conn.execute("DELETE FROM records WHERE record_id = ?", (rid,)).rowcount for rid in ids)
        _bump()
        return n

    # ------------------------------------------------------------------ reads
    def count(self) -> int:
        return self._read("SELECT COUNT(*) FROM records")[0][0]

    def has_records(self, device: str, versions: str, ops: Iterable[str] | None = None) -> bool:
        """Whether any record was made for this device fingerprint and these versions (of ``ops``, if given)."""
        if ops is None:
            return bool(self._read("SELECT 1 FROM records WHERE device = ? AND versions = ? LIMIT 1",
                                   (device, versions)))
        ops = list(ops)
        marks = ", ".join("?" * len(ops))
        return bool(ops) and bool(self._read(f"SELECT 1 FROM records WHERE device = ? AND versions = ? AND op IN ({marks}) "
                                             "LIMIT 1", (device, versions, *ops)))

    def _rows(self, where: str | None, params: Iterable[Any], order: str) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return list(self.db["records"].rows_where(where, list(params), order_by=order))
            except sqlite3.Error as e:
                raise self._error(e, "read") from e

    def records(self, where: str | None = None, params: Iterable[Any] = (), order: str = "id") -> list[Record]:
        """Records matching an SQL ``where``; rows that fail validation (see :meth:`invalid`) are left out."""
        out = []
        for row in self._rows(where, params, order):
            try:
                out.append(Record._from_row(row))
            except RecordError:
                continue
        return out

    def invalid(self) -> list[tuple[str, str]]:
        """``(record_id, reason)`` of stored rows that fail validation (written by an older graphtune)."""
        out = []
        for row in self._rows(None, (), "id"):
            try:
                Record._from_row(row)
            except RecordError as e:
                out.append((str(row.get("record_id")), e.reason))
        return out

    def export(self) -> list[dict[str, Any]]:
        """Every record as JSON-ready dicts, oldest first (input of :meth:`import_records`)."""
        return [r.to_json() for r in self.records(order="created_at, record_id")]

    def get(self, ident: str) -> Record | None:
        """A record by row id or ``record_id`` (or a unique prefix of it)."""
        if ident.isdigit():
            found = self.records("id = ?", [int(ident)])
            if found:
                return found[0]
        found = self.records("substr(record_id, 1, ?) = ?", [len(ident), ident])
        if len(found) > 1:
            raise TuningDBError(f"record id prefix {ident!r} is ambiguous ({len(found)} records)")
        return found[0] if found else None

    def candidates(self, op: str, device: str, versions: str, shape_key: str) -> list[Record]:
        return self.records("op = ? AND device = ? AND versions = ? AND shape_key = ?",
                            [op, device, versions, shape_key])

    def lookup(self, op: str, shape_key: str, q_bucket: int, kv_bucket: int, device: str, versions: str,
               is_valid: Callable[[Record], bool], device_name: str = "") -> Record | None:
        """Best valid record by :func:`rank`: exact buckets, else the nearest in log2 distance; None if none.

        ``is_valid`` rejects stale ones (source hash changed, impl gone).
        """
        valid = [r for r in self.candidates(op, device, versions, shape_key) if is_valid(r)]
        return min(valid, key=lambda r: rank(r, q_bucket, kv_bucket, device_name), default=None)

    def stale(self, is_valid: Callable[[Record], bool]) -> list[Record]:
        return [r for r in self.records() if not is_valid(r)]

    def superseded(self, is_valid: Callable[[Record], bool]) -> list[Record]:
        """Valid records no lookup can pick (``is_valid`` as lookups use it; stale ones are :meth:`stale`).

        Within one exact key (op, device, versions, shape key, buckets), :func:`rank` orders the
        records the same way for every query except through the device name, so the key's pick for
        each device name present (and for any other name) is kept and the rest are superseded.
        """
        groups: dict[tuple, list[Record]] = {}
        for r in self.records():
            if is_valid(r):
                groups.setdefault((r.op, r.device, r.versions, r.shape_key, r.q_bucket, r.kv_bucket), []).append(r)
        out = []
        for rs in groups.values():
            names: set[str | None] = {r.device_name for r in rs} | {None}
            keep = {min(rs, key=lambda r: rank(r, r.q_bucket, r.kv_bucket, n)).record_id for n in names}
            out.extend(r for r in rs if r.record_id not in keep)
        return out


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
