"""Sweeps: cross-compile every op family x Triton config x target in parallel, resumably.

``graphtune tune --all-families --targets sm_80,sm_90`` plans one *job* per (family, Triton
implementation, problem shape, config, target) (:func:`plan_sweep`; the problems are
:func:`graphtune.codegen.costmodel.doc_shapes`), runs the jobs on a process pool
(:func:`run_sweep`), and stores, per (problem, target), the best config as a ``static`` record
like ``graphtune tune --target`` does.

Resume: every finished job is written to a *journal*, a SQLite file next to the tuning database
(``<db>.sweep.sqlite``, one transaction per job, so a kill leaves whole rows only), keyed by a
hash of family, implementation, its kernel source hash, problem, config and target. A rerun skips
every job the journal has, so an interrupted sweep redoes only the jobs that were in flight. A
(problem, target) group's record gets an id derived from the group's key; a rerun finds it and
does not store it again, so records are never duplicated. Editing a kernel changes its source
hash, hence the keys: its jobs run again, the other families' do not.

Examples
--------
>>> from graphtune.autotune.sweep import plan_sweep
>>> jobs = plan_sweep(["sm_90"], family_names=["merge_states"], max_configs=2)
>>> sorted({j.family for j in jobs}), len({j.key for j in jobs}) == len(jobs)
(['merge_states'], True)
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sqlite3
import sys
import time
import uuid
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from graphtune import flags
from graphtune.codegen.registry import KernelConfig
from graphtune.errors import OptionError, TuningDBError

__all__ = ["SweepJob", "JobOutcome", "SweepJournal", "SweepResult", "plan_sweep", "run_sweep", "compile_jobs",
           "journal_path", "parse_targets"]


@dataclass(frozen=True)
class SweepJob:
    """One cross-compilation of a sweep: ``impl`` at ``config`` for ``shape`` on ``target``."""

    family: str
    impl: str
    source_hash: str
    shape: Any  # the family's tuning shape (frozen dataclass: hashable, picklable)
    config: KernelConfig
    target: str  # "sm_90"

    @property
    def arch(self) -> int:
        return int(self.target.split("_")[1])

    @property
    def key(self) -> str:
        """The journal key: family, impl, kernel source hash, problem, config, target."""
        return _hash([self.family, self.impl, self.source_hash, self.shape.op, self.shape.to_dict(),
                      self.config.to_dict(), self.target])

    @property
    def group(self) -> str:
        """The (problem, target) this job competes in; one record is stored per group."""
        return _hash([self.shape.op, self.shape.to_dict(), self.target])


@dataclass(frozen=True)
class JobOutcome:
    """What a worker sends back for one job: static score, resources (dict) or why it failed."""

    key: str
    score: float
    resources: dict | None
    error: str | None = None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def parse_targets(text: str | Sequence[str]) -> list[str]:
    """``"sm_80,sm_90"`` -> ``["sm_80", "sm_90"]``; :class:`OptionError` naming a bad one.

    >>> parse_targets("sm_80, sm_90")
    ['sm_80', 'sm_90']
    """
    from graphtune.codegen.crosscompile import ARCH_LIMITS

    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for t in (x.strip().lower() for x in items if x.strip()):
        if not (t.startswith("sm_") and t[3:].isdigit() and int(t[3:]) in ARCH_LIMITS):
            raise OptionError(f"target {t!r} is not one graphtune can cross-compile for; "
                              f"known: {', '.join(f'sm_{a}' for a in sorted(ARCH_LIMITS))}")
        if t not in out:
            out.append(t)
    if not out:
        raise OptionError("--targets needs at least one architecture, e.g. sm_80,sm_90")
    return out


def plan_sweep(targets: Sequence[str], family_names: Sequence[str] | None = None,
               shapes: dict[str, Sequence[Any]] | None = None, max_configs: int | None = None) -> list[SweepJob]:
    """Every job of a sweep: each family's Triton implementations x problem x config x target.

    ``shapes`` maps family name -> problems (default :func:`~graphtune.codegen.costmodel.doc_shapes`);
    families without problems or without a Triton implementation are skipped. ``max_configs``
    caps the configs per implementation and problem (the default config first).
    """
    from graphtune.codegen.costmodel import doc_shapes
    from graphtune.codegen.family import families, load_impl_modules
    from graphtune.codegen.registry import impls_for

    load_impl_modules("cuda")
    targets = parse_targets(targets)
    problems = doc_shapes() if shapes is None else shapes
    known = [f.name for f in families()]
    unknown = sorted(set(family_names or ()) - set(known))
    if unknown:
        raise OptionError(f"no op family {unknown}; declared: {known}")
    jobs: list[SweepJob] = []
    for fam in families():
        if family_names is not None and fam.name not in family_names:
            continue
        for shape in problems.get(fam.name, ()):
            meta = shape.meta_args()
            for impl in impls_for(shape.op, "cuda"):
                dflt = impl.default_config(meta)
                cfgs = [dflt, *[c for c in impl.configs(meta) if c != dflt]]
                for cfg in cfgs[:max_configs] if max_configs else cfgs:
                    jobs += [SweepJob(fam.name, impl.name, impl.source_hash, shape, cfg, t) for t in targets]
    return jobs


# ======================================================================================
# Journal
# ======================================================================================


def journal_path(db_path: str | os.PathLike | None = None) -> Path:
    """The sweep journal next to the tuning database: ``<db>.sweep.sqlite``."""
    db = Path(db_path or flags.get("DB")).expanduser()
    return db.with_name(db.name + ".sweep.sqlite")


class SweepJournal:
    """Finished jobs and stored groups, in SQLite (WAL; one transaction per write: a kill loses no row
    and leaves no half row)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS done (key TEXT PRIMARY KEY, grp TEXT, family TEXT, "
                               "impl TEXT, target TEXT, config TEXT, score REAL, resources TEXT, error TEXT, "
                               "created_at REAL)")
            self._conn.execute("CREATE TABLE IF NOT EXISTS stored (grp TEXT PRIMARY KEY, record_id TEXT)")
        except sqlite3.Error as e:
            raise TuningDBError(f"sweep journal {self.path}: {e}") from None

    def done(self) -> dict[str, JobOutcome]:
        rows = self._conn.execute("SELECT key, score, resources, error FROM done").fetchall()
        return {k: JobOutcome(k, s if s is not None else float("-inf"), json.loads(r) if r else None, e)
                for k, s, r, e in rows}

    def add(self, job: SweepJob, out: JobOutcome) -> None:
        sc = out.score if out.score != float("-inf") else None  # SQLite has no -inf literal in JSON terms
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (job.key, job.group, job.family, job.impl, job.target, json.dumps(job.config.to_dict()),
                                sc, json.dumps(out.resources) if out.resources else None, out.error, time.time()))

    def stored(self) -> set[str]:
        return {g for (g,) in self._conn.execute("SELECT grp FROM stored")}

    def mark_stored(self, group: str, record_id: str) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO stored VALUES (?, ?)", (group, record_id))

    def close(self) -> None:
        self._conn.close()


