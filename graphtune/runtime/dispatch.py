"""Tuned dispatch: run each attention / merge_states call with the implementation and config the
tuning database chose for its shape on this device.

:func:`install` adds the ``"tuned"`` selector to the runtime's selector chain. Per call it builds a
cheap key from the argument shapes and dtypes and looks it up in an in-process dict; on a miss
(first call of a shape) it asks the database (exact bucket, else nearest) and caches the answer,
including "nothing tuned" (the op's default path then runs). Cached answers are per database
path (switching ``GRAPHTUNE_DB`` switches decisions) and are dropped whenever this process writes
to a tuning database; records written by other processes are seen after :func:`clear_cache` or a
restart. A model optimized with ``tune=False`` never gets a tuned implementation (its batch
context says so). A tuned implementation that raises at call time is dropped for
that key with one warning, and the call is answered by the default path.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Callable

import torch

from graphtune import flags
from graphtune.autotune import db as _db
from graphtune.autotune import fingerprint
from graphtune.autotune.tuner import is_valid, load_impls
from graphtune.codegen.family import OpFamily, families
from graphtune.codegen.registry import Impl, KernelConfig, get_impl
from graphtune.errors import GraphtuneError
from graphtune.ir.args import AttentionArgs
from graphtune.runtime.context import Feature, feature_registered, register_feature, unregister_feature

__all__ = ["install", "uninstall", "installed", "clear_cache", "resolve", "tuned_call", "cache_token", "cache_info", "may_serve"]

SELECTOR_NAME = "tuned"
# graph op -> its family: the ops tuned dispatch serves (the families' declared graph_ops)
_OPS: dict[str, OpFamily] = {g: f for f in families() for g in f.graph_ops}
# the tuning-record ops behind them (a family's records are keyed by its ops[0])
_SERVED_OPS: tuple[str, ...] = tuple(sorted({f.ops[0] for f in _OPS.values()}))
# families served per call by their record op directly, outside the graph (the engine's linears)
_DIRECT: dict[str, OpFamily] = {f.ops[0]: f for f in families() if f.shape and not f.graph_ops}


def _family(op: str) -> OpFamily | None:
    return _OPS.get(op) or _DIRECT.get(op)

# keys start with the database path: answers of one database never serve another
_cache: dict[tuple, Callable[..., Any] | None] = {}
_cache_gen = -1
# (path, tuning key, device fingerprint) -> valid records, best first (see _ranked_records)
_ranked: dict[tuple, list] = {}
# per (path, device): any record for this device and versions? absent: not looked at since the
# last write / clear_cache()
_has_records: dict[tuple, bool] = {}
_warned: set[tuple] = set()
_lock = threading.Lock()


def _reset_after_fork() -> None:
    # the lock may have been held by another thread of the parent at fork time
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _device(op: str, args: tuple) -> torch.device:
    # per call, before anything is known to be tuned: the first tensor's device (q, or outs[0])
    o = args[0]
    return (o[0] if isinstance(o, (list, tuple)) else o).device


def _fast_key(op: str, args: tuple) -> tuple:
    # what a tuned decision depends on: every tensor's shape, dtype and device, and the flags;
    # both attention ops share a key (`attention` is attention_with_lse's out)
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.shape, a.dtype, a.device))
        elif isinstance(a, (list, tuple)):
            out.append((len(a), a[0].shape, a[0].dtype, a[0].device) if a else 0)
        else:
            out.append(a)
    if op in _DIRECT:  # keyed by the thread count too (LinearShape.keys_of_call)
        out.append(torch.get_num_threads())
    return (_family(op).name, *out)  # type: ignore[union-attr]


def _default_path(op: str, args: tuple, failed: Impl) -> tuple:
    # the family's untuned implementation on this device, or its reference if that one failed
    fam = _family(op)
    assert fam is not None
    dev = _device(op, args).type
    impl = get_impl(fam.ops[0], fam.default_impls.get(dev, ""))
    if impl is not None and impl is not failed:
        return impl.fn(*args, config=impl.default_config(args))
    return fam.reference_fn()(*args)


def _make_call(op: str, impl: Impl, cfg: KernelConfig, key: tuple) -> Callable[..., Any]:
    fn = impl.fn

    def call(*args: Any) -> Any:
        try:
            return fn(*args, config=cfg)
        except Exception as e:  # noqa: BLE001 - any kernel failure falls back
            call.dropped = True  # type: ignore[attr-defined]  # callers holding it (LinearRouter) stop too
            with _lock:
                _cache[key] = None  # stop trying it for this key
                first = key not in _warned
                _warned.add(key)
            if first:
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                warnings.warn(f"graphtune: tuned implementation {impl.name}[{cfg}] of {op} failed on shapes "
                              f"{shapes} ({type(e).__name__}: {e}); using the default path for this shape",
                              stacklevel=2)
            return _default_path(op, args, impl)

    call.dropped = False  # type: ignore[attr-defined]
    call.impl_name = impl.name  # type: ignore[attr-defined]
    call.config = cfg  # type: ignore[attr-defined]
    return call


def _ranked_records(store: _db.TuningDB, key: Any, fp: Any) -> list[_db.Record]:
    """Valid records for one tuning key, best first by :func:`~graphtune.autotune.db.rank`."""
    k = (store.path, key.op, key.shape_key, key.q_bucket, key.kv_bucket, fp.device, fp.versions, fp.device_name)
    got = _ranked.get(k)
    if got is None:
        valid = [r for r in store.candidates(key.op, fp.device, fp.versions, key.shape_key) if is_valid(r)]
        # stable: ties keep the database's order, as min() in TuningDB.lookup does
        got = sorted(valid, key=lambda r: _db.rank(r, key.q_bucket, key.kv_bucket, fp.device_name))
        with _lock:
            _ranked[k] = got
    return got


def resolve(op: str, args: tuple) -> tuple[Impl, KernelConfig] | None:
    """The tuned (impl, config) for an attention or merge_states call, or None (nothing tuned, or
    the winner is what the op runs untuned anyway).

    Examples
    --------
    >>> import torch
    >>> q = torch.randn(1, 2, 1, 16); k = torch.randn(1, 2, 300, 16)
    >>> resolve("attention", (q, k, k, None, False, None, False)) is None  # nothing tuned yet
    True
    """
    fam = _family(op)
    if fam is None:
        return None
    store = _db.get_db()  # the DB flag's database, as the selector's cache key
    if store is None:
        return None
    dev = _device(op, args)
    load_impls(dev.type)
    fp = fingerprint.current(dev)

    def usable(rec: _db.Record) -> bool:
        impl = get_impl(rec.op, rec.impl)
        return impl is not None and impl.device == dev.type and impl.supports(args)

    rec = None
    for key in fam.shape_class().keys_of_call(args):
        # what store.lookup(..., is_valid and usable) picks: the best-ranked valid record this call's
        # arguments are supported by; the ranking per bucket is memoized, so a decode step whose KV
        # length moved on reads no database
        rec = next((r for r in _ranked_records(store, key, fp) if usable(r)), None)
        if rec is not None:
            break
    if rec is None:
        return None
    impl = get_impl(rec.op, rec.impl)
    cfg = KernelConfig.from_dict(rec.config)
    # the family's default implementation at its default config *is* the op's untuned path
    if impl is None or (impl.name == fam.default_impls.get(dev.type) and cfg == impl.default_config(args)):
        return None
    return impl, cfg


_path_memo: tuple[str, str] | None = None  # (flag value, absolute path)


def _db_path() -> str:
    """The database path the DB flag names now, absolute (as get_db() keys its handles)."""
    global _path_memo
    p = flags.get("DB")  # cached by flags per environment text
    memo = _path_memo
    if memo is not None and memo[0] == p:
        return memo[1]
    _path_memo = (p, p if os.path.isabs(p) else os.path.abspath(p))
    return _path_memo[1]


def _device_has_records(path: str, dev: torch.device, ops: tuple[str, ...] = _SERVED_OPS) -> bool:
    """Whether the database at ``path`` holds any record of ``ops`` for ``dev``'s fingerprint (memoized)."""
    has = _has_records.get((path, dev, ops))
    if has is None:
        # records of other devices (e.g. the shipped static GPU records) do not count
        has = False  # nothing is tuned for meta or other device types
        if dev.type in ("cpu", "cuda"):
            try:
                store = _db.get_db(path)
                fp = fingerprint.current(dev)
                # only the ops this selector serves: e.g. lean decode's tuned CPU configs are read
                # by its own selector, and must not make HF-driven forwards take the captured graph
                has = bool(store is not None and store.has_records(fp.device, fp.versions, ops))
            except Exception:  # noqa: BLE001 - an unreadable database is reported by resolve()
                has = True
        _has_records[(path, dev, ops)] = has
    return has


