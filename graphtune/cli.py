"""The ``graphtune`` command line: ``graphtune tune ...``, ``graphtune db list|show|export|import|prune|stats``.

Adding a subcommand is one self-contained block::

    def _explain_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model")

    @subcommand("explain", "show what graphtune would do to a model", _explain_args)
    def _explain(args: argparse.Namespace) -> int:
        ...
        return 0

(in this module, or in a module ``graphtune/cli_*.py``, found by :func:`extensions`). ``main(argv)``
returns the exit status: 0 success, 1 the command failed, 2 bad usage or a graphtune error.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import pkgutil
import json
import sys
from typing import Callable, Iterator

from graphtune import flags
from graphtune.errors import GraphtuneError, OptionError

__all__ = ["main", "subcommand", "build_parser", "workload_shapes"]

Run = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]
_COMMANDS: dict[str, tuple[str, Configure, Run]] = {}


def subcommand(name: str, help: str, configure: Configure | None = None) -> Callable[[Run], Run]:
    """Register ``run(args) -> int`` as subcommand ``name``; ``configure(parser)`` adds its arguments."""
    def deco(run: Run) -> Run:
        _COMMANDS[name] = (help, configure or (lambda p: None), run)
        return run
    return deco


def extensions() -> list[str]:
    """Modules ``graphtune/cli_*.py``: each registers its subcommands on import (found, not listed)."""
    import graphtune

    return sorted(f"graphtune.{m.name}" for m in pkgutil.iter_modules(graphtune.__path__) if m.name.startswith("cli_"))


def _load_extensions() -> None:
    for mod in extensions():
        importlib.import_module(mod)


def build_parser() -> argparse.ArgumentParser:
    _load_extensions()
    p = argparse.ArgumentParser(prog="graphtune", description="graph rewriting and kernel autotuning for LLM inference")
    p.add_argument("--db", metavar="PATH", help="tuning database file (default: $GRAPHTUNE_DB or ~/.cache/graphtune/tuning.db)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, configure, run) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        configure(sp)
        sp.set_defaults(_run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``graphtune`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    ctx = flags.Context(DB=args.db) if args.db else contextlib.nullcontext()
    try:
        with ctx:
            return args._run(args)
    except GraphtuneError as e:
        print(f"graphtune: error: {e}", file=sys.stderr)
        return 2


# ======================================================================================
# graphtune tune
# ======================================================================================

def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} needs positive integers")
    return vals


def workload_shapes(batch: list[int], seq: list[int], heads: int, kv_heads: int, head_dim: int,
                    dtype: str = "float32") -> list:
    """Prefill (causal, ``L = S = seq``) and decode (``L = 1``, ``S = seq``) shapes for every batch and length.

    >>> [str(s) for s in workload_shapes([1], [128], 8, 2, 64)]
    ['B=1 H=8/2 L=128 S=128 D=64 float32 causal', 'B=1 H=8/2 L=1 S=128 D=64 float32']
    """
    from graphtune.autotune.shapes import AttentionShape

    out = []
    for b in batch:
        for s in seq:
            for shape in (AttentionShape(b, heads, kv_heads, s, s, head_dim, dtype, causal=True),
                          AttentionShape(b, heads, kv_heads, 1, s, head_dim, dtype)):
                if shape not in out:
                    out.append(shape)
    return out


def _model_dims(path: str) -> tuple[int, int, int]:
    # heads, kv heads, head dim from a Hugging Face config.json
    try:
        with open(path) as f:
            cfg = json.load(f)
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OptionError(f"--model-config {path}: cannot read heads/kv heads/head dim ({e})") from None
    return heads, kv, dim


def _tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", default=[], metavar="B,H,KVH,L,S,D[,dtype][,causal]",
                   help="an attention shape to tune (repeatable); extra fields: a dtype, 'causal', 'mask=bool|additive'")
    p.add_argument("--merge", action="append", default=[], metavar="N,B,H,L,D[,dtype]",
                   help="a merge_states shape to tune (repeatable): N partials of out [B, H, L, D]")
    p.add_argument("--lean", action="append", default=[], metavar="LENGTHS,H,KVH,D[,L][,dtype]",
                   help="a ragged lean-decode batch to tune the CPU path's tile/workers for (repeatable); LENGTHS "
                        "is '+'-separated N or NxCOUNT, e.g. 32768+1024x31,8,8,64 (1 row of 32K + 31 of 1K keys)")
    w = p.add_argument_group("workload description (expanded to prefill + decode shapes)")
    w.add_argument("--batch", type=_ints, help="batch sizes, e.g. 1,8")
    w.add_argument("--seq", type=_ints, help="sequence lengths, e.g. 128,1024")
    w.add_argument("--heads", type=int)
    w.add_argument("--kv-heads", type=int)
    w.add_argument("--head-dim", type=int)
    w.add_argument("--dtype", default="float32")
    w.add_argument("--model-config", metavar="CONFIG_JSON",
                   help="take heads/kv heads/head dim from a Hugging Face config.json")
    p.add_argument("--strategy", default="successive_halving", help="exhaustive | random | successive_halving")
    p.add_argument("--budget", default="60s",
                   help="N or Ns: seconds for the whole run; Nc: at most N candidates per shape; both: 60s,20c")
    p.add_argument("--target", help="static mode: rank Triton configs for a GPU you do not have, e.g. sm_90")
    p.add_argument("--device", default="cpu", help="device to measure on (cpu, cuda)")
    p.add_argument("--no-store", action="store_true", help="do not write results to the tuning database")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--workers", type=int, metavar="N",
                   help="measure candidates in N worker processes (killed on timeout or crash; default: in-process)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="measure candidates on Ray actors (--workers of them) at ADDRESS, or on a local 2-CPU "
                        "cluster without one (pip install 'graphtune[distributed]')")
    li = p.add_argument_group("linear layers of decode and verify steps (graphtune/codegen/linear)")
    li.add_argument("--linear-shape", action="append", default=[], metavar="M,N,K[,dtype]",
                    help="a linear shape to tune (repeatable): x [M, K] times a weight [N, K]")
    li.add_argument("--linears", action="store_true",
                    help="tune every linear layer shape of --model at 1..16, 32, ..., 512 rows (what the engine's "
                         "decode, verify and prefill steps multiply; the LM head up to 128)")
    li.add_argument("--threads", type=int, metavar="N",
                    help="torch threads for this run: linear records are keyed by the thread count (default: torch's)")
    a = p.add_argument_group("sparse prefill accuracy (graphtune/runtime/sparse_tune.py)")
    a.add_argument("--accuracy", action="store_true",
                   help="tune PBS sparse prefill for --model: a tau per layer (by measured sensitivity; dense where "
                        "nothing fits) under --min-top1 next-token agreement with dense attention on real text; store the winner")
    a.add_argument("--model", default="smollm2",
                   help="--accuracy, --linears: 'smollm2' (default), 'demo' or a graphtune.models family")
    a.add_argument("--length", type=int, default=4096, help="--accuracy: calibration prompt tokens")
    a.add_argument("--min-top1", type=float, default=0.99, help="--accuracy: required top-1 agreement (0..1]")
    a.add_argument("--block", default=None, help="--accuracy: PBS block sizes to try, e.g. 64,128 (default: the flag)")
    a.add_argument("--segment", default=None,
                   help="--accuracy: PBS segment sizes to try, e.g. 256,512 (default: the flag); the sparsest winner is kept")
    a.add_argument("--no-permute", action="store_true", help="--accuracy: tune the no-permutation variant")
    a.add_argument("--tau", type=float, default=None, help="--accuracy: tau each layer's sensitivity is measured at (default: the flag)")
    a.add_argument("--sample", default=None,
                   help="--accuracy: query rows per block the block selection samples, e.g. 8,0 to try both; 0: the "
                        "paper's pooled estimate (default: the flag, 8); the sparsest winner is kept")
    a.add_argument("--peaks", default=None,
                   help="--accuracy: blocks each query row adds by its score bound, e.g. 0,2 to try both "
                        "(default: the flag, 0); the sparsest winner is kept")
    a.add_argument("--text", metavar="FILE", default=None,
                   help="--accuracy: calibrate on this UTF-8 text file's first --length tokens (prompts like the ones "
                        "you will serve) instead of Python stdlib sources")
    a.add_argument("--positions", type=int, default=None,
                   help="--accuracy: last positions of the calibration prompt whose next-token top-1 and KL are "
                        "measured (default: min(2048, --length // 4)); more positions: less noise, less overfit bound")
    a.add_argument("--max-runs", type=int, default=10,
                   help="--accuracy: most binary-search prefills (after one prefill per layer)")
    s = p.add_argument_group("sweeps and validation of static mode (graphtune/autotune/sweep.py)")
    s.add_argument("--all-families", action="store_true",
                   help="cross-compile every op family's Triton configs for --targets (resumable; --budget Nc caps "
                        "configs per problem)")
    s.add_argument("--targets", default="sm_80,sm_90", help="architectures of --all-families (default sm_80,sm_90)")
    s.add_argument("--family", action="append", default=[], help="limit --all-families to this family (repeatable)")
    s.add_argument("--jobs", type=int, default=2, help="worker processes of --all-families (0: in this process)")
    s.add_argument("--validate-static", action="store_true",
                   help="measure the configs static mode ranks and report the Spearman correlation of predicted "
                        "and measured times (GPU: --device cuda; CPU: TRITON_INTERPRET=1, tiny shapes)")


class _Progress:
    """One updating line on a terminal, plain lines otherwise (stderr)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.tty = quiet, sys.stderr.isatty()

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        if self.tty:
            print("\r\033[K" + msg[:150], end="", file=sys.stderr, flush=True)
        else:
            print(msg, file=sys.stderr)

    def done(self) -> None:
        if self.tty and not self.quiet:
            print(file=sys.stderr)


