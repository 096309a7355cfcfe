"""Tree attention on this CPU vs a per-row masked SDPA loop (the naive baseline) and the reference.

Run the full grid (prints a markdown table, as in ``docs/ops/tree_attention.md``)::

    .venv/bin/python benchmarks/bench_tree_attention.py [--threads 1]

or the short pytest version: ``.venv/bin/python -m pytest -q benchmarks/bench_tree_attention.py -s``.

SmolLM2's attention shape: Hq = 9, Hkv = 3, D = 64, fp32. ``B`` rows, each with ``ctx`` context keys
and an ``n``-token draft (a chain, or a random tree), evenly spaced in one pool (a slot-per-row
engine layout: the CPU path's batched groups apply). Every case times its contenders interleaved
in the same run (rounds alternate, so load from other processes hits all alike) and reports
medians; the plan is built once outside the timing, as the engine does once per step.

Contenders:

* ``naive``: per row, ``F.scaled_dot_product_attention`` over the row's ``ctx + n`` keys with the
  bool tree mask and ``enable_gqa`` (no LSE: strictly less than the op returns);
* ``ref``: :func:`~graphtune.codegen.tree_attention.reference.tree_attention_ref`;
* ``cpu.B0`` .. ``cpu.B3``: ``cpu.tree_attention`` with ``BATCH`` = 0 .. 3 (B1 is the default).
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from bench_lean_decode import _interleaved as interleaved_ms

from graphtune.codegen.registry import KernelConfig
from graphtune.codegen.tree_attention.cpu import BATCH_MODES, tree_attention_cpu
from graphtune.codegen.tree_attention.key import TreeShape
from graphtune.codegen.tree_attention.plan import plan_tree
from graphtune.codegen.tree_attention.reference import row_visibility, tree_attention_ref

HQ, HKV, D = 9, 3, 64


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Median microseconds of each function, rounds alternating between them (lean decode's timer)."""
    return {k: v * 1e3 for k, v in interleaved_ms(fns, rounds).items()}


def contenders(batch: int, ctx: int, n: int, tree: str, with_ref: bool = True) -> dict[str, Callable[[], object]]:
    q, k, v, kv_start, ctx_len, cu_q, parent, _ = TreeShape(batch, HQ, HKV, D, ctx, n, tree).make_args(0)
    plan = plan_tree(kv_start, ctx_len, cu_q, parent)
    starts, cu, par = plan.kv_start, plan.cu_q, plan.parent
    masks = [row_visibility(ctx, list(par[cu[i]:cu[i + 1]])) for i in range(batch)]

    def naive() -> None:
        for i in range(batch):
            s, a, b = starts[i], cu[i], cu[i + 1]
            F.scaled_dot_product_attention(q[None, :, a:b], k[None, :, s:s + ctx + n], v[None, :, s:s + ctx + n],
                                           attn_mask=masks[i], enable_gqa=True)

    fns: dict[str, Callable[[], object]] = {"naive": naive}
    if with_ref:
        fns["ref"] = lambda: tree_attention_ref(q, k, v, kv_start, ctx_len, cu_q, parent)
    for b in BATCH_MODES:
        cfg = KernelConfig.make(BATCH=b)
        fns[f"cpu.B{b}"] = (lambda cfg=cfg: tree_attention_cpu(q, k, v, kv_start, ctx_len, cu_q, parent, plan=plan,
                                                               config=cfg))
    return fns


def plan_cost_us(batch: int, n: int, tree: str) -> float:
    """Median microseconds of ``plan_tree`` (once per step) for ``batch`` rows of ``n`` tokens."""
    _, _, _, s, c, cu, p, _ = TreeShape(batch, HQ, HKV, D, 64, n, tree).make_args(0)
    return _interleaved({"plan": lambda: plan_tree(s, c, cu, p)}, rounds=9)["plan"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--ctx", default="256,1024,2048")
    ap.add_argument("--n", default="1,4,8,16")
    ap.add_argument("--trees", default="chain,tree")
    ap.add_argument("--no-ref", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); Hq={HQ} Hkv={HKV} D={D} fp32; "
          f"medians in us (ratio = naive / contender)")
    names = ["naive"] + ([] if a.no_ref else ["ref"]) + [f"cpu.B{b}" for b in BATCH_MODES]
    print("| tree | B | ctx | n | " + " | ".join(names) + " | naive / cpu.B1 | naive / best cpu |")
    print("|---|---|---|---|" + "---|" * (len(names) + 2))
    for tree in a.trees.split(","):
        for B in (int(x) for x in a.batches.split(",")):
            for ctx in (int(x) for x in a.ctx.split(",")):
                for n in (int(x) for x in a.n.split(",")):
                    med = _interleaved(contenders(B, ctx, n, tree, not a.no_ref), a.rounds)
                    best = min(med[f"cpu.B{b}"] for b in BATCH_MODES)
                    print(f"| {tree} | {B} | {ctx} | {n} | " + " | ".join(f"{med[k]:.0f}" for k in names)
                          + f" | {med['naive'] / med['cpu.B1']:.2f} | {med['naive'] / best:.2f} |", flush=True)
    for B, n in ((16, 16), (16, 4), (1, 16)):
        print(f"plan_tree B={B} n={n} tree: {plan_cost_us(B, n, 'tree'):.0f} us")


def test_tree_attention_cpu_vs_naive_masked_sdpa():
    """Short version: one mid-size case per tree kind; the default must not lose to the naive loop by much."""
    torch.set_num_threads(1)
    for tree in ("chain", "tree"):
        med = _interleaved(contenders(8, 1024, 4, tree, with_ref=False), rounds=5)
        print(f"\n[tree_attention {tree} B=8 ctx=1024 n=4] medians (us): "
              + ", ".join(f"{k} {v:.0f}" for k, v in med.items())
              + f"; naive / cpu.B1 = {med['naive'] / med['cpu.B1']:.2f}x")
        assert med["cpu.B1"] < 1.5 * med["naive"]


if __name__ == "__main__":
    main()