# ======================================================================================
# Workers
# ======================================================================================


def compile_jobs(jobs: list[SweepJob]) -> list[JobOutcome]:
    """Worker side: cross-compile and score each job (``crosscompile.static_rank`` with one config)."""
    from graphtune.codegen.crosscompile import static_rank

    out = []
    for j in jobs:
        try:
            (_, score, res), = static_rank(j.impl, j.shape.meta_args(), [j.config], j.arch)
        except Exception as e:  # noqa: BLE001 - one failing job must not end the sweep
            out.append(JobOutcome(j.key, float("-inf"), None, f"{type(e).__name__}: {e}"))
            continue
        out.append(JobOutcome(j.key, score, res.to_dict() if res is not None else None,
                              None if res is not None else "did not compile"))
    return out


# The function workers run on each chunk of jobs; tests point it at a stand-in (a module-level function,
# so that a process pool can pickle it by name).
RUNNER: Callable[[list[SweepJob]], list[JobOutcome]] = compile_jobs


def _worker_init() -> None:
    # pool workers compile in-process: under TRITON_INTERPRET=1, crosscompile.compile_many would start
    # one more child per call (and @triton.jit made while it is set is an interpreter function)
    os.environ.pop("TRITON_INTERPRET", None)
    # Ctrl-C reaches the whole process group: the parent alone stops the sweep (journal intact),
    # workers finish the job in hand
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_chunk(runner: Callable[[list[SweepJob]], list[JobOutcome]], db: str,
               jobs: list[SweepJob]) -> list[JobOutcome]:
    # in a worker: the parent's database (--db lives in a flags.Context, which a new process does not
    # inherit), so the cross-compile cache next to it is the one the parent uses
    with flags.Context(DB=db):
        return runner(jobs)


