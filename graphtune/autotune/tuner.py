"""The autotuner: measured mode (time candidates on this device) and static mode (rank for a GPU you
do not have by the cross-compiled resource model), both storing into the tuning database."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from graphtune.autotune import fingerprint, workers
from graphtune.autotune.db import Record, TuningDB, get_db
from graphtune.autotune.measure import Candidate, Measurement
from graphtune.autotune.search import STRATEGIES, Budget, CostModel, prerank
from graphtune.autotune.shapes import AttentionShape, LeanShape, MergeShape
from graphtune.codegen.family import families, family_of_op, load_impl_modules
from graphtune.codegen.registry import Impl, get_impl, impls_for, record_kind_hash
from graphtune.errors import KernelError, OptionError

__all__ = ["TuneResult", "tune_shape", "tune_shapes", "tune_static", "summary_table", "load_impls",
           "default_candidate", "is_valid", "check_device", "DEFAULT_IMPLS", "MIN_GAIN"]

# What each op runs untuned, per device type: the baseline every tuning run measures first.
# Derived from the op families' declarations (graphtune/codegen/<family>/__init__.py).
DEFAULT_IMPLS = {(op, dev): name for f in families() for dev, name in f.default_impls.items() for op in f.ops}
Shape = AttentionShape | MergeShape | LeanShape
# A challenger must beat the default's median by this factor to displace it, so that re-tuning
# does not flip the choice on timing noise.
MIN_GAIN = 0.95


def load_impls(device_type: str | None = None) -> None:
    """Register the op families' implementations: the CPU ones for ``"cpu"`` (no Triton import), else all.

    Records of implementations that are not loaded look stale to ``db stats`` and are skipped by
    lookups, so everything that reads the database loads them first.
    """
    load_impl_modules("cpu" if device_type == "cpu" else None)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` graphtune can measure on; :class:`OptionError` if it is not one.

    >>> check_device("cpu")
    device(type='cpu')
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"device {device!r} is not a torch device; measure on 'cpu' or 'cuda[:N]'") from None
    if dev.type not in ("cpu", "cuda"):
        raise OptionError(f"device {device!r}: graphtune tunes on 'cpu' or 'cuda[:N]' only")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                              f"{torch.cuda.device_count()} GPU(s)); use --target sm_XX to rank configs for a GPU "
                              "you do not have")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def is_valid(rec: Record) -> bool:
    """A record is valid while its implementation is registered with the same source hash."""
    impl = get_impl(rec.op, rec.impl)
    if impl is None:  # a non-kernel record (accuracy tuning): valid while its code is unchanged
        h = record_kind_hash(rec.op, rec.impl)
        return h is not None and h == rec.source_hash
    return impl.source_hash == rec.source_hash


def default_candidate(op: str, device_type: str, args: tuple | None = None) -> Candidate:
    """The op's untuned implementation on this device type (its family's ``default_impls``) and its default config."""
    name = family_of_op(op).default_impls.get(device_type)
    impl = get_impl(op, name) if name else None
    if impl is None:
        raise KernelError(f"no default implementation registered for {op} on {device_type}")
    return Candidate(impl, impl.default_config(args))


@dataclass
class TuneResult:
    """Outcome of tuning one shape (``median_us``/``default_us`` are ``None`` in static mode)."""

    shape: Shape
    op: str
    impl: str
    config: dict
    median_us: float | None
    default_us: float | None
    mode: str
    n_tried: int = 0
    failures: list[str] = field(default_factory=list)
    score: float | None = None
    record_id: str | None = None

    @property
    def speedup(self) -> float | None:
        if self.median_us and self.default_us and math.isfinite(self.default_us):
            return self.default_us / self.median_us
        return None


def _candidates(op: str, device_type: str, args: tuple, default: Candidate) -> list[Candidate]:
    out, seen = [default], {(default.impl.name, default.config)}
    for impl in impls_for(op, device_type):
        if not impl.supports(args):
            continue
        for cfg in [impl.default_config(args), *impl.configs(args)]:
            if (impl.name, cfg) not in seen:
                seen.add((impl.name, cfg))
                out.append(Candidate(impl, cfg))
    return out


def _to(x, dev: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(y, dev) for y in x)
    return x


def tune_shape(
    shape: Shape,
    strategy: str = "successive_halving",
    budget: Budget | None = None,
    *,
    device: str = "cpu",
    db: TuningDB | None | bool = True,
    cost_model: CostModel | None = None,
    candidates: Sequence[Candidate] | None = None,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
    backend: workers.Backend | None = None,
) -> TuneResult:
    """Measure candidates for one shape (attention or merge_states) on ``device`` and store the winner.

    ``candidates`` replaces the registry's space (tests inject failing ones); the op's default is
    always measured first as the baseline. ``db=True`` uses :func:`get_db`, ``None``/``False``
    stores nothing. A candidate that crashes, hangs past ``GRAPHTUNE_TUNE_TIMEOUT`` or disagrees
    with the reference scores ``inf``. ``backend`` (:mod:`graphtune.autotune.workers`; default
    in-process) runs each candidate, one at a time; the record goes to the fingerprint of the
    device its workers measured on.
    """
    if strategy not in STRATEGIES:
        raise OptionError(f"unknown tuning strategy {strategy!r}; choose from {sorted(STRATEGIES)}")
    dev = check_device(device)
    budget = (budget or Budget()).start()
    load_impls(dev.type)
    op = shape.op
    args = _to(shape.make_args(seed), dev)
    default = default_candidate(op, dev.type, args)
    cands = list(candidates) if candidates is not None else _candidates(op, dev.type, args, default)
    rest = [c for c in cands if c != default]
    if cost_model is not None and rest:
        rest = prerank(rest, cost_model, shape)
    be = backend if backend is not None else workers.InProcess()
    checked: dict[Candidate, Measurement | None] = {}
    fps: set[fingerprint.Fingerprint] = set()
    total = len(rest) + 1

    def run(c: Candidate, reps: int, check: bool = False) -> Measurement:
        r = be.run_one(workers.measure_task(c, shape, reps, seed=seed, device=str(dev), check=check))
        if r.fingerprint is not None:
            fps.add(r.fingerprint)
        m = workers.to_measurement(c, r)
        if check:  # a candidate that fails its check (or hangs in it) is not run again
            checked[c] = m if (not r.ok or r.value["check_failed"]) else None
        return m

    def measure(c: Candidate, reps: int) -> Measurement:
        if progress:
            n = len(checked) + (c not in checked)
            progress(f"{n}/{total} {c} ({reps} reps)")
        if c not in checked:
            return run(c, reps, check=True)
        bad = checked[c]
        return bad if bad is not None else run(c, reps)

    base = measure(default, budget.reps)
    ms = [base] + STRATEGIES[strategy](rest, measure, budget, seed)
    ok = [m for m in ms if m.ok]
    best = min(ok, key=lambda m: (-m.round, m.median_us)) if ok else base
    if base.ok and best is not base:
        base, best = _confirm(run, base, best, budget.reps)
    if base.ok and best is not base and best.median_us > MIN_GAIN * base.median_us:
        best = base
    failures = [f"{m.candidate}: {m.error}" for m in ms if m.error]
    res = TuneResult(shape, op, best.candidate.impl.name, best.candidate.config.to_dict(),
                     best.median_us if best.ok else None, base.median_us if base.ok else None, "measured",
                     n_tried=len(checked), failures=failures)
    store = get_db() if db is True else (db or None)
    if len(fps) > 1:
        raise KernelError(f"tuning {shape}: candidates were measured on different devices "
                          f"({sorted(f.device for f in fps)}); give each device its own tuning run")
    if store is not None and best.ok:
        fp = next(iter(fps)) if fps else fingerprint.current(dev)  # the workers' hardware key
        key = shape.key()
        top = sorted(ok, key=lambda m: m.median_us)[:5]
        rec = workers.merge(store, Record(
            op, best.candidate.impl.name, best.candidate.impl.source_hash, fp.device, fp.device_name,
            fp.versions, key.shape_key, key.q_bucket, key.kv_bucket, best.candidate.config.to_dict(),
            best.median_us, best.p20_us, best.p80_us, best.n_samples, res.default_us, "measured",
            shape.to_dict(), details={"strategy": strategy, "tried": len(checked), "failed": len(failures),
                                      "top": [[str(m.candidate), round(m.median_us, 3)] for m in top]}))
        res.record_id = rec.record_id
    return res


def _confirm(timer: Callable[[Candidate, int], Measurement], base: Measurement, best: Measurement, reps: int,
             rounds: int = 3) -> tuple[Measurement, Measurement]:
    """Re-time the default and the winner in alternation; keep each one's median round.

    The default is timed before the search and the winner during it: on a machine whose load
    drifts, that difference alone can pass for a speedup. Alternating removes the drift.
    """
    tb, tw = [], []
    for _ in range(rounds):
        tb.append(timer(base.candidate, reps))
        tw.append(timer(best.candidate, reps))
    if not all(m.ok for m in tb + tw):
        return base, best
    mid = rounds // 2
    b = sorted(tb, key=lambda m: m.median_us)[mid]
    w = sorted(tw, key=lambda m: m.median_us)[mid]
    return b, Measurement(w.candidate, w.median_us, w.p20_us, w.p80_us, w.n_samples, w.error, best.round)


def tune_shapes(
    shapes: list[Shape],
    budget_s: float = 30.0,
    strategy: str = "successive_halving",
    *,
    max_candidates: int | None = None,
    device: str = "cpu",
    db: TuningDB | None | bool = True,
    progress: Callable[[str], None] | None = None,
    backend: workers.Backend | None = None,
) -> list[TuneResult]:
    """Tune each shape on this device within ``budget_s`` seconds in total; store the winners.

    ``backend`` runs the candidates (:mod:`graphtune.autotune.workers`: ``InProcess()``, the
    default, ``ProcessPool(n)`` or ``RayBackend(n, address)``).

    Examples
    --------
    >>> from graphtune.autotune import AttentionShape, tune_shapes, summary_table
    >>> res = tune_shapes([AttentionShape(1, 4, 2, 1, 256, 32)], budget_s=2.0)
    >>> res[0].impl.startswith("cpu.")
    True
    >>> print(summary_table(res))  # doctest: +SKIP
    """
    check_device(device)  # before any shape is tuned
    out: list[TuneResult] = []
    t_end = time.monotonic() + budget_s
    for i, shape in enumerate(shapes):
        share = max(0.05, (t_end - time.monotonic()) / (len(shapes) - i))

        def prog(msg: str, i: int = i, shape: Shape = shape) -> None:
            if progress:
                progress(f"[{i + 1}/{len(shapes)}] {shape}: {msg}")

        out.append(tune_shape(shape, strategy, Budget(share, max_candidates), device=device, db=db,
                              progress=prog, backend=backend))
    return out


def tune_static(
    shapes: list[Shape],
    target: str,
    *,
    max_candidates: int | None = None,
    budget_s: float | None = None,
    db: TuningDB | None | bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[TuneResult]:
    """Rank the Triton implementations' configs for GPU ``target`` (e.g. ``"sm_90"``) without one.

    Uses ``graphtune.codegen.crosscompile.static_rank`` (cross-compiled registers, spills and
    shared memory -> occupancy model); stores the best config per shape marked ``static``. A later
    measured run on that GPU supersedes it. ``max_candidates`` caps the configs compiled per
    implementation and shape (the default config first); ``budget_s`` stops compiling further
    configs once spent (split evenly over the shapes).
    """
    fp = fingerprint.for_target(target)
    arch = int(fp.device.split("sm_")[1])
    try:
        from graphtune.codegen import crosscompile
    except ModuleNotFoundError as e:
        raise KernelError(f"static tuning for {target} needs graphtune.codegen.crosscompile ({e})") from None
    load_impls()
    store = get_db() if db is True else (db or None)
    t_end = None if budget_s is None else time.monotonic() + budget_s
    out = []
    for i, shape in enumerate(shapes):
        impls: list[Impl] = impls_for(shape.op, "cuda")
        if not impls:
            raise KernelError(f"static tuning for {target}: no Triton implementation of {shape.op} is registered")
        deadline = None if t_end is None else time.monotonic() + max(0.0, t_end - time.monotonic()) / (len(shapes) - i)
        meta = shape.meta_args()
        best: tuple | None = None
        n_tried = 0
        for impl in impls:
            dflt = impl.default_config(meta)
            cfgs = [dflt, *[c for c in impl.configs(meta) if c != dflt]]
            cfgs = cfgs[:max_candidates] if max_candidates else cfgs
            for j, cfg in enumerate(cfgs):
                if j > 0 and deadline is not None and time.monotonic() >= deadline:
                    break  # every implementation gets its default config ranked, whatever the budget
                if progress:
                    progress(f"[{i + 1}/{len(shapes)}] {shape}: {impl.name}[{cfg}] for {target} ({j + 1}/{len(cfgs)})")
                n_tried += 1
                for c, score, res in crosscompile.static_rank(impl.name, meta, [cfg], arch):
                    if best is None or score > best[2]:
                        best = (impl, c, score, res)
        assert best is not None
        impl, cfg, score, res = best
        if not math.isfinite(score):
            raise KernelError(f"static tuning for {target}: no config of {[i.name for i in impls]} compiles "
                              f"without spills for {shape}")
        r = TuneResult(shape, shape.op, impl.name, cfg.to_dict(), None, None, "static", n_tried=n_tried, score=score)
        if store is not None:
            key = shape.key()
            rec = store.put(Record(
                shape.op, impl.name, impl.source_hash, fp.device, fp.device_name, fp.versions, key.shape_key,
                key.q_bucket, key.kv_bucket, cfg.to_dict(), None, None, None, 0, None, "static", shape.to_dict(),
                score=score, details={"resources": res.to_dict() if res is not None else None}))
            r.record_id = rec.record_id
        out.append(r)
    return out


def summary_table(results: list[TuneResult]) -> str:
    """A plain-text table: shape, winner, config, time, default time, speedup."""
    rows = [("shape", "winner", "config", "time", "default", "speedup", "tried", "failed")]
    for r in results:
        cfg = ",".join(f"{k}={v}" for k, v in r.config.get("params", {}).items())
        if r.mode == "static":
            t, d, s = f"score {r.score:.3g}", "-", "static"
            cfg += f";w{r.config.get('num_warps')};s{r.config.get('num_stages')}"
        else:
            t = f"{r.median_us:.1f}us" if r.median_us else "-"
            d = f"{r.default_us:.1f}us" if r.default_us else "-"
            s = f"{r.speedup:.2f}x" if r.speedup else "-"
        rows.append((str(r.shape), r.impl, cfg or "-", t, d, s, str(r.n_tried), str(len(r.failures))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