def _sync_generation() -> None:
    global _cache_gen
    gen = _db._generation
    if gen != _cache_gen:  # this process wrote to a tuning database: answers may have changed
        with _lock:
            _cache.clear()
            _ranked.clear()
            _cache_gen = gen
            _has_records.clear()


def cache_token() -> tuple:
    """Changes whenever an answer of :func:`tuned_call` may change (a database write in this
    process, another database, ``clear_cache``): callers keeping their own table of answers
    (the engine's linear router, per forward) compare it to know when to drop the table."""
    return (_db._generation, _cache_gen, _db_path(), flags.get("CACHELEVEL"), torch.get_num_threads())


def may_serve(device: torch.device, ctx: Any = None) -> bool:
    """Whether tuned dispatch could pick an implementation for calls on ``device`` at all.

    False when the model was optimized with ``tune=False``, the database is disabled, or it holds
    no record for this device's fingerprint: then every call would run the op's default path.
    """
    if ctx is not None and not ctx.enabled("tune"):
        return False
    _sync_generation()
    if flags.get("CACHELEVEL") <= 0:
        return False
    return _device_has_records(_db_path(), device)


def _selector(op: str, args: tuple, ctx: Any) -> Callable[..., Any] | None:
    if op not in _OPS:
        return None
    if ctx is not None and not ctx.enabled("tune"):  # optimize(..., tune=False)
        return None
    return tuned_call(op, args)