def _run_on_backend(backend: Any, run: Callable, chunks: list[list[SweepJob]],
                    finish: Callable[[JobOutcome], None]) -> None:
    from graphtune.autotune.workers import Task

    wave = 2 * max(1, int(getattr(backend, "workers", 1) or 1))
    db = str(flags.get("DB"))
    for i in range(0, len(chunks), wave):
        part = chunks[i:i + wave]
        # the timeout covers every job of a chunk (cross-compiles take seconds each)
        tasks = [Task("compile", "graphtune.autotune.sweep:_chunk_task", (run, db, c),
                      timeout=float(flags.get("TUNE_TIMEOUT")) * len(c)) for c in part]
        for c, r in zip(part, backend.run(tasks)):
            outs = r.value if r.ok else [JobOutcome(j.key, 0.0, None, r.error) for j in c]
            for out in outs:
                finish(out)


def _chunk_task(payload: tuple) -> list[JobOutcome]:
    # a worker-backend task (workers.execute calls it with the payload)
    run, db, jobs = payload
    return _run_chunk(run, db, jobs)


def make_executor(workers: int) -> Executor:
    """The process pool sweep jobs run on (``spawn``: no forked torch/Triton state).

    The default when neither ``--workers`` nor ``--ray`` asks for a shared worker backend.
    """
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)


class _Bar:
    """tqdm when installed (``pip install graphtune[sweep]``), else one line per update with an ETA."""

    def __init__(self, total: int, initial: int, quiet: bool) -> None:
        self.total, self.n, self.quiet, self.t0, self.start = total, initial, quiet, time.monotonic(), initial
        self._tqdm = None
        if not quiet:
            try:
                from tqdm import tqdm
                self._tqdm = tqdm(total=total, initial=initial, desc="sweep", unit="job", file=sys.stderr,
                                  dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, note: str = "") -> None:
        self.n += 1
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(note[:60], refresh=False)
            self._tqdm.update(1)
        elif not self.quiet:
            rate = (self.n - self.start) / max(1e-9, time.monotonic() - self.t0)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            print(f"sweep {self.n}/{self.total} eta {eta:.0f}s {note}", file=sys.stderr)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


# ======================================================================================
# The sweep
# ======================================================================================


@dataclass
class SweepResult:
    """What a sweep did: jobs planned, skipped (journal), run now, failed; records stored (ids)."""

    total: int
    skipped: int
    ran: int = 0
    failed: int = 0
    records: list[str] = field(default_factory=list)
    best: dict[str, tuple[SweepJob, float]] = field(default_factory=dict)  # group -> (job, score)
    unstored_ops: set[str] = field(default_factory=set)  # ops the tuning database has no records for (yet)

    def summary(self) -> str:
        lines = [f"sweep: {self.total} job(s), {self.skipped} already done, {self.ran} run now, {self.failed} failed; "
                 f"{len(self.records)} record(s) stored"]
        if self.unstored_ops:
            lines.append(f"  not stored (the tuning database keeps no records of op {', '.join(sorted(self.unstored_ops))}"
                         "; the results are in the sweep journal)")
        for job, sc in sorted(self.best.values(), key=lambda t: (t[0].family, str(t[0].shape), t[0].target)):
            lines.append(f"  {job.target}  {job.family}: {job.shape}  {job.impl}[{job.config}]  score {sc:.3g}")
        return "\n".join(lines)


