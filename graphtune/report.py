"""``graphtune report``: one self-contained HTML page from the tuning database and benchmark results.

Sections:

1. **Tuned vs default**: every measured record's speedup (the default config's median over the
   winner's, both timed in the same tuning run), per op family and shape, with a bar chart; the
   dashed line is the tuner's minimum gain (``tuner.MIN_GAIN``) a winner needs to displace the default.
2. **Static records**: the configs static mode picked for GPUs you may not have, with the resource
   model's score, occupancy, and the roofline cost model's predicted time
   (:mod:`graphtune.codegen.costmodel`, when it models the implementation).
3. **Benchmarks**: the ratios the ``benchmarks/bench_*.py`` suites store in pytest-benchmark's
   ``extra_info`` (keys ``speedup``, ``speedup_vs_*``, ``*_speedup``, ``ratio``, ``ratio_*``,
   ``*_over_*``; numbers > 1 mean graphtune wins), one bar chart per suite, with a parity line at 1 and a
   goal line wherever a benchmark stores ``goal`` or ``goal_<ratio key>``.

Plots are PNGs embedded as base64, so the page is one file. Without matplotlib (the ``report``
extra: ``pip install 'graphtune[report]'``) the report has the same tables and no plots, and
says so (a :class:`ReportWarning` too).

Every record carries its *origin*: ``shipped`` when its id is one of the records graphtune ships
(``tuning_db/records/*.json``), ``local`` otherwise (tuned or imported here).
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from graphtune.errors import OptionError

__all__ = ["ReportWarning", "BenchRatio", "Report", "shipped_record_ids", "record_origin", "load_benchmarks",
           "build_report", "write_report", "have_matplotlib"]


class ReportWarning(UserWarning):
    """The report lacks something it could not build (plots without matplotlib, an unreadable file)."""


# ---------------------------------------------------------------------------------------- inputs

def shipped_record_ids(shipped_dir: str | Path | None = None) -> set[str]:
    """Record ids of the records graphtune ships (``tuning_db/records/*.json``).

    Examples
    --------
    >>> from graphtune.report import shipped_record_ids
    >>> isinstance(shipped_record_ids(), set)
    True
    """
    from graphtune.autotune import db as dbmod

    d = Path(shipped_dir if shipped_dir is not None else dbmod.SHIPPED_DIR)
    ids: set[str] = set()
    for f in sorted(d.glob("*.json")):
        try:
            ids |= {r.get("record_id", "") for r in json.loads(f.read_text()) if isinstance(r, dict)}
        except (OSError, ValueError):
            continue
    ids.discard("")
    return ids


def record_origin(rec: Any, shipped: set[str]) -> str:
    """``"shipped"`` for a record graphtune ships, ``"local"`` for one tuned or imported here."""
    return "shipped" if rec.record_id in shipped else "local"


@dataclass(frozen=True)
class BenchRatio:
    """One ratio a benchmark stored: suite (module), test, key, value, and its goal if the benchmark gave one."""

    suite: str
    test: str
    key: str
    value: float
    goal: float | None = None
    source: str = ""


_RATIO = re.compile(r"^(speedup|ratio)(_.+)?$|^.+_speedup$|^.+_over_.+$")


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bench_files(paths: Sequence[str | Path] | None) -> list[Path]:
    roots = [Path(p) for p in paths] if paths else [Path(".benchmarks")]
    files: list[Path] = []
    for r in roots:
        if r.is_dir():
            files += sorted(r.rglob("*.json"))
        elif r.is_file():
            files.append(r)
        elif paths:  # an explicit path that does not exist is a mistake; the default may be absent
            raise OptionError(f"benchmark results {r} do not exist (give pytest-benchmark JSON files or folders)")
    return files


def load_benchmarks(paths: Sequence[str | Path] | None = None) -> tuple[list[BenchRatio], list[str]]:
    """Ratios from pytest-benchmark JSON files (``--benchmark-json`` / ``--benchmark-autosave`` output).

    ``paths`` are files or folders (searched recursively); default ``.benchmarks/``. When a test
    appears in several files the newest run (the file's ``datetime``) wins.

    Returns
    -------
    (ratios, problems)
        The ratios, and one line per file that could not be read.

    Examples
    --------
    >>> import json, tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "run.json")
    >>> json.dump({"datetime": "2026-01-01T00:00:00", "benchmarks": [{"fullname": "benchmarks/bench_x.py::test_a",
    ...            "name": "test_a", "extra_info": {"speedup": 2.5, "goal_speedup": 2.0, "engine_s": 1.0}}]},
    ...           open(f, "w"))
    >>> ratios, problems = load_benchmarks([f])
    >>> [(r.suite, r.test, r.key, r.value, r.goal) for r in ratios]
    [('bench_x', 'test_a', 'speedup', 2.5, 2.0)]
    """
    newest: dict[tuple[str, str], tuple[str, list[BenchRatio]]] = {}
    problems: list[str] = []
    for f in _bench_files(paths):
        try:
            data = json.loads(f.read_text())
            benches = data["benchmarks"]
            when = str(data.get("datetime", ""))
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{f}: not a pytest-benchmark JSON file ({type(e).__name__}: {e})")
            continue
        for b in benches if isinstance(benches, list) else []:
            if not isinstance(b, dict):
                continue
            full = str(b.get("fullname") or b.get("name") or "?")
            mod, _, test = full.rpartition("::")
            suite = Path(mod).stem if mod else "benchmarks"
            test = test or full
            info = b.get("extra_info") or {}
            goals = info.get("goals") if isinstance(info.get("goals"), dict) else {}
            out = []
            for k, v in info.items():
                if _RATIO.match(k) and not k.startswith("goal") and _num(v):
                    g = info.get(f"goal_{k}", goals.get(k, info.get("goal") if k in ("speedup", "ratio") else None))
                    out.append(BenchRatio(suite, test, k, float(v), float(g) if _num(g) else None, str(f)))
            prev = newest.get((suite, test))
            if out and (prev is None or when >= prev[0]):
                newest[(suite, test)] = (when, out)
    ratios = [r for _, rs in sorted(newest.items()) for r in rs[1]]
    return ratios, problems


# ---------------------------------------------------------------------------------------- rows

def _family(op: str) -> str:
    from graphtune.codegen.family import family_of_op

    try:
        return family_of_op(op).name
    except Exception:  # noqa: BLE001 - an op of a family this graphtune does not declare
        return op


def _cfg(config: dict) -> str:
    s = ",".join(f"{k}={v}" for k, v in sorted(config.get("params", {}).items()))
    if "num_warps" in config:
        s += f";w{config['num_warps']};s{config.get('num_stages')}"
    return s or "-"


def _shape_text(rec: Any) -> str:
    from graphtune.codegen.family import family_of_op

    try:
        cls = family_of_op(rec.op).shape_class()
        if cls is not None and rec.shape:
            d = {k: tuple(v) if isinstance(v, list) else v for k, v in rec.shape.items()}
            return str(cls(**d))
    except Exception:  # noqa: BLE001 - an older record's shape: fall back to its key
        pass
    return f"{rec.shape_key} q{rec.q_bucket} kv{rec.kv_bucket}"


def _shape_obj(rec: Any) -> Any:
    from graphtune.codegen.family import family_of_op

    cls = family_of_op(rec.op).shape_class()
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec.shape.items()})


def _measured_rows(recs: list, shipped: set[str], valid: Any) -> list[dict[str, Any]]:
    rows = []
    for r in recs:
        if r.mode != "measured" or not r.median_us or not r.default_us:
            continue
        rows.append({"family": _family(r.op), "shape": _shape_text(r), "impl": r.impl, "config": _cfg(r.config),
                     "default_us": r.default_us, "tuned_us": r.median_us, "speedup": r.default_us / r.median_us,
                     "device": r.device, "origin": record_origin(r, shipped), "valid": valid(r),
                     "created": r.created_at[:19]})
    rows.sort(key=lambda x: (x["family"], x["shape"], x["created"]))
    return rows


def _predict(impl: str, meta: tuple, cfg: Any, res: Any, arch: int) -> Any:
    """The roofline prediction (:func:`graphtune.codegen.costmodel.predict`) of one compiled config."""
    import inspect

    from graphtune.codegen import costmodel
    from graphtune.codegen.crosscompile import blocks_per_sm

    kw = {}
    if "blocks" in inspect.signature(costmodel.predict).parameters:  # resident blocks per SM
        kw["blocks"] = blocks_per_sm(res, arch) if res is not None else 0
    return costmodel.predict(impl, meta, cfg, res, arch, **kw)


def _prediction(rec: Any, problems: set[str]) -> tuple[str, str, str]:
    """(predicted µs, bound, efficiency) of a static record by the roofline model, or dashes (and why, in ``problems``)."""
    try:
        from graphtune.codegen import costmodel
        from graphtune.codegen.crosscompile import KernelResources
        from graphtune.codegen.registry import KernelConfig

        if not costmodel.has_model(rec.impl) or not (rec.details or {}).get("resources"):
            return "-", "-", "-"
        res = KernelResources(**rec.details["resources"])
        cfg = KernelConfig.make(num_warps=rec.config.get("num_warps", 4), num_stages=rec.config.get("num_stages", 2),
                                **rec.config.get("params", {}))
        p = _predict(rec.impl, _shape_obj(rec).meta_args(), cfg, res, res.arch)
        return f"{p.time_us:.1f}", p.bound, f"{p.efficiency:.2f}"
    except Exception as e:  # noqa: BLE001 - the table still shows the rest; the report says why
        problems.add(f"no roofline prediction for {rec.impl} records: {type(e).__name__}: {e}")
        return "-", "-", "-"


def _static_rows(recs: list, shipped: set[str], valid: Any, problems: set[str]) -> list[dict[str, Any]]:
    rows = []
    for r in recs:
        if r.mode != "static":
            continue
        res = (r.details or {}).get("resources") or {}
        occ = "-"
        try:
            from graphtune.codegen.crosscompile import KernelResources, occupancy

            occ = f"{occupancy(KernelResources(**res)):.2f}"
        except Exception:  # noqa: BLE001 - no resources stored, or no Triton here
            pass
        pred, bound, eff = _prediction(r, problems)
        rows.append({"target": r.device.split(":", 1)[-1], "family": _family(r.op), "shape": _shape_text(r),
                     "impl": r.impl, "config": _cfg(r.config), "score": r.score, "occupancy": occ,
                     "registers": res.get("registers", "-"), "smem_kib": (f"{res['shared_mem_bytes'] / 1024:.0f}"
                                                                          if "shared_mem_bytes" in res else "-"),
                     "predicted_us": pred, "bound": bound, "efficiency": eff,
                     "origin": record_origin(r, shipped), "valid": valid(r)})
    rows.sort(key=lambda x: (x["target"], x["family"], x["shape"]))
    return rows


def _candidate_rows(recs: list, limit: int) -> list[dict[str, Any]]:
    """Every config of the first ``limit`` static records' implementations, re-ranked for their shape and
    target: the resource model's rank (``static_rank``, what static mode stores) next to the roofline's
    predicted time and the rank that time implies. Cross-compiles (cached next to the tuning database)."""
    from graphtune.codegen import costmodel
    from graphtune.codegen.crosscompile import static_rank

    rows: list[dict[str, Any]] = []
    for r in [r for r in recs if r.mode == "static"][:limit]:
        arch = int(r.device.split("sm_")[-1])
        meta = _shape_obj(r).meta_args()
        ranked = static_rank(r.impl, meta, None, arch)
        preds = []
        for cfg, sc, res in ranked:
            p = _predict(r.impl, meta, cfg, res, arch) if costmodel.has_model(r.impl) and res is not None else None
            preds.append(p.time_us if p is not None else math.inf)
        by_pred = sorted(range(len(ranked)), key=lambda i: preds[i])
        for i, (cfg, sc, res) in enumerate(ranked):
            rows.append({"target": f"sm_{arch}", "shape": _shape_text(r), "impl": r.impl, "rank": i + 1,
                         "config": _cfg(cfg.to_dict()), "score": sc if math.isfinite(sc) else "-inf",
                         "predicted_us": f"{preds[i]:.1f}" if math.isfinite(preds[i]) else "-",
                         "predicted_rank": by_pred.index(i) + 1 if math.isfinite(preds[i]) else "-",
                         "stored": "winner" if cfg.to_dict() == r.config else ""})
    return rows


# ---------------------------------------------------------------------------------------- plots

_MAX_BARS = 60  # per chart; the tables list everything


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (plots) or the report is tables only."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _barh_png(labels: list[str], values: list[float], title: str, xlabel: str,
              lines: Iterable[tuple[float, str, str]] = ()) -> str:
    """A horizontal bar chart as base64 PNG; ``lines`` are (x, label, color) vertical reference lines."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(values)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.34 * n))
    colors = ["#2b8a3e" if v >= 1.0 else "#c92a2a" for v in values]
    ax.barh(range(n), values, color=colors)
    ax.set_yticks(range(n), [lb if len(lb) <= 70 else lb[:67] + "..." for lb in labels], fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    for x, label, color in lines:
        ax.axvline(x, color=color, linestyle="--", linewidth=1, label=label)
    if lines:  # outside the axes, so it never hides a bar's label
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max([*values, *(x for x, _, _ in lines), 1.0]) * 1.18)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------- html

_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}"
        "th{background:#f1f3f5}td.n{text-align:right}.warn{color:#a61e4d}img{max-width:100%}")


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str]], cls: str) -> str:
    if not rows:
        return "<p><i>none</i></p>"
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = []
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k, "")
            if v is None:
                txt, num = "-", False
            elif isinstance(v, float):
                txt, num = (f"{v:.3g}" if k in ("score", "goal") else f"{v:.2f}" if k in ("speedup", "value")
                            else f"{v:.1f}"), True
            else:
                txt, num = ("yes" if v else "STALE") if k == "valid" else str(v), False
            cells.append(f"<td class='n'>{html.escape(txt)}</td>" if num else f"<td>{html.escape(txt)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{cls}'><tr>{head}</tr>\n" + "\n".join(body) + "</table>"


def _img(b64: str, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'/>"


@dataclass
class Report:
    """A built report: the HTML text and what went into it."""

    html: str
    n_records: int
    n_ratios: int
    n_plots: int
    warnings: list[str] = field(default_factory=list)


def build_report(db_path: str | None = None, benchmarks: Sequence[str | Path] | None = None, *,
                 plots: bool = True, static_candidates: int = 0, title: str = "graphtune report") -> Report:
    """Build the report from the tuning database at ``db_path`` (default: the ``DB`` flag) and benchmark JSON.

    Parameters
    ----------
    db_path : str, optional
        Tuning database file (opened, created if absent; the shipped records are imported as usual).
    benchmarks : list of paths, optional
        pytest-benchmark JSON files or folders; default ``.benchmarks/`` (absent: no benchmark section).
    plots : bool
        Embed matplotlib bar charts; without matplotlib the report is tables only (a warning says so).
    static_candidates : int
        Re-rank every config of the first N static records (cross-compiles: seconds per config, cached)
        and tabulate the resource model's rank against the roofline's predicted time.

    Examples
    --------
    >>> import os, tempfile
    >>> from graphtune.report import build_report
    >>> rep = build_report(os.path.join(tempfile.mkdtemp(), "t.db"), benchmarks=[], plots=False)
    >>> "<h2>Tuned vs default</h2>" in rep.html
    True
    """
    from graphtune import flags
    from graphtune.autotune.db import TuningDB
    from graphtune.autotune.tuner import MIN_GAIN, is_valid, load_impls

    notes: list[str] = []
    if plots and not have_matplotlib():
        plots = False
        notes.append("matplotlib is not installed: tables only (pip install 'graphtune[report]' for plots)")
    load_impls()  # validity of records needs every implementation's current source hash
    path = str(db_path if db_path is not None else flags.get("DB"))
    db = TuningDB(path)
    try:
        recs = db.records()
    finally:
        db.close()
    shipped = shipped_record_ids()
    measured = _measured_rows(recs, shipped, is_valid)
    why: set[str] = set()
    static = _static_rows(recs, shipped, is_valid, why)
    ratios, problems = load_benchmarks(benchmarks) if benchmarks != [] else ([], [])
    notes += problems + sorted(why)
    n_plots = 0
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>tuning database <code>{html.escape(path)}</code>: {len(recs)} record(s), "
             f"{sum(record_origin(r, shipped) == 'shipped' for r in recs)} shipped; generated "
             f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}</p>"]
    parts += [f"<p class='warn'>{html.escape(n)}</p>" for n in notes]

    parts.append("<h2>Tuned vs default</h2><p>Measured records: the default config's median over the "
                 "winner's, timed in the same tuning run.</p>")
    if plots and measured:
        latest = {(m["family"], m["shape"], m["device"]): m for m in sorted(measured, key=lambda m: m["created"])}
        shown = sorted(latest.values(), key=lambda m: (m["family"], m["shape"]))[:_MAX_BARS]
        labels = [f"{m['family']}: {m['shape']} ({m['origin']})" for m in shown]
        parts.append(_img(_barh_png(labels, [m["speedup"] for m in shown], "tuned vs default, newest record per shape",
                                    "speedup (default / tuned)", [(1.0, "parity", "#495057"),
                                                                  (1 / MIN_GAIN, "min. gain to displace the default",
                                                                   "#1971c2")]), "tuned vs default"))
        n_plots += 1
    parts.append(_table(measured, [("family", "family"), ("shape", "shape"), ("impl", "winner"), ("config", "config"),
                                   ("default_us", "default µs"), ("tuned_us", "tuned µs"), ("speedup", "speedup"),
                                   ("origin", "origin"), ("valid", "valid"), ("device", "device"),
                                   ("created", "created")], "measured"))

    parts.append("<h2>Static records</h2><p>Configs picked without the GPU (static mode): the resource "
                 "model's score, and the roofline cost model's predicted time "
                 "(<code>graphtune.codegen.costmodel</code>). A measured run on the GPU supersedes them.</p>")
    parts.append(_table(static, [("target", "target"), ("family", "family"), ("shape", "shape"),
                                 ("impl", "impl"), ("config", "config"), ("score", "score"),
                                 ("predicted_us", "predicted µs"), ("bound", "bound"), ("efficiency", "eff"),
                                 ("occupancy", "occupancy"), ("registers", "regs"), ("smem_kib", "smem KiB"),
                                 ("origin", "origin"), ("valid", "valid")], "static"))

    if static_candidates:
        parts.append("<h2>Static rank vs predicted time</h2><p>Every config of the first "
                     f"{static_candidates} static record(s): rank by the resource model's score, and by "
                     "the roofline's predicted time.</p>")
        parts.append(_table(_candidate_rows(recs, static_candidates),
                            [("target", "target"), ("shape", "shape"), ("impl", "impl"), ("rank", "rank"),
                             ("config", "config"), ("score", "score"), ("predicted_us", "predicted µs"),
                             ("predicted_rank", "predicted rank"), ("stored", "stored")], "candidates"))

    parts.append("<h2>Benchmarks</h2><p>Ratios stored by <code>benchmarks/bench_*.py</code> (&gt; 1: graphtune "
                 "faster or smaller), the newest run of each test.</p>")
    for suite in sorted({r.suite for r in ratios}):
        rs = [r for r in ratios if r.suite == suite]
        parts.append(f"<h3>{html.escape(suite)}</h3>")
        if plots:
            goals = sorted({(r.goal, r.key) for r in rs if r.goal is not None})
            lines = [(1.0, "parity", "#495057")] + [(g, f"goal {k}", "#e67700") for g, k in goals]
            parts.append(_img(_barh_png([f"{r.test}: {r.key}" for r in rs][:_MAX_BARS],
                                        [r.value for r in rs][:_MAX_BARS], suite, "ratio", lines), suite))
            n_plots += 1
        parts.append(_table([vars(r) for r in rs], [("test", "test"), ("key", "ratio"), ("value", "value"),
                                                    ("goal", "goal")], "bench"))
    if not ratios:
        parts.append("<p><i>no benchmark results (run <code>make bench</code> with "
                     "<code>--benchmark-autosave</code>, or pass JSON files)</i></p>")
    parts.append("</body></html>\n")
    for n in notes:
        warnings.warn(n, ReportWarning, stacklevel=2)
    return Report("\n".join(parts), len(recs), len(ratios), n_plots, notes)


def write_report(out: str | Path = "graphtune-report.html", db_path: str | None = None,
                 benchmarks: Sequence[str | Path] | None = None, *, plots: bool = True,
                 static_candidates: int = 0) -> Path:
    """Build the report (:func:`build_report`) and write it to ``out``; returns the file's absolute path.

    Examples
    --------
    >>> import os, tempfile
    >>> from graphtune.report import write_report
    >>> d = tempfile.mkdtemp()
    >>> p = write_report(os.path.join(d, "r.html"), os.path.join(d, "t.db"), benchmarks=[], plots=False)
    >>> p.name
    'r.html'
    """
    rep = build_report(db_path, benchmarks, plots=plots, static_candidates=static_candidates)
    p = Path(out).resolve()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rep.html)
    except OSError as e:
        raise OptionError(f"cannot write the report to {p}: {e}") from None
    return p