def tuned_call(op: str, args: tuple) -> Callable[..., Any] | None:
    """The tuned implementation for one call of ``op`` (a graph op or a family's record op, e.g.
    ``"linear"``) bound to its config, or None: nothing tuned for this shape on this device, the
    winner is the default path, or the database is disabled. Answers are cached per shape; a tuned
    implementation that raises is dropped for its shape with one warning and the call falls back.

    Examples
    --------
    >>> import torch
    >>> tuned_call("linear", (torch.randn(2, 8), torch.randn(4, 8), None)) is None  # nothing tuned
    True
    """
    fam = _family(op)
    if fam is None:
        return None
    _sync_generation()
    if flags.get("CACHELEVEL") <= 0:  # database disabled: defaults only
        return None
    path = _db_path()
    dev = _device(op, args)
    ops = _SERVED_OPS if op in _OPS else (fam.ops[0],)
    if not _device_has_records(path, dev, ops):  # the common untuned case costs one check per call
        return None
    key = (path, *_fast_key(op, args))
    try:
        return _cache[key]
    except KeyError:
        pass
    try:
        found = resolve(op, args)
    except Exception as e:  # noqa: BLE001 - an unreadable database must not break the op
        found = None
        if ("db", key) not in _warned:
            _warned.add(("db", key))
            warnings.warn(f"graphtune: tuning database lookup failed ({type(e).__name__}: {e}); "
                          "using the default path", stacklevel=3)
    fn = None if found is None else _make_call(op, found[0], found[1], key)
    with _lock:
        _cache[key] = fn
    return fn


def describe(site: Any, q_shape: tuple | None, k_shape: tuple | None, dtype: torch.dtype = torch.float32) -> str | None:
    """The implementation and config serving a call of these shapes: tuned winner or default."""
    if q_shape is None or k_shape is None or not all(isinstance(d, int) for d in (*q_shape, *k_shape)):
        return "default: SDPA / ATen flash kernel"
    # zero-stride views: the lookup only reads shapes, dtype and device
    q = torch.zeros((), dtype=dtype).expand(q_shape)
    k = torch.zeros((), dtype=dtype).expand(k_shape)
    is_causal = (site.details or {}).get("mask") == "causal"
    gqa = q_shape[-3] != k_shape[-3] if len(q_shape) >= 3 else False
    try:
        hit = resolve("attention_with_lse", AttentionArgs(q, k, k, is_causal=is_causal, enable_gqa=gqa).op_args())
    except GraphtuneError as e:  # explain reports it; the op itself warns and runs the default
        return f"default: SDPA / ATen flash kernel (tuning database unusable: {e})"
    return f"tuned: {hit[0].name} [{hit[1]}]" if hit else "default: SDPA / ATen flash kernel"


def install(priority: int = 0) -> None:
    """Add the tuned-dispatch selector to the runtime's chain (idempotent).

    Examples
    --------
    >>> import torch, graphtune.runtime.dispatch as dispatch
    >>> dispatch.install()
    >>> q = torch.randn(1, 2, 4, 16)
    >>> torch.ops.graphtune.attention(q, q, q).shape
    torch.Size([1, 2, 4, 16])
    >>> dispatch.uninstall()
    """
    load_impls("cpu")
    register_feature(Feature(SELECTOR_NAME, _selector, priority))


def uninstall() -> None:
    """Remove the selector and forget cached decisions."""
    unregister_feature(SELECTOR_NAME)
    clear_cache()


def installed() -> bool:
    return feature_registered(SELECTOR_NAME)


def clear_cache() -> None:
    """Forget cached decisions (and warnings), e.g. after another process tuned."""
    with _lock:
        _cache.clear()
        _ranked.clear()
        _warned.clear()
        _has_records.clear()


def cache_info() -> dict[str, int]:
    with _lock:
        return {"entries": len(_cache), "tuned": sum(1 for f in _cache.values() if f is not None)}