def run_sweep(jobs: list[SweepJob], *, workers: int = 2, chunk: int = 1, db: Any = True,
              journal: str | os.PathLike | None = None, quiet: bool = False,
              runner: Callable[[list[SweepJob]], list[JobOutcome]] | None = None,
              backend: Any = None) -> SweepResult:
    """Run ``jobs`` (:func:`plan_sweep`) on ``workers`` processes, skipping journaled ones; store records.

    Parameters
    ----------
    workers : int
        Pool processes; 0 runs the jobs in this process.
    chunk : int
        Jobs per pool task (a kill redoes at most ``workers * chunk`` jobs).
    db : TuningDB, True or None
        Where records go (``True``: :func:`~graphtune.autotune.db.get_db`; ``None``: nowhere).
    journal : path, optional
        Default :func:`journal_path` of the tuning database.
    runner : callable, optional
        ``fn(jobs) -> [JobOutcome]``, run by the workers (default :data:`RUNNER`).
    backend : graphtune.autotune.workers.Backend, optional
        Run the chunks on one of the shared worker backends (process pool, Ray: ``--workers`` /
        ``--ray``) instead of a local pool of ``workers`` processes; chunks go out in waves of two
        per worker and are journaled as each wave returns.

    Examples
    --------
    >>> import tempfile, os
    >>> from graphtune.autotune.sweep import plan_sweep, run_sweep
    >>> jobs = plan_sweep(["sm_90"], family_names=["merge_states"], max_configs=1)
    >>> j = os.path.join(tempfile.mkdtemp(), "j.sqlite")
    >>> r = run_sweep(jobs, workers=0, db=None, journal=j, quiet=True)  # doctest: +SKIP
    >>> run_sweep(jobs, workers=0, db=None, journal=j, quiet=True).ran  # doctest: +SKIP
    0
    """
    from graphtune.autotune.db import get_db

    run = runner or RUNNER
    store = get_db() if db is True else (db or None)
    jr = SweepJournal(journal or journal_path(store.path if store is not None else None))
    done = jr.done()
    by_key = {j.key: j for j in jobs}
    groups: dict[str, list[str]] = {}
    for j in by_key.values():
        groups.setdefault(j.group, []).append(j.key)
    todo = [j for k, j in by_key.items() if k not in done]
    res = SweepResult(len(by_key), len(by_key) - len(todo))
    stored = jr.stored()
    left = {g: sum(k not in done for k in ks) for g, ks in groups.items()}
    bar = _Bar(len(by_key), res.skipped, quiet)

    def finish(out: JobOutcome) -> None:
        job = by_key[out.key]
        jr.add(job, out)
        done[out.key] = out
        res.ran += 1
        res.failed += out.error is not None
        left[job.group] -= 1
        bar.update(f"{job.family} {job.target}")
        if left[job.group] == 0:
            _store_group(job.group, groups[job.group], by_key, done, store, jr, stored, res)

    try:
        for g in groups:  # groups finished by an earlier, interrupted run whose record was not stored yet
            if left[g] == 0:
                _store_group(g, groups[g], by_key, done, store, jr, stored, res)
        chunks = [todo[i:i + max(1, chunk)] for i in range(0, len(todo), max(1, chunk))]
        if backend is not None:
            _run_on_backend(backend, run, chunks, finish)
        elif workers <= 0:
            for c in chunks:
                for out in run(c):
                    finish(out)
        else:
            pool = make_executor(workers)
            try:
                futs = [pool.submit(_run_chunk, run, str(flags.get("DB")), c) for c in chunks]
                for f in as_completed(futs):
                    for out in f.result():
                        finish(out)
            finally:  # on an interrupt: drop queued chunks, do not wait for running ones
                pool.shutdown(wait=False, cancel_futures=True)
    finally:
        bar.close()
        jr.close()
    return res


