"""CPU implementation of PBS attention: ATen's flash kernel over gathered blocks, merged by log-sum-exp.

Two parts, each on :func:`graphtune.ir.ops.flash_cpu` (ATen's CPU flash kernel, which returns the LSE):

* **diagonal**: every query's own segment, causally, in original key order. Query segments are
  stacked along the batch axis, so the whole diagonal part of a call is one kernel call
  (``[B * segments, Hq, S, D]`` over ``[B * segments, Hkv, S, D]``; GQA by the kernel, no K/V
  copy). A first query segment cut by a chunk boundary gets its own small masked call.
* **off-diagonal**: every (batch, query head, query block) item attends its selected blocks of the
  permuted K/V (whole 128-key blocks copied with one ``index_select``: the selected keys only, no
  K/V repeated per query head), without a causal mask. A query segment's blocks with one shared
  selection (``select_per="segment"``, the default) are one item of ``S`` rows. Items are grouped
  by size and number of selected blocks: one flash call per group, each item its own batch
  entry, so no item pays for another head's wider selection.

The two partials merge exactly by LSE. Knob: ``BUCKET`` (round block counts up to a multiple:
fewer calls, more ``-inf``-masked padding). The block and
segment sizes are the plan's (:class:`~.plan.PBSConfig`); they are tuned by accuracy
(``graphtune tune --accuracy``), not by this implementation's config.

Measured on this CPU: ``docs/ops/sparse-prefill.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from graphtune.codegen.pbs_attention.plan import (DEFAULT_CONFIG, PBSConfig, PBSPlan, check_qkv, permute_rows, plan_pbs,
                                                  tensor_signature)
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.codegen.scratch import scratch
from graphtune.errors import PlanError
from graphtune.ir.args import softmax_scale
from graphtune.ir.ops import flash_cpu

__all__ = ["pbs_attention_cpu", "diagonal_attention", "CPU_DEFAULT_CONFIG", "CPU_CONFIGS"]

CPU_DEFAULT_CONFIG = KernelConfig.make(BUCKET=1)
CPU_CONFIGS = [KernelConfig.make(BUCKET=n) for n in (1, 2, 4, 8)]
DIAG_PIECE = 64  # query rows per diagonal piece (measured best of 32/64/128/256 at S=256 on this CPU)


def diagonal_attention(q: Tensor, k: Tensor, v: Tensor, segment: int, scale: float) -> tuple[Tensor, Tensor]:
    """Each query over its own segment's keys up to itself: ``(out [B, Hq, M, D], lse [B, Hq, M])``.

    q: [B, Hq, M, D] at positions ``N - M ..``, k/v: [B, Hkv, N, D].
    """
    B, Hq, M, D = q.shape
    N = k.shape[2]
    S = segment
    off = N - M
    out = q.new_empty(B, Hq, M, D)
    lse = q.new_empty(B, Hq, M, dtype=torch.float32)
    first = min(-(-off // S) * S, N)  # first segment start at or after the first query
    if first > off:  # queries [off, first) sit at the end of a segment that starts before them
        s0 = (off // S) * S
        qp = torch.arange(off, first)[:, None]
        mask = torch.zeros(first - off, first - s0).masked_fill_(torch.arange(s0, first)[None, :] > qp, float("-inf"))
        o, l = flash_cpu(q[:, :, : first - off], k[:, :, s0:first], v[:, :, s0:first], mask.to(q.dtype), False, scale)
        out[:, :, : first - off], lse[:, :, : first - off] = o, l
    full = (N - first) // S  # whole segments of queries
    if full:
        a = first - off  # q row of the first whole segment

        def seg(x: Tensor, start: int) -> Tensor:
            # every whole segment (the first at row `start` of x) on the batch axis: [B*full, H, S, D]
            h = x.shape[1]
            return x[:, :, start:start + full * S].reshape(B, h, full, S, D).transpose(1, 2).reshape(B * full, h, S, D)

        # the segment's queries in pieces of P rows, piece t over the segment's first (t+1)*P keys
        # (bottom-right causal): ATen's kernel skips no masked key tile of a 256-key segment, so one
        # causal call computes S*S scores; pieces compute S*(S+P)/2 (1.58x faster at S=256, P=64).
        # Segments are stacked once; pieces are strided views of them (the kernel reads strides)
        qs, ks, vs = seg(q, a), seg(k, first), seg(v, first)
        P = DIAG_PIECE if S % DIAG_PIECE == 0 else S
        ov, lv = out[:, :, a:a + full * S].view(B, Hq, full, S, D), lse[:, :, a:a + full * S].view(B, Hq, full, S)
        for t in range(S // P):
            w = (t + 1) * P
            mask = None
            if t:
                mask = torch.zeros(P, w, dtype=q.dtype).masked_fill_(
                    torch.arange(w)[None, :] > torch.arange(t * P, w)[:, None], float("-inf"))
            o, l = flash_cpu(qs[:, :, t * P:w], ks[:, :, :w], vs[:, :, :w], mask, t == 0, scale)
            ov[:, :, :, t * P:w] = o.view(B, full, Hq, P, D).transpose(1, 2)
            lv[:, :, :, t * P:w] = l.view(B, full, Hq, P).transpose(1, 2)
    tail = N - (first + full * S)
    if tail:  # the last, incomplete segment: a square causal block
        o, l = flash_cpu(q[:, :, M - tail:], k[:, :, N - tail:], v[:, :, N - tail:], None, True, scale)
        out[:, :, M - tail:], lse[:, :, M - tail:] = o, l
    return out, lse


def _permuted(k: Tensor, v: Tensor, plan: PBSPlan) -> tuple[Tensor, Tensor]:
    # k, v gathered by the plan's permutation, padded to whole blocks: [B, Hkv, nkb * b, D] (once per plan
    # and k/v: the memo is keyed by the tensors, so a plan called with other keys never reads stale ones)
    src = (tensor_signature(k), tensor_signature(v))
    got = plan.memo.get("kv_perm_cpu")
    if got is None or got[0] != src:
        b = plan.config.block
        pad = -plan.n % b
        if plan.config.permute:
            # the plan permuted these very keys already (its selection scored them): no second gather
            if plan.memo.get("k_perm_of") == src[0]:
                k = plan.memo["k_perm"]
            else:
                k = permute_rows(k, plan.perm)
            v = permute_rows(v, plan.perm)
        if pad or not k.is_contiguous():
            k = torch.nn.functional.pad(k, (0, 0, 0, pad)).contiguous()
            v = torch.nn.functional.pad(v, (0, 0, 0, pad)).contiguous()
        got = plan.memo["kv_perm_cpu"] = (src, k, v)
    return got[1], got[2]


def _items(plan: PBSPlan) -> list[Tensor]:
    # the off-diagonal work items as query block ids (into [B * Hq * nqb]) per item size g: [n, g] each.
    # A selection group's blocks (a query segment's, config.select_per) whose lists are identical run as
    # one item of g * b query rows: ATen's kernel tiles queries by 64 rows from 192 rows up, by 32 below
    # (~8% fewer ns per score pair here), and the group's K/V blocks are copied once, not g times
    B, Hq, nqb, C = plan.kv_index.shape
    count = plan.kv_count.reshape(B * Hq, nqb)
    ids = torch.arange(B * Hq * nqb).view(B * Hq, nqb)
    single = count > 0
    out = []
    g = plan.config.q_group
    j0 = -(plan.q_offset // plan.config.block) % g  # first query block that starts a whole group
    nw = (nqb - j0) // g if g > 1 else 0
    if nw:
        sl = slice(j0, j0 + nw * g)
        cg = count[:, sl].reshape(B * Hq, nw, g)
        ig = plan.kv_index.reshape(B * Hq, nqb, C)[:, sl].reshape(B * Hq, nw, g, C)
        same = (cg > 0).all(-1) & (cg == cg[..., :1]).all(-1) & (ig == ig[:, :, :1]).all(-1).all(-1)  # [B*Hq, nw]
        if bool(same.any()):
            out.append(ids[:, sl].reshape(B * Hq, nw, g)[same])
            single[:, sl] &= ~same.repeat_interleave(g, 1)
    out.append(ids[single][:, None])
    return [x for x in out if x.numel()]


def _off_diagonal(q: Tensor, k: Tensor, v: Tensor, plan: PBSPlan, scale: float, bucket: int) -> tuple[Tensor, Tensor]:
    # every work item (a query block, or a group's blocks sharing one selection; of one batch row and
    # query head) over its selected blocks of earlier segments, no causal mask. Items are grouped by
    # size and number of selected blocks (rounded up to `bucket`): one flash call per group, each item
    # its own batch entry, so no kv head is repeated per query head and no item pays for another
    # head's wider selection.
    B, Hq, M, D = q.shape
    b = plan.config.block
    Hkv = k.shape[1]
    G = Hq // Hkv
    nqb = plan.q_blocks
    kp, vp = _permuted(k, v, plan)  # [B, Hkv, N', D], N' a multiple of b
    nkb = kp.shape[2] // b
    kb = kp.reshape(B * Hkv * nkb, b * D)  # one row per (batch, kv head, block): whole-block copies
    vb = vp.reshape(B * Hkv * nkb, b * D)
    # flat block row of each selected block: ((batch * Hkv) + kv head) * nkb + block
    base = ((torch.arange(B)[:, None] * Hkv + torch.arange(Hq)[None, :] // G) * nkb)[:, :, None, None]
    rows = (plan.kv_index.long() + base).reshape(B * Hq * nqb, -1)  # [blocks, C]
    count = plan.kv_count.reshape(-1).long()  # [blocks]
    qpad = q if nqb * b == M else torch.nn.functional.pad(q, (0, 0, 0, nqb * b - M))
    qi = qpad.reshape(B * Hq * nqb, b, D)  # block = (batch, query head, query block)
    # the copies go to reused scratch memory: fresh multi-MB tensors page-fault (~17x slower copies);
    # out/lse are scratch too (read once by the caller's merge); blocks without keys keep out 0, lse -inf
    out = scratch("pbs.out", (B * Hq * nqb, b, D), q.dtype).zero_()
    lse = scratch("pbs.lse", (B * Hq * nqb, b)).fill_(float("-inf"))
    for blocks in _items(plan):  # [n_items, g] query block ids of same-size items
        g = blocks.shape[1]
        first = blocks[:, 0]
        width = (count[first] + bucket - 1) // bucket * bucket  # the flash call an item runs in
        for w in torch.unique(width).tolist():
            sel = (width == w).nonzero().squeeze(1)
            items = first.index_select(0, sel)  # each item's first block: its selection
            qblocks = blocks.index_select(0, sel).reshape(-1)  # [n * g]
            n = items.numel()
            c = min(w, rows.shape[1])
            r = rows.index_select(0, items)[:, :c].reshape(-1)
            ks = torch.index_select(kb, 0, r, out=scratch("pbs.k", (n * c, b * D), kb.dtype)).view(n, 1, c * b, D)
            vs = torch.index_select(vb, 0, r, out=scratch("pbs.v", (n * c, b * D), vb.dtype)).view(n, 1, c * b, D)
            qs = torch.index_select(qi, 0, qblocks, out=scratch("pbs.q", (n * g, b, D), qi.dtype)).view(n, 1, g * b, D)
            cnt = count.index_select(0, items)
            mask = None
            if bool((cnt != c).any()):  # pads repeat the last selected block: mask them out
                blk = torch.arange(c * b).div(b, rounding_mode="floor")
                mask = torch.zeros(n, 1, 1, c * b, dtype=q.dtype).masked_fill_(blk >= cnt[:, None, None, None],
                                                                                 float("-inf"))
            o, l = flash_cpu(qs, ks, vs, mask, False, scale)  # [n, 1, g * b, D]
            out.index_copy_(0, qblocks, o.view(n * g, b, D))
            lse.index_copy_(0, qblocks, l.reshape(n * g, b).float())  # fp64 inputs: the kernel's lse is fp64
    return out.view(B, Hq, nqb * b, D)[:, :, :M], lse.view(B, Hq, nqb * b)[:, :, :M]


def pbs_attention_cpu(q: Tensor, k: Tensor, v: Tensor, pbs: PBSConfig = DEFAULT_CONFIG, scale: float | None = None, *,
                      plan: PBSPlan | None = None, config: KernelConfig = CPU_DEFAULT_CONFIG) -> tuple[Tensor, Tensor]:
    """PBS attention on the CPU; ``(out [B, Hq, M, D], lse [B, Hq, M] fp32)``. See the module docstring."""
    B, Hq, Hkv, M, N = check_qkv(q, k, v, plan.config if plan is not None else pbs)
    if plan is None:
        plan = plan_pbs(q, k, pbs, scale, v)
    elif ((plan.n, plan.m) != (N, M) or tuple(plan.perm.shape) != (B, Hkv, N)
          or tuple(plan.kv_count.shape[:2]) != (B, Hq)):
        raise PlanError(f"PBS attention: the plan is for {plan.m} queries over {plan.n} keys, perm "
                        f"{tuple(plan.perm.shape)}, kv_count {tuple(plan.kv_count.shape)}; the call has q "
                        f"{tuple(q.shape)}, k {tuple(k.shape)}")
    sc = softmax_scale(scale, q.shape[-1])
    if not q.is_contiguous():  # a model's q is a transposed view: one copy, to warm scratch, serves both parts
        q = scratch("pbs.qc", q.shape, q.dtype).copy_(q)
    od, ld = diagonal_attention(q, k, v, plan.config.segment, sc)
    if int(plan.kv_count.max()) == 0:
        return od, ld
    oo, lo = _off_diagonal(q, k, v, plan, sc, int(config.get("BUCKET", 1)))
    return _merge2(od, ld, oo, lo)


def _merge2(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    # exact LSE merge of two partials, in place on o1 (the diagonal part always has keys: l1 finite);
    # ir.reference.merge_lse would stack both [B, Hq, M, D] partials first: ~2.5x slower at 8K
    lse = torch.logaddexp(l1, l2)  # [B, Hq, M]
    w2 = torch.exp(l2 - lse)  # 0 where the off-diagonal part is empty (l2 = -inf)
    o = o1.float() if o1.dtype != torch.float32 else o1
    o.mul_((1.0 - w2)[..., None]).addcmul_(o2, w2[..., None])  # no [B, Hq, M, D] temporary
    return o.to(o1.dtype), lse


def _fn(q, k, v, pbs=DEFAULT_CONFIG, scale=None, *, plan=None, config=CPU_DEFAULT_CONFIG):
    return pbs_attention_cpu(q, k, v, pbs, scale, plan=plan, config=config)


register_impl(Impl(
    op="pbs_attention", name="cpu.gather", device="cpu", fn=_fn, default=CPU_DEFAULT_CONFIG,
    configs=lambda args: list(CPU_CONFIGS),
    source_hash=source_hash(diagonal_attention, _permuted, _items, _off_diagonal, pbs_attention_cpu, _merge2),
    supports=lambda args: args[0].device.type == "cpu",
))
