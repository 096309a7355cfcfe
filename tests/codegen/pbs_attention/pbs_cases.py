"""Shared builders and independent oracles of the PBS-attention tests.

Everything here is computed *without* the package's plan/reference helpers (loops over blocks,
float64), so that a test comparing against it can catch a bug in either.

Tolerances of an implementation against the fp32 reference computed from the same (rounded)
inputs, ``(out atol, lse atol)``: fp32 -> summation order only (1e-5); fp16 -> the output is
rounded to 10 mantissa bits and the two partials (diagonal, off-diagonal) are each rounded
before their merge (2e-3); bf16 -> 7 bits (2e-2); the LSE is accumulated in fp32 everywhere
(2e-4 for 16-bit inputs).
"""
from __future__ import annotations

import math

import torch

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-4), torch.bfloat16: (2e-2, 2e-4)}

# (block, segment) pairs the fuzzed tests draw from
BLOCK_SEGMENTS = [(32, 64), (64, 128), (64, 256), (128, 256)]


def make_qkv(b, hq, hkv, d, n, m=None, *, dtype=torch.float32, seed=0):
    """Random ``q [b, hq, m, d]``, ``k, v [b, hkv, n, d]`` (``m`` defaults to ``n``)."""
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(b, hq, m, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_structured(b, hq, hkv, d, n, m=None, *, seed=0, frac=0.03, kmag=8.0, qmag=4.0):
    """Like ``PBSShape.make_args``: a few "heavy" keys scattered through every segment (plus key 0)
    lean towards a direction every query leans towards; ``kmag``/``qmag`` set how strongly."""
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(b, hq, m, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    heavy = torch.rand(b, hkv, n, generator=g) < frac
    heavy[..., 0] = True
    return q + qmag * u, k + heavy[..., None] * kmag * u, v


def random_segment_perm(b, hkv, n, segment, g):
    """``[b, hkv, n]`` int64: a random permutation inside every segment but the last (identity there)."""
    perm = torch.arange(n).expand(b, hkv, n).clone()
    for s in range((n - 1) // segment):
        lo = s * segment
        for i in range(b):
            for h in range(hkv):
                perm[i, h, lo:lo + segment] = lo + torch.randperm(segment, generator=g)
    return perm


def fuzz_shape(seed):
    """A random problem ``dict(b, hq, hkv, d, n, m, block, segment)``: GQA group 1/3/4, batch 1-2,
    ``n`` not a multiple of the block or segment (mostly), chunk offsets ``m < n``, head dims 8..64."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(xs):
        return xs[int(torch.randint(len(xs), (), generator=g))]

    block, segment = pick(BLOCK_SEGMENTS)
    group = pick([1, 3, 4])
    hkv = pick([1, 2])
    b = pick([1, 2])
    d = pick([8, 16, 24, 40, 64])
    n = int(torch.randint(segment + 1, min(1024, 4 * segment) + 1, (), generator=g))
    if n % block == 0:
        n += 1 + int(torch.randint(block - 1, (), generator=g))
    chunks = int(torch.randint(0, (n - 1) // block + 1, (), generator=g))  # whole blocks cut off the queries
    if bool(torch.rand((), generator=g) < 0.4):
        chunks = 0  # a whole prefill (M == N: also checked against SDPA)
    return dict(b=b, hq=group * hkv, hkv=hkv, d=d, n=n, m=n - chunks * block, block=block, segment=segment)


def causal_oracle(q, k, v, scale=None, mask=None):
    """Float64 attention of ``q [B, Hq, M, D]`` (the last ``M`` positions) over ``k, v [B, Hkv, N, D]``:
    bottom-right causal, or by ``mask [B, Hq, M, N]`` when given. Returns ``(out, lse)`` in fp64."""
    M, N, D = q.shape[2], k.shape[2], q.shape[3]
    G = q.shape[1] // k.shape[1]
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ kk.transpose(-1, -2) * sc
    if mask is None:
        mask = torch.arange(N)[None, :] <= (torch.arange(M) + N - M)[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ vv, lse


def loop_mask(plan):
    """``[B, Hq, M, N]`` bool: the keys each query sees under ``plan``, built by loops from the
    plan's fields (``perm``, ``kv_count``, ``kv_index``) and the rules of the module docstring."""
    b, S = plan.config.block, plan.config.segment
    B, Hq, nqb, _ = plan.kv_index.shape
    M, N, off = plan.m, plan.n, plan.n - plan.m
    G = Hq // plan.perm.shape[1]
    mask = torch.zeros(B, Hq, M, N, dtype=torch.bool)
    for t in range(M):  # own segment, causal, original order
        p = off + t
        mask[:, :, t, (p // S) * S:p + 1] = True
    for i in range(B):
        for h in range(Hq):
            for qb in range(nqb):
                rows = slice(qb * b, min(M, (qb + 1) * b))
                for j in plan.kv_index[i, h, qb, : int(plan.kv_count[i, h, qb])].tolist():
                    keys = plan.perm[i, h // G, j * b:min(N, (j + 1) * b)]
                    mask[i, h, rows, keys] = True
    return mask


def _loop_dims(q, k, plan, scale):
    # the sizes both recomputations need, and allowed[i, j]: key block j is in an earlier segment than query block i
    b, S = plan.config.block, plan.config.segment
    B, Hq, M, D = q.shape
    N = k.shape[2]
    off = N - M
    nqb, nkb = -(-M // b), -(-N // b)
    allowed = torch.zeros(nqb, nkb, dtype=torch.bool)
    for i in range(nqb):
        for j in range(nkb):
            allowed[i, j] = (j * b) // S < (off + i * b) // S
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    return b, B, Hq, M, N, Hq // k.shape[1], off, nqb, nkb, sc, allowed


def pooled_probs(q, k, plan, scale=None):
    """``(p [B, Hq, nqb, nkb] fp64, allowed [nqb, nkb] bool)``: the selection's block probabilities,
    recomputed by loops: ``softmax_j(mean(q block i) . mean(permuted key block j) * scale)`` over
    the blocks ``j`` of segments strictly before query block ``i``'s (0 elsewhere)."""
    b, B, Hq, M, N, G, off, nqb, nkb, sc, allowed = _loop_dims(q, k, plan, scale)
    p = torch.zeros(B, Hq, nqb, nkb, dtype=torch.float64)
    for x in range(B):
        for h in range(Hq):
            kh = k[x, h // G].double()[plan.perm[x, h // G]]
            kbar = torch.stack([kh[j * b:(j + 1) * b].mean(0) for j in range(nkb)])
            for i in range(nqb):
                cols = allowed[i].nonzero().squeeze(1)
                if cols.numel() == 0:
                    continue
                qbar = q[x, h, i * b:(i + 1) * b].double().mean(0)
                p[x, h, i, cols] = torch.softmax(kbar[cols] @ qbar * sc, 0)
    return p, allowed


def sampled_probs(q, k, plan, scale=None):
    """``(p [B, Hq, nqb, nkb], own [B, Hq, nqb], allowed [nqb, nkb])`` fp64, by loops: each query block's
    mean, over its ``plan.config.sample`` sampled rows (evenly spaced, ending at its last row, clamped
    to the last query), of the causal softmax summed per permuted key block of earlier segments (``p``)
    and over its own segment's keys (``own``)."""
    S, s = plan.config.segment, plan.config.sample
    b, B, Hq, M, N, G, off, nqb, nkb, sc, allowed = _loop_dims(q, k, plan, scale)
    p = torch.zeros(B, Hq, nqb, nkb, dtype=torch.float64)
    own = torch.zeros(B, Hq, nqb, dtype=torch.float64)
    for x in range(B):
        for h in range(Hq):
            kh = k[x, h // G].double()
            perm = plan.perm[x, h // G]
            for i in range(nqb):
                for r in range(s):
                    t = min(M - 1, i * b + (r + 1) * b // s - 1)
                    pos = off + t
                    w = torch.softmax((kh[: pos + 1] @ q[x, h, t].double()) * sc, 0)  # keys 0..pos, original order
                    pw = torch.zeros(N, dtype=torch.float64)
                    pw[: pos + 1] = w
                    own[x, h, i] += float(pw[pos // S * S: pos + 1].sum()) / s
                    pp = pw[perm]  # permuted order
                    for j in range(nkb):
                        if allowed[i, j]:
                            p[x, h, i, j] += float(pp[j * b:(j + 1) * b].sum()) / s
    return p, own, allowed


def selection_groups(plan):
    """Lists of query block indices that share one selection: the blocks of one query segment (by
    absolute position; ``select_per="segment"``), else each block alone."""
    b, S, off = plan.config.block, plan.config.segment, plan.n - plan.m
    if plan.config.select_per != "segment":
        return [[i] for i in range(plan.q_blocks)]
    seg = [(off + i * b) // S for i in range(plan.q_blocks)]
    return [[i for i in range(plan.q_blocks) if seg[i] == t] for t in sorted(set(seg))]


def segment_mean(x, plan):
    """``x [B, Hq, nqb, ...]`` with each query block's entry replaced by the mean over its selection group."""
    out = x.clone()
    for g in selection_groups(plan):
        out[:, :, g] = x[:, :, g].mean(2, keepdim=True)
    return out


def check_coverage(plan, p, own, allowed, tau, what, tie=1e-5):
    """The selection rule, checked by loops on independently computed block masses ``p [B, Hq, nqb, nkb]``
    and own-segment masses ``own [B, Hq, nqb]``: per (batch, head, selection group) one set, whose mass
    plus ``own`` reaches ``tau`` for every block of the group; without its lightest block (by the group's
    mean mass) some block falls below ``tau`` (minimal); no unkept block outweighs a kept one in the
    group's mean mass. Returns the number of groups checked (near ties at the threshold are skipped)."""
    B, Hq = p.shape[:2]
    pm = segment_mean(p, plan)
    checked = 0
    for x in range(B):
        for h in range(Hq):
            for g in selection_groups(plan):
                keeps = [selected(plan, x, h, i) for i in g]
                assert all(kp == keeps[0] for kp in keeps), f"{what} ({x},{h},{g}): one selection per group"
                keep = sorted(keeps[0], key=lambda j: float(pm[x, h, g[0], j]))
                cols = allowed[g[0]].nonzero().squeeze(1).tolist()
                if not cols:
                    assert not keep
                    continue
                mass = [float(own[x, h, i]) + sum(float(p[x, h, i, j]) for j in keep) for i in g]
                lightest = [float(p[x, h, i, keep[0]]) if keep else 0.0 for i in g]
                if any(abs(m - tau) < tie or abs(m - lt - tau) < tie for m, lt in zip(mass, lightest)):
                    continue  # fp32 vs fp64 ties at the threshold
                assert min(mass) >= tau, f"{what} ({x},{h},{g}): kept mass {min(mass):.4f} < tau"
                if keep:
                    assert min(m - lt for m, lt in zip(mass, lightest)) < tau, f"{what} ({x},{h},{g}): not minimal"
                    rest = [float(pm[x, h, g[0], j]) for j in cols if j not in keep]
                    if rest:
                        assert max(rest) <= float(pm[x, h, g[0], keep[0]]) + 1e-6, f"{what} ({x},{h},{g}): skipped a heavier block"
                checked += 1
    return checked


def selected(plan, x, h, i):
    """The selected block indices of (batch ``x``, query head ``h``, query block ``i``) as a set."""
    return set(plan.kv_index[x, h, i, : int(plan.kv_count[x, h, i])].tolist())


def assert_close(got, want, dtype, what=""):
    """``got``/``want``: ``(out, lse)``; out compared in fp32 at ``TOL[dtype]``; -inf LSEs must match."""
    (go, gl), (wo, wl) = got, want
    oa, la = TOL[dtype]
    assert go.shape == wo.shape and gl.shape == wl.shape, what
    torch.testing.assert_close(go.float(), wo.float(), atol=oa, rtol=0, msg=lambda m: f"{what} out: {m}")
    torch.testing.assert_close(gl.float(), wl.float(), atol=la, rtol=0, msg=lambda m: f"{what} lse: {m}")