def _linear_shapes(args: argparse.Namespace) -> list:
    from graphtune.codegen.linear.key import parse_linear_shape

    out = [parse_linear_shape(s) for s in args.linear_shape]
    if args.linears:
        from graphtune.models import load_named
        from graphtune.runtime.engine.linear import model_linear_problems

        model, _ = load_named(args.model)
        out += [s for s in model_linear_problems(model) if s not in out]
    return out


@subcommand("tune", "tune attention implementations/configs for shapes and store the winners", _tune_args)
def _tune(args: argparse.Namespace) -> int:
    from graphtune.autotune import parse_budget, parse_merge_shape, parse_shape, summary_table, tune_shapes, tune_static

    from graphtune.autotune.shapes import parse_lean_shape

    if args.accuracy:
        from graphtune.cli_tune_accuracy import run_accuracy

        return run_accuracy(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise OptionError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    shapes: list = [parse_shape(s) for s in args.shape] + [parse_merge_shape(s) for s in args.merge]
    shapes += [parse_lean_shape(s) for s in args.lean]
    shapes += _linear_shapes(args)
    if args.batch or args.seq or args.model_config:
        heads, kvh, dim = args.heads, args.kv_heads, args.head_dim
        if args.model_config:
            heads, kvh, dim = _model_dims(args.model_config)
        missing = [n for n, v in (("--batch", args.batch), ("--seq", args.seq), ("--heads", heads),
                                  ("--head-dim", dim)) if not v]
        if missing:
            raise OptionError(f"a workload description needs {', '.join(missing)}")
        shapes += [s for s in workload_shapes(args.batch, args.seq, heads, kvh or heads, dim, args.dtype)
                   if s not in shapes]
    if args.all_families or args.validate_static:
        from graphtune.autotune.sweep import cli_run

        return cli_run(args, shapes)
    if not shapes:
        raise OptionError("nothing to tune: give --shape B,H,KVH,L,S,D, --merge N,B,H,L,D, --lean LENGTHS,H,KVH,D, "
                          "--linear-shape M,N,K, --linears or a workload (--batch, --seq, --heads, --head-dim)")
    secs, cands = parse_budget(args.budget)
    db = None if args.no_store else True
    prog = _Progress(args.quiet)
    if args.target:
        results = tune_static(shapes, args.target, max_candidates=cands, budget_s=secs, db=db, progress=prog)
    else:
        from graphtune.autotune.workers import make_backend

        if args.workers is not None and args.workers < 1:
            raise OptionError(f"--workers must be a positive number of worker processes, got {args.workers}")
        with make_backend(args.workers, args.ray) as backend:
            results = tune_shapes(shapes, secs if secs is not None else 1e9, args.strategy, max_candidates=cands,
                                  device=args.device, db=db, progress=prog, backend=backend)
    prog.done()
    print(summary_table(results))
    return 0


# ======================================================================================
# graphtune db
# ======================================================================================

def _db_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="list records")
    ls.add_argument("--op")
    ls.add_argument("--impl")
    ls.add_argument("--limit", type=int, default=200, help="show the last N records (N >= 1; default 200)")
    sh = sub.add_parser("show", help="print one record as JSON")
    sh.add_argument("id", help="row id, record id or a unique prefix of one")
    ex = sub.add_parser("export", help="write every record as JSON")
    ex.add_argument("file", help="output file, '-' for stdout")
    im = sub.add_parser("import", help="import records exported by 'db export' (skips ones already present)")
    im.add_argument("file")
    pr = sub.add_parser("prune", help="delete stale (source changed), ill-typed and superseded records; never "
                                      "one a lookup would use")
    pr.add_argument("--dry-run", action="store_true")
    pr.add_argument("--stale-only", action="store_true", help="keep superseded records")
    sub.add_parser("stats", help="counts by op/mode/device, stale records, files moved aside")


