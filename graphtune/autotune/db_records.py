"""Tuning records: the :class:`Record` type, its validation and :func:`rank`, the order lookups and prune share.

Validation checks every field's type and range, known ops and the config's JSON shape.

Records come from ``db import`` (files written by anyone), shipped ``tuning_db/records/*.json``
and the tuner. An ill-typed record stored once breaks every later ``db list``, lookup and prune
(SQLite keeps a string in an INTEGER column), so nothing reaches the database unchecked.

Each check raises :class:`RecordError` whose ``reason`` names the field and the rule but not the
value, so that rejected records can be grouped by reason.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from graphtune.codegen.family import families
from graphtune.errors import TuningDBError

__all__ = ["Record", "ImportReport", "RecordError", "rank", "KNOWN_OPS", "REQUIRED", "OPTIONAL", "validate_fields"]

# The ops the tuner writes records for: every op family tuned by shape keys its records by its
# first op (derived from the declarations, never listed here)
KNOWN_OPS = tuple(f.ops[0] for f in families() if f.shape)
REQUIRED = ("op", "impl", "source_hash", "device", "device_name", "versions", "shape_key", "q_bucket",
            "kv_bucket", "config", "median_us", "p20_us", "p80_us", "n_samples", "default_us", "mode")
OPTIONAL = ("shape", "score", "details", "created_at", "record_id")
_CONFIG_KEYS = {"params", "num_warps", "num_stages"}
_RECORD_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class RecordError(TuningDBError):
    """A tuning record fails validation; ``reason`` is the same for every record failing the same rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _text(d: dict, name: str, empty_ok: bool = False) -> None:
    v = d[name]
    if not isinstance(v, str) or (not empty_ok and not v):
        raise RecordError(f"{name}: expected a {'' if empty_ok else 'non-empty '}string")


def _time(d: dict, name: str) -> None:
    v = d.get(name)
    if v is not None and not (_is_num(v) and v >= 0):
        raise RecordError(f"{name}: expected null or a finite number >= 0 (microseconds)")


def _config(cfg: Any) -> None:
    if not isinstance(cfg, dict):
        raise RecordError("config: expected an object {params, num_warps, num_stages}")
    extra = set(cfg) - _CONFIG_KEYS
    if extra:
        raise RecordError(f"config: unknown keys (allowed: {sorted(_CONFIG_KEYS)})")
    params = cfg.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) and k and _is_int(v) for k, v in params.items()):
        raise RecordError("config: params must map names to integers")
    if not (_is_int(cfg.get("num_warps", 4)) and cfg.get("num_warps", 4) >= 1):
        raise RecordError("config: num_warps must be an integer >= 1")
    if not (_is_int(cfg.get("num_stages", 2)) and cfg.get("num_stages", 2) >= 0):
        raise RecordError("config: num_stages must be an integer >= 0")


def validate_fields(d: Any) -> dict[str, Any]:
    """Check a record given as a JSON object (``Record.to_json()`` form); return it, or raise :class:`RecordError`.

    Examples
    --------
    >>> validate_fields([1, 2])
    Traceback (most recent call last):
    ...
    graphtune.autotune.db_records.RecordError: not a JSON object
    """
    if not isinstance(d, dict):
        raise RecordError("not a JSON object")
    missing = [f for f in REQUIRED if f not in d]
    if missing:
        raise RecordError(f"missing fields {missing if len(missing) <= 3 else sorted(missing)[:3] + ['...']}")
    unknown = sorted(set(d) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise RecordError(f"unknown fields {unknown}")
    if not isinstance(d["op"], str):
        raise RecordError("op: expected a string")
    if d["op"] not in KNOWN_OPS:
        raise RecordError(f"unknown op (known: {', '.join(KNOWN_OPS)})")
    for name in ("impl", "source_hash", "device", "versions", "shape_key"):
        _text(d, name)
    _text(d, "device_name", empty_ok=True)
    for name in ("q_bucket", "kv_bucket"):
        if not (_is_int(d[name]) and d[name] >= 1):
            raise RecordError(f"{name}: expected an integer >= 1")
    _config(d["config"])
    if d["mode"] not in ("measured", "static"):
        raise RecordError("mode: expected 'measured' or 'static'")
    for name in ("median_us", "p20_us", "p80_us", "default_us"):
        _time(d, name)
    if d["mode"] == "measured" and d["median_us"] is None:
        raise RecordError("median_us: a measured record needs its time")
    if not (_is_int(d["n_samples"]) and d["n_samples"] >= 0):
        raise RecordError("n_samples: expected an integer >= 0")
    if d.get("score") is not None and not _is_num(d["score"]):
        raise RecordError("score: expected null or a finite number")
    for name in ("shape", "details"):
        if name in d and not isinstance(d[name], dict):
            raise RecordError(f"{name}: expected an object")
    created = d.get("created_at", "")
    if not isinstance(created, str):
        raise RecordError("created_at: expected an ISO-8601 string")
    if created:
        try:
            _dt.datetime.fromisoformat(created)
        except ValueError:
            raise RecordError("created_at: expected an ISO-8601 time") from None
    rid = d.get("record_id", "")
    if not isinstance(rid, str) or (rid and not _RECORD_ID.fullmatch(rid)):
        raise RecordError("record_id: expected up to 128 letters, digits or _.:-")
    return d


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
    def from_json(cls, d: Any) -> "Record":
        """A record from its JSON form; raises :class:`~graphtune.autotune.db_records.RecordError` if ill-typed."""
        return cls(**validate_fields(d))

    def _row(self) -> dict[str, Any]:
        r = asdict(self)
        r["config"] = json.dumps(self.config, sort_keys=True)
        r["shape"] = json.dumps(self.shape, sort_keys=True)
        r["details"] = json.dumps(self.details, sort_keys=True)
        return r

    @classmethod
    def _from_row(cls, row: dict[str, Any]) -> "Record":
        r = {k: v for k, v in row.items() if k != "id"}
        for k in ("config", "shape", "details"):
            try:
                r[k] = json.loads(r[k])
            except (TypeError, ValueError):
                raise RecordError(f"{k}: not valid JSON in the database") from None
        return cls.from_json(r)


@dataclass
class ImportReport:
    """Outcome of :meth:`TuningDB.import_records`: ``rejected`` maps each reason to record indices."""

    total: int
    added: int = 0
    duplicates: int = 0
    rejected: dict[str, list[int]] = field(default_factory=dict)

    def rejected_summary(self, limit: int = 4) -> str:
        parts = []
        for why, idx in sorted(self.rejected.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(f"#{i}" for i in idx[:limit]) + (", ..." if len(idx) > limit else "")
            parts.append(f"{len(idx)} x {why} ({shown})")
        return "; ".join(parts)


def rank(rec: Record, q_bucket: int, kv_bucket: int, device_name: str | None) -> tuple:
    """How much lookup prefers ``rec`` for a query (smaller is better); ``prune`` uses the same order.

    Nearest bucket in log2 distance, then measured over static, then records from a device of
    the same name (``None`` matches none), then newest, then record id (a total order, so lookup
    and prune can never disagree on a tie).
    """
    dist = abs(_log2(rec.q_bucket) - _log2(q_bucket)) + abs(_log2(rec.kv_bucket) - _log2(kv_bucket))
    return (dist, rec.mode != "measured", rec.device_name != device_name, _neg(rec.created_at), rec.record_id)


def _log2(n: int) -> int:
    return max(n, 1).bit_length() - 1


def _neg(ts: str) -> tuple:
    # newest first under ascending sort
    return tuple(-ord(c) for c in ts)
