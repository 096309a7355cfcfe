"""``graphtune tune --accuracy``: the command-line front of :mod:`graphtune.runtime.sparse_tune` (no subcommand of its own)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from graphtune import flags
from graphtune.errors import OptionError

__all__ = ["run_accuracy"]


def _ints(name: str, text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise OptionError(f"{name} {text!r}: want integers separated by commas, e.g. 64,128") from None


def run_accuracy(args: argparse.Namespace) -> int:
    """Tune sparse prefill for ``args.model``; print the candidate table; store the winner unless ``--no-store``."""
    from graphtune.models import load_named
    from graphtune.codegen.pbs_attention.plan import PBSConfig
    from graphtune.runtime.sparse_accuracy import calibration_ids
    from graphtune.runtime.sparse_tune import store, tune_accuracy

    if args.length < 512:
        raise OptionError(f"--length must be >= 512 calibration tokens, got {args.length}")
    positions = getattr(args, "positions", None)
    if positions is not None and not 1 <= positions <= args.length:
        raise OptionError(f"--positions must be in [1, --length={args.length}], got {positions}")
    blocks = _ints("--block", args.block) or [flags.get("SPARSE_PREFILL_BLOCK")]
    segments = _ints("--segment", args.segment) or [flags.get("SPARSE_PREFILL_SEGMENT")]
    tau = args.tau if args.tau is not None else flags.get("SPARSE_PREFILL_TAU")
    samples = _ints("--sample", args.sample) or [flags.get("SPARSE_PREFILL_SAMPLE")]
    peaks = _ints("--peaks", args.peaks) or [flags.get("SPARSE_PREFILL_PEAKS")]
    cfgs = [PBSConfig(b, s, tau, not args.no_permute, sample=r, peaks=k) for b in blocks for s in segments
            for r in samples for k in peaks if s % b == 0]
    if not cfgs:
        raise OptionError(f"--block {args.block} / --segment {args.segment}: no segment is a multiple of a block")
    text = None
    if getattr(args, "text", None):  # read before the model loads: a wrong path fails at once
        try:
            with open(args.text, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError(f"--text {args.text}: cannot read it as UTF-8 text ({e})") from None
    model, tok = load_named(args.model)
    if text is not None and tok is None:
        raise OptionError(f"--text {args.text}: model {args.model!r} has no tokenizer (random weights); "
                          "calibrate a model that has one")
    if tok is None:  # random-weight models: random token ids of their vocabulary
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.length,), generator=g)
        source = "random token ids"
    else:
        ids = calibration_ids(tok, args.length, text=text)
        source = f"text file {os.path.abspath(args.text)}" if text is not None else None
    say = (lambda s: None) if args.quiet else (lambda s: print(f"[tune --accuracy] {s}", file=sys.stderr))
    results = []
    for cfg in cfgs:  # one search per (block, segment, sample); the sparsest winner is kept
        say(f"PBS {cfg}")
        results.append(tune_accuracy(model, tok, length=args.length, min_top1=args.min_top1, config=cfg,
                                     max_runs=args.max_runs, progress=say, ids=ids, keep=positions,
                                     calibration=source))
    met = [r for r in results if r.best is not None]
    res = min(met, key=lambda r: r.best.density) if met else results[0]
    if len(results) > 1:
        for r in results:
            c = r.best
            print(f"PBS {r.candidates[0].config}: "
                  + (f"{c.name}, density {c.density:.3f}, top-1 {c.top1:.4f}" if c else "nothing met the bound"))
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