def _store_group(group: str, keys: list[str], by_key: dict[str, SweepJob], done: dict[str, JobOutcome],
                 store: Any, jr: SweepJournal, stored: set[str], res: SweepResult) -> None:
    from graphtune.autotune import fingerprint
    from graphtune.autotune.db import Record
    from graphtune.autotune.db_records import KNOWN_OPS

    scored = [(done[k].score, k) for k in keys if done[k].score != float("-inf") and done[k].error is None]
    if not scored:
        return
    sc, k = max(scored, key=lambda t: (t[0], t[1]))
    job = by_key[k]
    res.best[group] = (job, sc)
    if store is None or group in stored:
        return
    if job.shape.op not in KNOWN_OPS:
        res.unstored_ops.add(job.shape.op)
        return
    # the record id is derived from the group (and the winning job), so a resumed sweep that stored it
    # before being killed finds it instead of storing a second copy
    rid = uuid.uuid5(uuid.NAMESPACE_OID, f"graphtune-sweep:{group}:{k}").hex
    if not store.records("record_id = ?", [rid]):
        fp = fingerprint.for_target(job.target)
        key = job.shape.key()
        try:
            store.put(Record(job.shape.op, job.impl, job.source_hash, fp.device, fp.device_name, fp.versions,
                             key.shape_key, key.q_bucket, key.kv_bucket, job.config.to_dict(), None, None, None, 0,
                             None, "static", job.shape.to_dict(), score=sc, record_id=rid,
                             details={"resources": done[k].resources, "sweep": True}))
        except TuningDBError:
            if not store.records("record_id = ?", [rid]):  # a concurrent sweep stored it first: fine
                raise
        res.records.append(rid)
    jr.mark_stored(group, rid)
    stored.add(group)


# ======================================================================================
# graphtune tune --all-families / --validate-static
# ======================================================================================


def cli_run(args: Any, shapes: list) -> int:
    """``graphtune tune`` with ``--all-families`` (a sweep) or ``--validate-static`` (``args``: its namespace)."""
    from graphtune.autotune.search import parse_budget

    _, cands = parse_budget(args.budget)
    fams = args.family or None
    if args.validate_static:
        from graphtune.autotune.validate_static import validate_static, validation_table

        if args.all_families:
            shapes = shapes + _validation_shapes(args.device, fams)
        if not shapes:
            raise OptionError("--validate-static needs problems: --shape/--merge/--lean, or --all-families")
        say = None if args.quiet else (lambda m: print(m, file=sys.stderr))
        rows = validate_static(shapes, device=args.device, target=args.target, max_configs=cands, progress=say)
        print(validation_table(rows))
        return 0
    if shapes:
        raise OptionError("--all-families sweeps the families' own problems; drop --shape/--merge/--lean "
                          "(or tune them with --target)")
    jobs = plan_sweep(parse_targets(args.targets), fams, max_configs=cands)
    backend = None
    if getattr(args, "ray", None) not in (None, False) or getattr(args, "workers", None):
        from graphtune.autotune.workers import make_backend

        backend = make_backend(getattr(args, "workers", None), getattr(args, "ray", None))
    try:
        res = run_sweep(jobs, workers=args.jobs, db=None if args.no_store else True, quiet=args.quiet,
                        backend=backend)
    except KeyboardInterrupt:
        print(f"graphtune: sweep interrupted; finished jobs are in {journal_path()}: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    finally:
        if backend is not None:
            backend.close()
    print(res.summary())
    return 0 if res.failed < res.ran or res.ran == 0 else 1


def _validation_shapes(device: str, family_names: Sequence[str] | None) -> list:
    # a GPU measures the documented problems; the CPU interpreter only the families' tiny examples
    from graphtune.codegen.costmodel import doc_shapes
    from graphtune.codegen.family import families

    out: list = []
    for fam in families():
        if (family_names and fam.name not in family_names) or fam.shape_class() is None or "cuda" not in fam.impl_modules:
            continue
        out += list(doc_shapes().get(fam.name, ())) if device.startswith("cuda") else list(fam.shape_class().examples())
    return out
