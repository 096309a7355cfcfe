"""``graphtune report``: an HTML page of the tuning database's speedups, static picks and benchmark ratios."""
from __future__ import annotations

import argparse
import sys

from graphtune.cli import subcommand


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmarks", nargs="*", metavar="BENCH_JSON",
                   help="pytest-benchmark JSON files or folders (default: .benchmarks/ if it exists)")
    p.add_argument("-o", "--out", default="graphtune-report.html", help="the HTML file to write")
    p.add_argument("--static-candidates", type=int, default=0, metavar="N",
                   help="re-rank every config of the first N static records: resource-model rank vs roofline "
                        "predicted time (cross-compiles; seconds per config, cached)")
    p.add_argument("--no-plots", action="store_true", help="tables only (also the case without matplotlib)")


@subcommand("report", "write an HTML report: tuned vs default, static picks, benchmark ratios", _args)
def _report(args: argparse.Namespace) -> int:
    import warnings

    from graphtune.report import ReportWarning, write_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReportWarning)
        path = write_report(args.out, None, args.benchmarks or None, plots=not args.no_plots,
                            static_candidates=args.static_candidates)
    for w in caught:
        print(f"graphtune: warning: {w.message}", file=sys.stderr)
    print(path)
    return 0
