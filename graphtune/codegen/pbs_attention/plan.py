"""Host plan of permuted block-sparse (PBS) prefill attention: key permutation and block selection.

PBS-Attn (arXiv 2510.21270) makes causal prefill attention block-sparse. Keys are cut into
*segments* of ``S`` tokens and *blocks* of ``b`` tokens (``S % b == 0``). A query block attends

* **densely, causally** to its own (*diagonal*) segment, in original order;
* to the **selected** blocks of earlier segments, with no mask: every key of an earlier segment
  precedes every query of a later one, so the order of keys inside an earlier segment is free.

That freedom is what PBS uses: within each segment the keys are **permuted** so that the keys
the last queries attend to most come first, which clusters attention mass into few blocks. Then,
per query block and query head, the blocks covering a ``tau`` fraction of the estimated mass
are kept (plus the block holding token 0, the attention sink). Queries are never permuted, so
the output needs no un-permutation.

:func:`plan_pbs` does all of it once per call (per layer: the permutation depends on the layer's
keys) and returns a :class:`PBSPlan`:

* ``perm [B, Hkv, N]``: the original index of the key at each permuted position (identity in the
  last segment, which is never off-diagonal, and everywhere when ``permute=False``). Per KV
  head: the scores of a GQA group's query heads are averaged, so K/V are never repeated per
  query head;
* ``kv_count [B, Hq, nqb]`` / ``kv_index [B, Hq, nqb, C]``: each query block's selected
  off-diagonal blocks of permuted keys, ascending (the first ``kv_count`` entries are valid).
  Block index lists, not a dense mask: what a kernel iterates.

Queries may be the last ``M`` of the ``N`` keys' positions (a chunk of a chunked prefill):
query ``t`` sits at position ``N - M + t`` and sees keys ``<= N - M + t``; ``N - M`` must be a
multiple of ``b``.

Examples
--------
>>> import torch
>>> q, k = torch.randn(1, 4, 512, 32), torch.randn(1, 2, 512, 32)
>>> plan = plan_pbs(q, k, PBSConfig(block=64, segment=128, tau=1.0))
>>> plan.kv_count[0, 0].tolist()  # tau=1 keeps every block of the earlier segments
[0, 0, 2, 2, 4, 4, 6, 6]
>>> round(plan.density().mean().item(), 3)
1.0
>>> sparse = plan_pbs(q, k, PBSConfig(block=64, segment=128, tau=0.5))
>>> bool((sparse.kv_count <= plan.kv_count).all())
True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from graphtune import flags
from graphtune.codegen.registry import register_record_kind, source_hash
from graphtune.codegen.scratch import scratch
from graphtune.errors import PlanError, ShapeError
from graphtune.ir.args import softmax_scale

__all__ = ["PBSConfig", "PBSPlan", "plan_pbs", "permute_keys", "sample_rows", "sampled_mass", "select_blocks",
           "select_by_mass", "peak_blocks", "query_groups", "group_reduce", "permute_rows", "tensor_signature", "check_qkv",
           "DEFAULT_CONFIG", "ACCURACY_IMPL", "SELECTION_HASH"]


@dataclass(frozen=True)
class PBSConfig:
    """The knobs of PBS prefill: block ``b``, segment ``S``, coverage ``tau``, permutation, sink.

    The paper's defaults: ``b=128, S=256, tau=0.9``, keys-only permutation, the sink block forced.
    graphtune's: the same with ``tau=0.94`` on its sampled estimate (``sample=8``, below) and one
    selection per query segment (``select_per``, below), which keeps ~0.96 of the attention mass at
    8K on SmolLM2 (the same recall, top-1 and KL as ``tau=0.95`` per block, 5% faster).
    ``tau >= 1`` keeps every block (exact: dense causal attention for any permutation).
    ``permute=False`` is the no-permutation block-sparse variant (same selection, identity
    permutation), which measures what the permutation buys. ``local=n`` also keeps the ``n``
    segments right before each query block's own (local context; measured on SmolLM2: +0.8 points
    of top-1 at tau 0.9 for +1% density, so off by default).

    ``sample`` picks the estimator the selection ranks blocks by:

    * ``sample=s > 0`` (default 8, graphtune's): ``s`` evenly spaced query rows of each block get
      their exact softmax over every key they see; a block's estimated mass is their mean
      probability on it. ``tau`` is then the fraction of each query block's *whole* attention
      mass to keep, its own segment included: the kept blocks are the fewest whose estimated
      mass, added to the own segment's, reaches ``tau``. The permutation is scored by the sampled
      rows of the last selection group's blocks (below).
    * ``sample=0``: the paper's estimate, ``softmax`` of pooled block means over the earlier
      segments' blocks only, ``tau`` a fraction of that off-diagonal estimate; the permutation
      scored by all rows of the last query block.

    Measured on SmolLM2 at 8K (every third layer, ``docs/ops/sparse-prefill.md``): for a mean
    recall of 0.95, the pooled estimate needs 0.385 of the causal blocks, 8 sampled rows 0.263,
    the true mass (an oracle) 0.257. The sampled rows cost ``s / b`` of dense attention's scores.

    ``select_per`` is who shares a selection:

    * ``"segment"`` (graphtune's default): the query blocks of one query segment (they see the
      same earlier segments) keep one set of blocks. Blocks are ranked by the segment's mean
      estimated mass, and the set is the shortest prefix of that ranking with which *every* one
      of the segment's blocks reaches ``tau`` of its own mass (so ``tau`` keeps its per-block
      meaning). An implementation then runs a segment as one ``S``-row item (ATen's CPU kernel:
      ~8% fewer ns per score pair at 256 rows than at 128; K/V blocks copied once per segment).
    * ``"block"``: every query block selects alone (the paper's).

    ``peaks=k > 0`` adds, for every query row, the ``k`` earlier-segment blocks with the highest
    Quest-style bound on its scores (:func:`peak_blocks`), shared within the selection group. A
    sampled estimate misses rows whose attention peaks where their block's sampled rows do not
    (measured on SmolLM2 at 8K: the worst 0.5% of rows lose 22-33% of their mass, 80% of it in one
    skipped block, and are almost never sampled rows); the bound sees every row for two
    ``[M, D] x [D, blocks]`` products per head. tau 0.995 with ``peaks=1``: KL 8.7e-4 at density
    0.519, where 0.998 without needs 0.60 for KL ~1e-3. Off by default.
    """

    block: int = 128
    segment: int = 256
    tau: float = 0.94
    permute: bool = True
    sink: bool = True
    local: int = 0
    sample: int = 8
    select_per: str = "segment"
    peaks: int = 0

    def __post_init__(self) -> None:
        for f in ("block", "segment"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PlanError(f"PBSConfig.{f} must be a positive int, got {v!r}")
        if self.segment % self.block:
            raise PlanError(f"PBSConfig: segment {self.segment} is not a multiple of block {self.block}")
        if not isinstance(self.sample, int) or isinstance(self.sample, bool) or not 0 <= self.sample <= self.block:
            raise PlanError(f"PBSConfig.sample must be an int in [0, block={self.block}] (query rows per block the "
                            f"selection samples; 0: pooled block means), got {self.sample!r}")
        if self.select_per not in ("segment", "block"):
            raise PlanError(f"PBSConfig.select_per must be 'segment' (a query segment's blocks share one selection) "
                            f"or 'block' (each query block selects its own, the paper's), got {self.select_per!r}")
        if not isinstance(self.peaks, int) or isinstance(self.peaks, bool) or self.peaks < 0:
            raise PlanError(f"PBSConfig.peaks must be an int >= 0 (blocks each query row adds by its score bound; "
                            f"0: off), got {self.peaks!r}")
        if not (isinstance(self.tau, (int, float)) and 0.0 < float(self.tau)):
            raise PlanError(f"PBSConfig.tau must be a number > 0 (a fraction of attention mass), got {self.tau!r}")

    def __str__(self) -> str:
        est = f" sample={self.sample}" if self.sample else " pooled"
        per = " per-block" if self.select_per == "block" and self.segment > self.block else ""
        pk = f" peaks={self.peaks}" if self.peaks else ""
        return f"b={self.block} S={self.segment} tau={self.tau:g}{est}{per}{pk}{'' if self.permute else ' no-perm'}"

    @property
    def q_group(self) -> int:
        """Query blocks that share one selection: a segment's (``select_per="segment"``) or 1."""
        return self.segment // self.block if self.select_per == "segment" else 1


DEFAULT_CONFIG = PBSConfig()


@dataclass
class PBSPlan:
    """One call's permutation and block selection (see the module docstring); read by every implementation."""

    config: PBSConfig
    n: int  # keys
    m: int  # queries (the last m positions)
    perm: Tensor  # [B, Hkv, N] int64: original key index at each permuted position
    kv_count: Tensor  # [B, Hq, nqb] int32: selected off-diagonal blocks per query block
    kv_index: Tensor  # [B, Hq, nqb, C] int32: their permuted block indices, ascending (C >= 1)
    memo: dict[Any, Any] = field(default_factory=dict)  # what implementations derive (gathered K/V, tables)

    @property
    def q_offset(self) -> int:
        return self.n - self.m

    @property
    def q_blocks(self) -> int:
        return -(-self.m // self.config.block)

    def q_block_abs(self) -> Tensor:
        """``[nqb]`` absolute block index (over keys) of each query block."""
        return torch.arange(self.q_blocks) + self.q_offset // self.config.block

    def diag_blocks(self) -> Tensor:
        """``[nqb]`` key blocks each query block computes densely: its segment's, up to its own."""
        a = self.q_block_abs()
        per_seg = self.config.segment // self.config.block
        return a - (a // per_seg) * per_seg + 1

    def density(self) -> Tensor:
        """``[B, Hq]`` computed key blocks over the causal key blocks (1.0: dense causal)."""
        a = self.q_block_abs().to(self.kv_count.device)
        causal = (a + 1).sum().float()
        done = self.kv_count.float().sum(-1) + self.diag_blocks().to(self.kv_count.device).sum().float()
        return done / causal

    def off_diagonal_keys(self) -> Tensor:
        """``[B, Hq, nqb, C*b]`` original key indices of the selected blocks (pads repeat the last valid one)."""
        b = self.config.block
        B, Hq, nqb, C = self.kv_index.shape
        G = Hq // self.perm.shape[1]
        pos = (self.kv_index.long()[..., None] * b + torch.arange(b, device=self.perm.device)).reshape(B, Hq, nqb * C * b)
        perm = self.perm.repeat_interleave(G, 1)
        return perm.gather(2, pos.clamp_max(self.n - 1)).view(B, Hq, nqb, C * b)

    def describe(self) -> str:
        d = self.density()
        return (f"PBS {self.config}: N={self.n} queries={self.m} density {float(d.mean()):.3f} "
                f"(heads {float(d.min()):.3f}..{float(d.max()):.3f})")


def permute_rows(x: Tensor, perm: Tensor) -> Tensor:
    """``x [B, H, N, D]`` with each head's rows in ``perm [B, H, N]`` order, contiguous.

    One ``index_select`` of whole rows: ~4x faster on the CPU than ``gather`` with an index
    expanded over ``D``.
    """
    B, H, N, D = x.shape
    base = (torch.arange(B * H, device=x.device) * N).view(B, H, 1)
    return x.reshape(B * H * N, D).index_select(0, (perm + base).reshape(-1)).view(B, H, N, D)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, config: PBSConfig) -> tuple[int, int, int, int, int]:
    """Validate ``q [B, Hq, M, D]``, ``k, v [B, Hkv, N, D]``; returns ``(B, Hq, Hkv, M, N)``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"PBS attention wants q [B, Hq, M, D], k/v [B, Hkv, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, M, D = q.shape
    _, Hkv, N, _ = k.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ShapeError(f"PBS attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if Hq % Hkv:
        raise ShapeError(f"PBS attention: {Hq} query heads are not a multiple of {Hkv} kv heads")
    if M > N or M < 1:
        raise ShapeError(f"PBS attention: {M} queries over {N} keys (want 1 <= M <= N)")
    if (N - M) % config.block:
        raise PlanError(f"PBS attention: the queries start at key {N - M}, not a multiple of block {config.block}")
    return B, Hq, Hkv, M, N


def sample_rows(m: int, config: PBSConfig) -> Tensor:
    """``[nqb, s]`` the query rows (indices into ``q``'s ``m``) each block's estimate samples.

    ``s = config.sample`` evenly spaced rows ending at the block's last row (the row that sees the
    most keys); a last, partial block repeats its last row.

    >>> sample_rows(300, PBSConfig(block=128, sample=4)).tolist()
    [[31, 63, 95, 127], [159, 191, 223, 255], [287, 299, 299, 299]]
    """
    b, s = config.block, config.sample
    nqb = -(-m // b)
    r = torch.tensor([(j + 1) * b // s - 1 for j in range(s)])
    return (torch.arange(nqb)[:, None] * b + r[None, :]).clamp_max(m - 1)


def permute_keys(q: Tensor, k: Tensor, config: PBSConfig, scale: float | None = None) -> Tensor:
    """``[B, Hkv, N]`` PBS key permutation: within each earlier segment, keys by descending importance.

    Importance of key ``j``: the mean over the last query block's rows (with ``config.sample``: the
    sampled rows of the last selection group's blocks; and over the GQA group's heads) of
    ``softmax(q k^T * scale)`` over all keys the row sees (causal). The last segment — the one holding the last query, never anyone's
    off-diagonal segment — keeps its order.
    """
    B, Hq, M, D = q.shape
    _, Hkv, N, _ = k.shape
    S = config.segment
    last_seg = (N - 1) // S  # segments [0, last_seg) are permuted
    perm = torch.arange(N, device=k.device).expand(B, Hkv, N).clone()
    if not config.permute or last_seg == 0:
        return perm
    G = Hq // Hkv
    if config.sample:
        grp = query_groups(config, N, M)
        rows = sample_rows(M, config)[grp == grp[-1]].reshape(-1).to(q.device)  # the last selection group's
    else:
        rows = torch.arange(max(0, M - config.block), M, device=q.device)
    nr = rows.numel()
    sdt = score_dtype(q.device)  # an estimate that only orders keys: bf16 where it is native (5x fp32 here)
    # [B*Hkv, G*nr, D]: the group's heads along the rows, the scale folded in (no pass over the scores)
    qt = (q[:, :, rows].float() * softmax_scale(scale, D)).to(sdt).reshape(B * Hkv, G * nr, D)
    kf = k.to(sdt).reshape(B * Hkv, N, D)
    s = scratch("pbs.perm_scores", (B * Hkv, G * nr, N), sdt)  # reused per-thread memory, as sampled_mass's
    for i in range(B * Hkv):  # one GEMM per (batch, kv head) into one buffer (a batched fp32 one: ~5x slower)
        torch.mm(qt[i], kf[i].T, out=s[i])
    s = s.view(B, Hkv, G * nr, N)
    pos = (rows + (N - M)).repeat(G)  # each row's query position
    lo = int(pos.min())  # only keys after the earliest row can be after a row's query
    s[..., lo:].masked_fill_(torch.arange(lo, N, device=k.device) > pos[:, None], float("-inf"))
    imp = torch.softmax(s, -1).float().mean(2)[..., : last_seg * S]  # [B, Hkv, last_seg*S]
    order = imp.reshape(B, Hkv, last_seg, S).argsort(dim=-1, descending=True, stable=True)
    order = order + (torch.arange(last_seg, device=k.device) * S)[:, None]
    perm[..., : last_seg * S] = order.reshape(B, Hkv, last_seg * S)
    return perm


def query_groups(config: PBSConfig, n: int, m: int) -> Tensor:
    """``[nqb]`` the selection group of each query block, from 0: blocks of one query segment share a
    group (``config.select_per == "segment"``), else each block is its own.

    >>> query_groups(PBSConfig(block=128, segment=256), n=1024, m=640).tolist()  # queries from key 384
    [0, 1, 1, 2, 2]
    """
    nqb, a0 = -(-m // config.block), (n - m) // config.block
    g = config.q_group
    return (torch.arange(nqb) + a0) // g - a0 // g


def group_reduce(x: Tensor, config: PBSConfig, n: int, m: int, how: str = "mean") -> Tensor:
    """``x [B, H, nqb, ...]`` per query block -> each block gets its selection group's ``mean`` or
    ``amax`` (same shape)."""
    if config.q_group == 1:
        return x
    grp = query_groups(config, n, m).to(x.device)
    ng = int(grp[-1]) + 1
    red = x.new_zeros(*x.shape[:2], ng, *x.shape[3:])
    if how == "mean":
        red.index_add_(2, grp, x).div_(torch.bincount(grp, minlength=ng).to(x.dtype).view(-1, *[1] * (x.dim() - 3)))
    else:
        red.scatter_reduce_(2, grp.view(1, 1, -1, *[1] * (x.dim() - 3)).expand_as(x), x, how, include_self=False)
    return red.index_select(2, grp)


def _cover(mass: Tensor, own: Tensor, allowed: Tensor, config: PBSConfig, n: int, m: int) -> Tensor:
    # sel [B, H, nqb, nkb]: the smallest set of largest-mass allowed blocks whose mass, plus `own`
    # (the own segment's, [B, H, nqb, 1]), reaches tau of the total. A selection group's blocks
    # (config.select_per) share one set: blocks ranked by the group's mean mass, the prefix long
    # enough for *every* block of the group to reach tau of its own mass (no block loses coverage)
    rank = group_reduce(mass, config, n, m).masked_fill(~allowed, -1.0)
    order = rank.argsort(dim=-1, descending=True, stable=True)
    ps = (mass * allowed).gather(-1, order)  # each block's mass in the group's order, not-allowed last (0)
    total = own + ps.sum(-1, keepdim=True)
    need = ((own + ps.cumsum(-1) - ps) < float(config.tau) * total).sum(-1, keepdim=True)  # prefix per block
    keep_sorted = torch.arange(ps.shape[-1], device=ps.device) < group_reduce(need, config, n, m, "amax")
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) & allowed


def _block_mean(x: Tensor, b: int, n_valid: int) -> Tensor:
    # x: [B, H, L, D] -> [B, H, ceil(L/b), D] mean over each block's valid rows (first n_valid of L)
    B, H, L, D = x.shape
    nb = -(-L // b)
    pad = nb * b - L
    xs = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(B, H, nb, b, D).sum(3)
    cnt = torch.full((nb,), float(b), device=x.device)
    cnt[-1] = b - pad if pad else b
    return xs / cnt[:, None]


def sampled_mass(q: Tensor, k_perm: Tensor, perm: Tensor, config: PBSConfig, n: int,
                 scale: float | None = None, budget: int = 1 << 20) -> Tensor:
    """``[B, Hq, nqb, nkb]`` estimated attention mass of each query block on each permuted key block.

    The mean, over the block's :func:`sample_rows`, of the exact causal ``softmax(q k^T * scale)``
    summed over the block's keys (so each row sums to 1 over the blocks it sees). Keys are scored
    in permuted order (softmax does not care) with the causal mask read through ``perm``, so block
    sums need no gather. Query blocks go in chunks of at most ``budget`` scores, each over the keys
    up to the end of its last row's segment (the causal half only).
    """
    B, Hq, M, D = q.shape
    Hkv = k_perm.shape[1]
    G = Hq // Hkv
    b, S, s = config.block, config.segment, config.sample
    off = n - M
    nkb = -(-n // b)
    rows = sample_rows(M, config).to(q.device)  # [nqb, s]
    nqb = rows.shape[0]
    sc = softmax_scale(scale, D)
    sdt = score_dtype(q.device)
    kf = k_perm.to(sdt).reshape(B * Hkv, n, D)  # [B*Hkv, N, D]
    out = torch.zeros(B, Hq, nqb, nkb, device=q.device)
    c0 = 0
    while c0 < nqb:
        c1 = c0 + 1  # grow the chunk while its scores fit the budget
        while c1 < nqb and B * Hq * s * (c1 + 1 - c0) * _seg_end(int(rows[c1, -1]) + off, S, n) <= budget:
            c1 += 1
        r = rows[c0:c1].reshape(-1)  # [R]
        kend = _seg_end(int(r.max()) + off, S, n)  # keys through the end of the last row's segment
        pos = (r + off).repeat(G)  # [G*R] query position of each score row
        qt = (q[:, :, r].float() * sc).to(sdt).reshape(B * Hkv, G * r.numel(), D)
        # one GEMM per (batch, kv head): a batched one would copy the row-sliced keys first
        # reused per-thread memory: a fresh multi-MB tensor per chunk page-faults (codegen/scratch.py)
        sco = scratch("pbs.scores", (B * Hkv, G * r.numel(), kend), sdt)
        for i in range(B * Hkv):
            torch.mm(qt[i], kf[i, :kend].T, out=sco[i])
        sco = sco.view(B, Hkv, G * r.numel(), kend)
        lo = (int(r.min()) + off) // S * S  # before the first row's segment every key is visible
        sco[..., lo:].masked_fill_(perm[:, :, None, lo:kend] > pos[:, None], float("-inf"))
        p = torch.softmax(sco, -1)  # in the scores' dtype (reductions accumulate in fp32)
        nb, tail = divmod(kend, b)  # whole blocks, and the keys of a last partial one (kend == n)
        sums = p[..., : nb * b].unflatten(-1, (nb, b)).sum(-1).float()  # [B, Hkv, G*R, nb]
        if tail:
            sums = torch.cat([sums, p[..., nb * b:].sum(-1, keepdim=True).float()], -1)
        out[:, :, c0:c1, : sums.shape[-1]] = sums.view(B, Hkv, G, c1 - c0, s, -1).mean(4).reshape(B, Hq, c1 - c0, -1)
        c0 = c1
    return out


def score_dtype(device: torch.device) -> torch.dtype:
    """The dtype the selection's sampled scores are computed in: bfloat16 where the hardware multiplies
    it natively (a GPU; a CPU with AVX512-BF16 or AMX: ~7x fp32's speed on this CPU), else float32.
    An estimate only ranks blocks; bf16 rounding moved recall by < 0.001 on SmolLM2 at 8K."""
    if device.type == "cpu":
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        fast = any(f is not None and f() for f in probes)  # private probes: absent in some torch builds
        return torch.bfloat16 if fast and flags.get("SPARSE_PREFILL_BF16_SCORES") else torch.float32
    return torch.bfloat16 if flags.get("SPARSE_PREFILL_BF16_SCORES") else torch.float32


def _seg_end(pos: int, S: int, n: int) -> int:
    # the end of the segment holding key position `pos` (a key of it, permuted, may be visible to pos)
    return min(n, (pos // S + 1) * S)


def select_blocks(q: Tensor, k_perm: Tensor, perm: Tensor, config: PBSConfig, n: int,
                  scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``(kv_count [B, Hq, nqb] int32, kv_index [B, Hq, nqb, C] int32)``: tau-coverage block selection.

    ``config.sample > 0``: :func:`select_by_mass` of the :func:`sampled_mass`.
    ``config.sample == 0`` (the paper's): ``P_ij = softmax_j(mean(q block i) . mean(permuted key block j)
    * scale)`` over the blocks ``j`` of segments before query block ``i``'s; the smallest set of largest
    ``P_ij`` whose sum reaches ``tau``, plus the block holding token 0 (``config.sink``).
    ``k_perm`` is ``k`` gathered by ``perm`` (``[B, Hkv, N, D]``). Either way, ``config.peaks > 0`` adds
    each query row's :func:`peak_blocks`.
    """
    B, Hq, M, D = q.shape
    extra = peak_blocks(q, k_perm, config, n) if config.peaks and float(config.tau) < 1.0 else None
    if config.sample and float(config.tau) < 1.0:
        return select_by_mass(sampled_mass(q, k_perm, perm, config, n, scale), perm, config, n, M, extra)
    Hkv = k_perm.shape[1]
    b = config.block
    G = Hq // Hkv
    nqb, nkb = -(-M // b), -(-n // b)
    allowed, _ = _segments(config, n, M, q.device)
    if float(config.tau) >= 1.0:
        sel = allowed.expand(B, Hq, nqb, nkb)
    else:
        qp = _block_mean(q, b, M)  # [B, Hq, nqb, D]
        kp = _block_mean(k_perm, b, n)  # [B, Hkv, nkb, D]
        s = torch.matmul(qp.view(B, Hkv, G * nqb, D), kp.transpose(-1, -2)).view(B, Hq, nqb, nkb)
        s = s * softmax_scale(scale, D)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num_(0.0)
        sel = _cover(p, p.new_zeros(*p.shape[:3], 1), allowed, config, n, M)  # tau of the off-diagonal estimate
        if extra is not None:
            sel = sel | extra
    return _index_lists(sel, perm, config, n, M)


def select_by_mass(mass: Tensor, perm: Tensor, config: PBSConfig, n: int, m: int,
                   extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(kv_count, kv_index)`` from block masses ``mass [B, Hq, nqb, nkb]`` (per query block, the share
    of its attention on each permuted key block, summing to 1 over the blocks it sees).

    Per query block and head: the fewest off-diagonal blocks with the largest mass whose mass, added
    to the own segment's, reaches ``tau`` of the whole; plus ``config.local`` segments and the sink.
    With ``select_per="segment"`` a query segment's blocks share one such set, ranked by their mean
    mass and long enough for each of them (:class:`PBSConfig`). The sampled estimate
    (:func:`sampled_mass`) and the true mass (an oracle, for measurements:
    :func:`graphtune.codegen.pbs_attention.stats.oracle_plan`) both select through it.
    """
    allowed, same = _segments(config, n, m, mass.device)
    if float(config.tau) >= 1.0:
        return _index_lists(allowed.expand(mass.shape), perm, config, n, m)
    own = (mass * same).sum(-1, keepdim=True)  # the own segment's mass
    sel = _cover(mass, own, allowed, config, n, m)
    if extra is not None:  # blocks added regardless of the estimate (peak_blocks), [B, Hq, nqb, nkb]
        sel = sel | extra
    return _index_lists(sel, perm, config, n, m)


def peak_blocks(q: Tensor, k_perm: Tensor, config: PBSConfig, n: int) -> Tensor:
    """``[B, Hq, nqb, nkb]`` bool: each query row's ``config.peaks`` earlier-segment key blocks with the
    highest *bound* on its scores, OR-ed over the row's selection group (:func:`query_groups`).

    The bound (Quest's): for a block's keys with elementwise max ``kmax`` and min ``kmin``,
    ``q . k <= relu(q) . kmax + min(q, 0) . kmin`` for every key ``k`` of the block. Blocks of
    earlier segments are whole (segments are multiples of ``b``), so only those are bounded.
    """
    B, Hq, M, D = q.shape
    Hkv = k_perm.shape[1]
    G = Hq // Hkv
    b, S = config.block, config.segment
    nkb, nqb = -(-n // b), -(-M // b)
    nfull = min(n // b, ((n - 1) // S) * S // b)  # blocks of segments before the last query's
    hit = torch.zeros(B, Hq, nqb * b, nkb, dtype=torch.bool, device=q.device)
    if nfull and config.peaks:
        kb = k_perm[:, :, : nfull * b].float().view(B, Hkv, nfull, b, D)
        kmax, kmin = kb.amax(3), kb.amin(3)  # [B, Hkv, nfull, D]
        qg = q.float().reshape(B, Hkv, G * M, D)  # a GQA group's heads along the rows: K/V never repeated
        ub = (qg.clamp_min(0) @ kmax.transpose(-1, -2) + qg.clamp_max(0) @ kmin.transpose(-1, -2)).view(B, Hq, M, nfull)
        allowed, _ = _segments(config, n, M, q.device)  # [nqb, nkb]: blocks of segments before each query block's
        rows_allowed = allowed[torch.arange(M, device=q.device) // b, :nfull]  # [M, nfull]: a row's is its block's
        ub.masked_fill_(~rows_allowed, float("-inf"))
        top = ub.topk(min(config.peaks, nfull), -1)
        hit[:, :, :M].scatter_(-1, top.indices, torch.isfinite(top.values))
    per_block = hit.view(B, Hq, nqb, b, nkb).any(3)
    return group_reduce(per_block.to(torch.uint8), config, n, M, "amax").bool()


def _segments(config: PBSConfig, n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    # ([nqb, nkb] key block in an earlier segment than the query block's, [nqb, nkb] in the same one)
    b, S = config.block, config.segment
    qseg = (torch.arange(-(-m // b), device=device) * b + n - m) // S  # segment of each query block
    kseg = torch.arange(-(-n // b), device=device) * b // S
    return kseg[None, :] < qseg[:, None], kseg[None, :] == qseg[:, None]


def _index_lists(sel: Tensor, perm: Tensor, config: PBSConfig, n: int, m: int) -> tuple[Tensor, Tensor]:
    # sel [B, Hq, nqb, nkb] bool -> (+ local segments, + sink) -> (kv_count, kv_index), pads in range
    b, S = config.block, config.segment
    B, Hq, nqb, nkb = sel.shape
    G = Hq // perm.shape[1]
    allowed, _ = _segments(config, n, m, sel.device)
    if config.local:
        # the `local` segments right before each query block's own: always computed (local context)
        qseg = (torch.arange(nqb, device=sel.device) * b + n - m) // S
        kseg = torch.arange(nkb, device=sel.device) * b // S
        sel = sel | (allowed & (kseg[None, :] >= qseg[:, None] - config.local))
    if config.sink:
        # the block holding original token 0 (position of 0 in its kv head's permutation)
        sink = (perm == 0).float().argmax(-1) // b  # [B, Hkv]
        sink = sink.repeat_interleave(G, 1)  # [B, Hq]
        hit = torch.nn.functional.one_hot(sink, nkb).bool()[:, :, None, :] & allowed
        sel = sel | hit
    count = sel.sum(-1)
    C = max(1, int(count.max()))
    idx = torch.where(sel, torch.arange(nkb, device=sel.device), nkb).sort(-1).values[..., :C]
    last = (idx.gather(-1, (count - 1).clamp_min(0)[..., None]))  # pad with the last valid block (in range)
    idx = torch.where(idx >= nkb, last, idx).clamp_max(nkb - 1)
    return count.to(torch.int32), idx.to(torch.int32).contiguous()


def plan_pbs(q: Tensor, k: Tensor, config: PBSConfig = DEFAULT_CONFIG, scale: float | None = None,
             v: Tensor | None = None) -> PBSPlan:
    """Plan one PBS attention call: permutation (:func:`permute_keys`) and selection (:func:`select_blocks`).

    Parameters
    ----------
    q : Tensor
        ``[B, Hq, M, D]``, the last ``M`` positions' queries (after RoPE).
    k : Tensor
        ``[B, Hkv, N, D]`` all keys.
    config : PBSConfig
        Block, segment, tau, permutation on/off, sink.
    scale : float, optional
        Softmax scale (default ``1/sqrt(D)``).

    Returns
    -------
    PBSPlan

    Examples
    --------
    >>> import torch
    >>> q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 1, 300, 16)
    >>> p = plan_pbs(q, k, PBSConfig(block=32, segment=64, tau=0.5))
    >>> p.kv_index.shape[:3], p.perm.shape
    (torch.Size([1, 2, 10]), torch.Size([1, 1, 300]))
    """
    check_qkv(q, k, k if v is None else v, config)
    with torch.no_grad():
        perm = permute_keys(q, k, config, scale)
        k_perm = permute_rows(k, perm) if config.permute else k
        count, index = select_blocks(q, k_perm, perm, config, k.shape[2], scale)
    plan = PBSPlan(config, int(k.shape[2]), int(q.shape[2]), perm, count, index)
    if config.permute:
        plan.memo["k_perm"] = k_perm  # the permuted keys the selection saw (one per KV head)
        plan.memo["k_perm_of"] = tensor_signature(k)  # which keys: an implementation reuses k_perm only for these
    return plan


def tensor_signature(x: Tensor) -> tuple:
    """What identifies ``x``'s current contents cheaply: storage, version, shape, strides, dtype."""
    return (x.data_ptr(), x._version, tuple(x.shape), x.stride(), x.dtype)


# ``graphtune tune --accuracy`` stores its per-model result as a record of this kind: not a kernel
# (no tuner or dispatch runs it), valid while the selection code the measured accuracy depends on
# is unchanged (its source hash).
ACCURACY_IMPL = "pbs.accuracy"
SELECTION_HASH = source_hash(sample_rows, permute_keys, query_groups, group_reduce, _cover, _block_mean, sampled_mass,
                             _seg_end, select_blocks, select_by_mass, peak_blocks, _segments, _index_lists)
register_record_kind("pbs_attention", ACCURACY_IMPL, SELECTION_HASH)
