"""``graphtune tune --accuracy``: the command-line front of :mod:`graphtune.runtime.sparse_tune` (no subcommand of its own)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from graphtune import flags
from graphtune.errors import OptionError

__all__ = ["run_accuracy"]


def run_accuracy(args: argparse.Namespace) -> int:
    """Tune sparse prefill for ``args.model``; print the candidate table; store the winner unless ``--no-store``."""
    from graphtune.models import load_named
    from graphtune.codegen.pbs_attention.plan import PBSConfig
    from graphtune.runtime.sparse_accuracy import calibration_ids
    from graphtune.runtime.sparse_tune import store, tune_accuracy

    if args.length < 512:
        raise OptionError(f"--length must be >= 512 calibration tokens, got {args.length}")
    cfg = PBSConfig(args.block or flags.get("SPARSE_PREFILL_BLOCK"), args.segment or flags.get("SPARSE_PREFILL_SEGMENT"),
                    args.tau if args.tau is not None else flags.get("SPARSE_PREFILL_TAU"))
    if args.no_permute:
        cfg = replace(cfg, permute=False)
    model, tok = load_named(args.model)
    if tok is None:  # random-weight models: random token ids of their vocabulary
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.length,), generator=g)
    else:
        ids = calibration_ids(tok, args.length)
    say = (lambda s: None) if args.quiet else (lambda s: print(f"[tune --accuracy] {s}", file=sys.stderr))
    res = tune_accuracy(model, tok, length=args.length, min_top1=args.min_top1, config=cfg, max_runs=args.max_runs,
                        progress=say, ids=ids, keep=min(512, args.length // 4))
    print(res.table())
    if res.best is None:
        print(f"no layer can run sparse with top-1 >= {args.min_top1} (searched {len(res.candidates)} settings); nothing stored "
              f"({res.seconds:.0f} s)")
        return 1
    if args.no_store:
        print(f"chosen: {res.best.name} ({res.seconds:.0f} s); not stored (--no-store)")
        return 0
    rec = store(res)
    print(f"chosen: {res.best.name}, density {res.best.density:.3f}, top-1 {res.best.top1:.4f}; stored as record "
          f"{rec.record_id if rec else '-'} for model {res.model} ({res.seconds:.0f} s). "
          "Engine(model, sparse_prefill='pbs') / optimize(model, sparse_prefill='pbs') use it.")
    return 0
