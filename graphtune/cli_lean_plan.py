"""``graphtune lean-plan``: the lean (stream-K) decode plan of a ragged batch and a static GPU view.

Prints, for given KV lengths, the per-SM load of the lean schedule against fixed-split
FlashDecoding on H100/A100 (:func:`graphtune.codegen.lean_decode.plan.static_gpu_view`), and
optionally the CPU plan. Registers itself as a subcommand of :mod:`graphtune.cli`.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from graphtune.cli import subcommand
from graphtune.codegen.lean_decode.plan import default_tile, format_static_view, make_plan, parse_lengths, static_gpu_view
from graphtune.errors import PlanError

__all__ = ["lean_plan_main", "add_lean_plan_args", "run_lean_plan"]

_GPUS = {"H100": 132, "A100": 108}


def add_lean_plan_args(ap: argparse.ArgumentParser) -> None:
    """Arguments of ``graphtune lean-plan`` (shared by the CLI and :func:`lean_plan_main`)."""
    ap.add_argument("--lengths", default="131072,1024x31", help="KV lengths, e.g. 131072,1024x31")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tile", type=int, default=0, help="keys per tile (0: by head dim)")
    ap.add_argument("--gpus", default="H100,A100", help=f"names from {sorted(_GPUS)} or NAME=SMS")
    ap.add_argument("--splits", default="0,16", help="fixed FlashDecoding split counts to compare (0: FA2 heuristic)")
    ap.add_argument("--workers", type=int, default=0, help="also print the CPU plan for this many workers")


def run_lean_plan(args: argparse.Namespace) -> int:
    """Print the static GPU view (and optionally a CPU plan) for parsed ``lean-plan`` arguments."""
    try:
        lengths = parse_lengths(args.lengths)
        tile = args.tile or default_tile(args.head_dim)
        rows = []
        for g in args.gpus.split(","):
            name, _, sms = g.partition("=")
            if not sms and name not in _GPUS:
                raise PlanError(f"lean plan: unknown GPU {name!r}; use one of {sorted(_GPUS)} or NAME=SMS")
            splits = [int(x) or None for x in args.splits.split(",") if x]
            v = static_gpu_view(lengths, args.kv_heads, int(sms) if sms else _GPUS[name], tile, splits)
            v["name"] = name
            rows.append(v)
    except (PlanError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(f"batch: {len(lengths)} sequences, {sum(lengths)} keys (max {max(lengths)}), "
          f"{args.kv_heads} kv heads, tile {tile} keys")
    print(format_static_view(rows))
    if args.workers:
        print(make_plan(lengths, args.kv_heads, tile, args.workers).summary())
    return 0


def lean_plan_main(argv: Sequence[str] | None = None) -> int:
    """``graphtune lean-plan``: print the lean plan of a ragged batch and the static GPU view.

    >>> lean_plan_main(["--lengths", "4096,512x3", "--kv-heads", "2", "--gpus", "H100"])  # doctest: +ELLIPSIS
    batch: 4 sequences, 5632 keys (max 4096), 2 kv heads, tile 128 keys
    ...
    0
    """
    ap = argparse.ArgumentParser(prog="graphtune lean-plan", description=lean_plan_main.__doc__)
    add_lean_plan_args(ap)
    return run_lean_plan(ap.parse_args(argv))


@subcommand("lean-plan", "lean (stream-K) decode plan of a ragged batch; static H100/A100 view vs FlashDecoding",
            add_lean_plan_args)
def _lean_plan(args: argparse.Namespace) -> int:
    return run_lean_plan(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(lean_plan_main())
