"""One forward of the engine: planned once on the host, run by every layer's attention.

The forward packs the tokens it computes into one sequence (``T`` tokens: all rows' decode
tokens, or spans of prefix-tree nodes being prefilled). Each layer's attention then

1. writes the ``T`` new keys/values into their reserved slots (``index_copy_``: the only copy),
2. computes a few attention *calls*, each over one contiguous slot range read as a view:

   - ``fold``: the queries of every token below a shared node over that node's keys (the
     shared-prefix decomposition: one product for all sharing rows; GQA heads folded into
     the query axis so each KV head is read once);
   - ``causal``: a node's new span over itself (prefill);
   - ``strided``: every row's private tail when they have equal lengths and were reserved
     back to back (n samples): one batched call over a strided view;
   - ``lean``: private tails of ragged lengths: stream-K lean decode over the real lengths
     (:mod:`graphtune.codegen.lean_decode`), no padding computed;
   - ``tree``: speculative verification: each row's private keys plus the draft tokens on the
     query's own path in the row's draft tree (:mod:`graphtune.codegen.tree_attention`);
   - ``pbs``: opt-in sparse prefill (``Engine(sparse_prefill=...)``): a long node span over the
     node's keys so far, permuted block-sparse (:mod:`graphtune.runtime.sparse_prefill`;
     approximate, replaces that span's ``fold`` + ``causal`` pair);

3. merges each token's partial results by log-sum-exp (:func:`graphtune.ir.reference.merge_stacked`).

Exact (except ``pbs`` calls): every token attends to exactly the keys of its row's prefix (its chain of nodes) and,
within its own span, causally; only the order of floating-point reductions differs from dense
attention over the concatenated KV.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from graphtune.codegen.lean_decode.cpu import build_cpu_program, lean_attention_cpu
from graphtune.codegen.lean_decode.plan import make_plan
from graphtune.codegen.tree_attention.op import plan_tree, tree_attention
from graphtune.ir.args import softmax_scale
from graphtune.ir.ops import flash_cpu
from graphtune.ir.reference import merge_lse
from graphtune.runtime.engine.kv_pool import KVPool
from graphtune.runtime.engine.prefix_tree import Node
from graphtune.runtime.sparse_prefill import SparsePrefill, run_sparse

__all__ = ["Call", "StepPlan", "prefill_plan", "decode_plan", "verify_plan", "run_attention"]

LEAN_TILE = 256  # keys per lean tile (the lean family's CPU default)


@dataclass
class Call:
    """One attention call of a layer (see the module docstring for the kinds)."""

    kind: str  # "fold" | "causal" | "strided" | "lean" | "tree" | "pbs"
    level: int  # where its partial goes in the per-token stack
    idx: Tensor | None = None  # packed query tokens (fold, strided, lean)
    q0: int = 0  # causal: packed span [q0, q1)
    q1: int = 0
    slot: int = 0  # first key slot (fold, causal, strided: first row's)
    length: int = 0  # keys (fold, causal, strided)
    stride: int = 0  # strided: slots between consecutive rows' ranges
    lean: object = None  # lean: (plan, program, starts); tree: the tree-attention plan; pbs: SparsePrefill


@dataclass
class StepPlan:
    """Everything a layer needs for this forward; built once, read by every layer."""

    tokens: int
    write_slots: Tensor  # [T] slot of each packed token's K/V
    calls: list[Call]
    levels: int  # partials per token, stacked (1: no merge)
    kv_read: int = 0  # key slots read per layer (observability)
    describe: list[str] = field(default_factory=list)


def _depth(n: Node) -> int:
    return len(n.chain()) - 1


def _group_ancestors(nodes_tokens: Sequence[tuple[Node, Tensor]]) -> list[Call]:
    # one fold call per shared ancestor, over the tokens of every span below it
    below: dict[int, tuple[Node, list[Tensor]]] = {}
    for node, toks in nodes_tokens:
        for a in node.chain()[:-1]:
            below.setdefault(id(a), (a, []))[1].append(toks)
    calls = []
    for a, parts in below.values():
        idx = torch.cat(parts) if len(parts) > 1 else parts[0]
        calls.append(Call("fold", _depth(a), idx=idx, slot=a.slot, length=len(a.tokens)))
    return calls


def prefill_plan(spans: Sequence[tuple[Node, int, int]], sparse: SparsePrefill | None = None) -> StepPlan:
    """Plan a forward computing ``spans``: ``(node, offset, count)`` token spans of nodes, packed in order.

    A span's ancestors must be resident and complete by the end of this forward's writes (the
    engine orders spans parents first). With ``sparse`` (opt-in), a span whose node holds at least
    ``sparse.min_len`` keys by its end runs one ``pbs`` call over them instead of fold + causal.
    """
    calls: list[Call] = []
    writes, per_span = [], []
    t = 0
    levels = 1
    for node, off, m in spans:
        toks = torch.arange(t, t + m)
        writes.append(torch.arange(node.slot + off, node.slot + off + m))
        per_span.append((node, toks))
        d = _depth(node)
        if sparse is not None and sparse.applies(off + m, m):
            levels = max(levels, d + 1)
            calls.append(Call("pbs", -1, q0=t, q1=t + m, slot=node.slot, length=off + m, lean=sparse))
            t += m
            continue
        top = d + (1 if off else 0)  # own causal partial goes on the last level
        levels = max(levels, top + 1)
        if off:
            calls.append(Call("fold", d, idx=toks, slot=node.slot, length=off))
        calls.append(Call("causal", -1, q0=t, q1=t + m, slot=node.slot + off, length=m))
        t += m
    calls += _group_ancestors(per_span)
    for c in calls:
        if c.kind in ("causal", "pbs"):
            c.level = levels - 1
    plan = StepPlan(t, torch.cat(writes), calls, levels)
    plan.kv_read = sum(c.length for c in calls)
    return plan


def decode_plan(leaves: Sequence[Node], kv_heads: int, workers: int) -> StepPlan:
    """Plan a decode step: one new token per row, appended to its leaf (``leaf.filled`` not yet counted)."""
    T = len(leaves)
    write = torch.tensor([leaf.slot + leaf.filled for leaf in leaves], dtype=torch.long)
    toks = torch.arange(T)
    calls = _group_ancestors([(leaf, toks[i:i + 1]) for i, leaf in enumerate(leaves)])
    levels = 1 + max((_depth(leaf) for leaf in leaves), default=0)
    lengths = [leaf.filled + 1 for leaf in leaves]
    slots = [leaf.slot for leaf in leaves]
    stride = slots[1] - slots[0] if T > 1 else 0
    if len(set(lengths)) == 1 and all(slots[i] == slots[0] + i * stride for i in range(T)) and (T == 1 or stride > 0):
        calls.append(Call("strided", levels - 1, idx=toks, slot=slots[0], length=lengths[0], stride=stride))
    else:  # ragged: lean decode over the real lengths, planned once for all layers
        lp = make_plan(lengths, kv_heads, LEAN_TILE, max(1, min(workers, T * kv_heads)))
        calls.append(Call("lean", levels - 1, idx=toks, lean=(lp, build_cpu_program(lp, slots), tuple(slots))))
    plan = StepPlan(T, write, calls, levels)
    plan.kv_read = sum(c.length for c in calls if c.kind != "lean") + sum(lengths)
    return plan


def verify_plan(leaves: Sequence[Node], parents: Sequence[Sequence[int]]) -> StepPlan:
    """Plan a speculative verification forward: row ``i`` computes ``len(parents[i])`` tokens, its
    last accepted token (row-local 0, a root: parent ``-1``) then its draft tokens (parent indices
    row-local, each before its children), written after the row's ``leaf.filled`` keys.

    Every token attends to the row's shared ancestors (``fold``), the row's private keys, and the
    draft tokens on its own root-to-token path (``tree``: :mod:`graphtune.codegen.tree_attention`).
    """
    counts = [len(p) for p in parents]
    T = sum(counts)
    write = torch.cat([torch.arange(leaf.slot + leaf.filled, leaf.slot + leaf.filled + n)
                       for leaf, n in zip(leaves, counts)])
    cu = [0]
    for n in counts:
        cu.append(cu[-1] + n)
    toks = torch.arange(T)
    calls = _group_ancestors([(leaf, toks[cu[i]:cu[i + 1]]) for i, leaf in enumerate(leaves)])
    levels = 1 + max((_depth(leaf) for leaf in leaves), default=0)
    tree = plan_tree(torch.tensor([leaf.slot for leaf in leaves], dtype=torch.long),
                     torch.tensor([leaf.filled for leaf in leaves], dtype=torch.long),
                     torch.tensor(cu, dtype=torch.long),
                     torch.tensor([p for ps in parents for p in ps], dtype=torch.long))
    calls.append(Call("tree", levels - 1, lean=tree))
    plan = StepPlan(T, write, calls, levels)
    plan.kv_read = sum(c.length for c in calls if c.kind == "fold") + sum(
        leaf.filled + n for leaf, n in zip(leaves, counts))
    return plan


def _fold_q(q0: Tensor, idx: Tensor, hkv: int) -> tuple[Tensor, int]:
    # q0: [Hq, T, D] -> the tokens idx as [1, Hkv, G * n, D] (GQA group heads along the queries)
    qi = q0.index_select(1, idx)
    hq, n, d = qi.shape
    return qi.view(1, hkv, (hq // hkv) * n, d), n


def run_attention(plan: StepPlan, pool: KVPool, layer: int, q: Tensor, k: Tensor, v: Tensor,
                  scale: float | None) -> Tensor:
    """The attention of one layer for a planned forward.

    q: [1, Hq, T, D] (after RoPE), k, v: [1, Hkv, T, D] (the new tokens'); returns [1, T, Hq, D].
    """
    K, V = pool.keys(layer), pool.values(layer)  # [Hkv, slots, D] views
    K.index_copy_(1, plan.write_slots, k[0])
    V.index_copy_(1, plan.write_slots, v[0])
    q0 = q[0]
    hq, T, d = q0.shape
    hkv = K.shape[0]
    scale = softmax_scale(scale, d)
    P = plan.levels
    if P == 1:
        out = q0.new_empty((hq, T, d))
    else:
        out_st = q0.new_zeros((P, hq, T, d))
        lse_st = torch.full((P, hq, T), float("-inf"), dtype=torch.float32)
    for c in plan.calls:
        if c.kind == "fold":
            qf, n = _fold_q(q0, c.idx, hkv)
            o, l = flash_cpu(qf, K[None, :, c.slot:c.slot + c.length], V[None, :, c.slot:c.slot + c.length],
                             None, False, scale)
            o, l = o.reshape(hq, n, d), l.reshape(hq, n)
        elif c.kind == "causal":
            o, l = flash_cpu(q[:, :, c.q0:c.q1], K[None, :, c.slot:c.slot + c.length],
                             V[None, :, c.slot:c.slot + c.length], None, True, scale)
            o, l = o[0], l[0]
        elif c.kind == "pbs":  # the span's queries at the end of the node's keys so far
            o, l = run_sparse(c.lean, layer, q[:, :, c.q0:c.q1], K[None, :, c.slot:c.slot + c.length],
                              V[None, :, c.slot:c.slot + c.length], scale)
            o, l = o[0], l[0]
        elif c.kind == "strided":
            n = c.idx.numel()
            size = (n, hkv, c.length, d)
            st = (c.stride * K.stride(1), K.stride(0), K.stride(1), 1)
            ks = K.as_strided(size, st, K.storage_offset() + c.slot * K.stride(1))
            vs = V.as_strided(size, st, V.storage_offset() + c.slot * V.stride(1))
            qs = q0.index_select(1, c.idx).view(hkv, hq // hkv, n, d).permute(2, 0, 1, 3)  # [n, Hkv, G, D]
            o, l = flash_cpu(qs, ks, vs, None, False, scale)  # [n, Hkv, G, D], [n, Hkv, G]
            o, l = o.reshape(n, hq, d).transpose(0, 1), l.reshape(n, hq).transpose(0, 1)
        elif c.kind == "tree":  # every packed token: private keys + its draft path
            tp = c.lean
            o, l = tree_attention(q0, K, V, tp.kv_start, tp.ctx_len, tp.cu_q, tp.parent, scale, plan=tp)
        else:  # lean
            lp, program, starts = c.lean
            n = len(starts)
            qs = q0.index_select(1, c.idx).permute(1, 0, 2).unsqueeze(2)  # [n, Hq, 1, D]
            kk = K.unsqueeze(0).expand(n, -1, -1, -1)
            vv = V.unsqueeze(0).expand(n, -1, -1, -1)
            o, l = lean_attention_cpu(qs, kk, vv, lp, starts, scale=scale, program=program)
            o, l = o[:, :, 0].transpose(0, 1), l[:, :, 0].transpose(0, 1)
        if P == 1:
            if c.kind in ("causal", "pbs"):
                out[:, c.q0:c.q1] = o
            elif c.kind == "tree":
                out = o
            else:
                out.index_copy_(1, c.idx, o)
        else:
            if c.kind == "tree":
                out_st[c.level] = o
                lse_st[c.level] = l
            elif c.kind in ("causal", "pbs"):
                out_st[c.level, :, c.q0:c.q1] = o
                lse_st[c.level, :, c.q0:c.q1] = l
            else:
                out_st[c.level].index_copy_(1, c.idx, o)
                lse_st[c.level].index_copy_(1, c.idx, l)
    if P > 1:
        out = _merge_levels(out_st, lse_st)
    return out.transpose(0, 1).unsqueeze(0)


def _merge_levels(out_st: Tensor, lse_st: Tensor) -> Tensor:
    # out_st: [P, Hq, T, D], lse_st: [P, Hq, T] (-inf: no partial at that level) -> [Hq, T, D]
    return merge_lse(out_st, lse_st, 0)[0].to(out_st.dtype)
