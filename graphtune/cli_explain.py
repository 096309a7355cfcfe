"""``graphtune explain``: what graphtune does to a model (the built-in demo model by default)."""
from __future__ import annotations

import argparse
import json

import torch

from graphtune.cli import subcommand


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="'demo' (default) or a family from graphtune.models.FAMILIES")
    p.add_argument("--attn-implementation", default=None, help="HF attention implementation (eager, sdpa)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@subcommand("explain", "list every attention site of a model: module, matched form, implementation", _args)
def _explain(args: argparse.Namespace) -> int:
    import graphtune
    from graphtune.models import build_model, demo_model

    if args.model == "demo":
        model = demo_model(**({"attn_implementation": args.attn_implementation} if args.attn_implementation else {}))
    else:
        model = build_model(args.model, args.attn_implementation or "eager")
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq))
    report = graphtune.explain(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report)
    return 0