@contextlib.contextmanager
def _open_db() -> Iterator:
    from graphtune.autotune.db import TuningDB
    from graphtune.autotune.tuner import load_impls

    load_impls()  # validity of records needs every implementation's current source hash
    db = TuningDB(flags.get("DB"))
    try:
        yield db
    finally:
        db.close()


def _fmt_us(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


@subcommand("db", "inspect and maintain the tuning database", _db_args)
def _db(args: argparse.Namespace) -> int:
    from graphtune.autotune.tuner import is_valid

    with _open_db() as db:
        for msg in db.reports:
            print(msg, file=sys.stderr)
        cmd = args.db_command
        if cmd == "list":
            where, params = [], []
            for col in ("op", "impl"):
                if getattr(args, col):
                    where.append(f"{col} = ?")
                    params.append(getattr(args, col))
            if args.limit < 1:
                raise OptionError(f"--limit must be a positive number of records, got {args.limit}")
            recs = db.records(" AND ".join(where) or None, params)[-args.limit:]
            rows = [("id", "record", "op", "impl", "shape_key", "q", "kv", "mode", "us", "default", "valid", "device")]
            for r in recs:
                rows.append((str(_rowid(db, r)),
                             r.record_id[:10], r.op, r.impl, r.shape_key, str(r.q_bucket), str(r.kv_bucket), r.mode,
                             _fmt_us(r.median_us), _fmt_us(r.default_us), "yes" if is_valid(r) else "STALE",
                             r.device[:40]))
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            for row in rows:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            print(f"{len(recs)} record(s)")
            return 0
        if cmd == "show":
            rec = db.get(args.id)
            if rec is None:
                print(f"graphtune: no record {args.id!r}", file=sys.stderr)
                return 1
            print(json.dumps({**rec.to_json(), "valid": is_valid(rec)}, indent=2, sort_keys=True))
            return 0
        if cmd == "export":
            text = json.dumps(db.export(), indent=1, sort_keys=True)
            if args.file == "-":
                print(text)
            else:
                try:
                    with open(args.file, "w") as f:
                        f.write(text + "\n")
                except OSError as e:
                    raise OptionError(f"cannot write records to {args.file}: {e}") from None
                print(f"exported {db.count()} record(s) to {args.file}", file=sys.stderr)
            return 0
        if cmd == "import":
            try:
                with open(args.file) as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise OptionError(f"cannot read records from {args.file}: {e}") from None
            report = db.import_records(data)
            if report.rejected and not report.added and not report.duplicates:
                raise OptionError(f"no record of {args.file} could be imported: {report.rejected_summary()}")
            print(f"imported {report.added} new record(s) of {report.total} from {args.file}"
                  + (f" ({report.duplicates} already present)" if report.duplicates else ""))
            if report.rejected:
                n_bad = sum(len(v) for v in report.rejected.values())
                print(f"graphtune: rejected {n_bad} record(s): {report.rejected_summary()}", file=sys.stderr)
                return 1
            return 0
        if cmd == "prune":
            # stale and ill-typed records are ignored by lookups; superseded() keeps what lookups pick
            doomed = {r.record_id: ("stale", r) for r in db.stale(is_valid)}
            if not args.stale_only:
                for r in db.superseded(is_valid):
                    doomed.setdefault(r.record_id, ("superseded", r))
            verb = "would delete" if args.dry_run else "delete"
            for why, r in doomed.values():
                print(f"{verb} {r.record_id[:10]} {why}: {r.op} {r.impl} {r.shape_key} q{r.q_bucket} kv{r.kv_bucket} {r.mode}")
            for rid, reason in db.invalid():
                doomed[rid] = ("invalid", None)
                print(f"{verb} {rid[:10]} invalid: {reason}")
            if not args.dry_run:
                db.delete(doomed)
            print(f"{len(doomed)} record(s) {'to delete' if args.dry_run else 'deleted'}, "
                  f"{db.count()} in the database")
            return 0
        if cmd == "stats":
            return _stats(db)
    raise OptionError(f"unknown db action {args.db_command!r}")


def _rowid(db, rec) -> int:
    row = db._conn.execute("SELECT id FROM records WHERE record_id = ?", (rec.record_id,)).fetchone()
    return row[0] if row else -1


def _stats(db) -> int:
    from graphtune.autotune import fingerprint
    from graphtune.autotune.tuner import is_valid

    recs = db.records()
    here = fingerprint.current("cpu")
    by: dict[str, int] = {}
    for r in recs:
        k = f"{r.op} / {r.mode}"
        by[k] = by.get(k, 0) + 1
    stale = [r for r in recs if not is_valid(r)]
    print(f"database: {db.path} (journal mode {db.journal_mode})")
    print(f"records: {len(recs)}")
    for k, n in sorted(by.items()):
        print(f"  {k}: {n}")
    print(f"this CPU ({here.device}, {here.versions}): "
          f"{sum(1 for r in recs if r.device == here.device and r.versions == here.versions)}")
    others = sorted({(r.device, r.versions) for r in recs} - {(here.device, here.versions)})
    for dev, ver in others:
        print(f"  other device/versions: {dev} {ver}: {sum(1 for r in recs if (r.device, r.versions) == (dev, ver))}")
    print(f"stale (implementation gone or its source changed; ignored by lookups): {len(stale)}")
    for r in stale:
        print(f"  {r.record_id[:10]} {r.op} {r.impl} source {r.source_hash} {r.shape_key}")
    bad = db.invalid()
    print(f"invalid (ill-typed, ignored by lookups): {len(bad)}")
    for rid, reason in bad:
        print(f"  {rid[:10]} {reason}")
    print(f"superseded (never picked; removed by 'db prune'): {len(db.superseded(is_valid))}")
    aside = sorted(glob.glob(glob.escape(db.path) + ".corrupt-*") + glob.glob(glob.escape(db.path) + ".foreign-*"))
    aside = [a for a in aside if not a.endswith(("-wal", "-shm"))]
    print(f"files moved aside: {len(aside)}")
    for a in aside:
        print(f"  {a}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
