"""Lean-attention (stream-K) work partition for decode over ragged KV — pure host code.

Decode attention of a batch is a set of *outputs*, one per (sequence ``b``, kv head ``h``):
the GQA group of query heads of kv head ``h`` (times the ``q_len`` decode queries) attends to
the ``lengths[b]`` real keys of sequence ``b``. Cut every output's keys into tiles of ``tile``
keys and lay all tiles of all outputs in one linear list, output-major (``o = b * Hkv + h``).
Each of ``num_workers`` workers takes one contiguous, near-equal range of that list (loads
differ by at most one tile), which may cross head and sequence boundaries. A worker's range
splits into *segments*, one per output it touches; an output covered by several segments
is *split* and its partial ``(out, lse)`` are merged exactly afterwards (the reduction map
lists, per output, its segments — always consecutive, since tiles are output-major).

Plan once per batch on the host (:func:`make_plan`); every layer's attention reuses it.

Also here: the HF padding mask → per-row real key ranges (:func:`ranges_from_padding_mask`),
the GPU worker-count heuristic and a static per-SM load model comparing the lean schedule to
a fixed-split FlashDecoding schedule (:func:`static_gpu_view`, printed by ``graphtune lean-plan``, see :mod:`graphtune.cli_lean_plan`).
"""
from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

from graphtune.errors import PlanError

__all__ = [
    "Segment",
    "LeanPlan",
    "make_plan",
    "ranges_from_padding_mask",
    "gpu_num_workers",
    "default_tile",
    "flashdecoding_splits",
    "static_gpu_view",
    "format_static_view",
    "parse_lengths",
]


@dataclass(frozen=True)
class Segment:
    """The part of one output that one worker computes: keys ``[key_lo, key_hi)`` of output ``output``.

    ``partial`` is the slot of this segment's partial ``(out, lse)`` in the scratch buffers when
    the output is split over several segments, or -1 when the segment is the whole output
    (it then writes the final result directly).
    """

    worker: int
    output: int  # b * num_kv_heads + h
    seq: int
    head: int  # kv head
    key_lo: int  # relative to the sequence's first real key
    key_hi: int
    partial: int


@dataclass(frozen=True)
class LeanPlan:
    """A stream-K partition of decode attention work; see the module docstring.

    Attributes
    ----------
    lengths : tuple of int
        Real KV length of each sequence.
    num_kv_heads, tile, num_workers : int
        Planning inputs.
    output_tiles : tuple of int
        Cumulative tile offsets per output, ``len = B * Hkv + 1``; output ``o`` owns global tiles
        ``[output_tiles[o], output_tiles[o + 1])``.
    worker_tiles : tuple of int
        Cumulative tile offsets per worker, ``len = num_workers + 1``.
    segments : tuple of Segment
        In global tile order (so worker-major and output-major at once).
    worker_segments, output_segments : tuple of int
        CSR offsets into ``segments``: worker ``w`` runs ``segments[ws[w]:ws[w+1]]``; output ``o``
        is reduced from ``segments[os[o]:os[o+1]]`` (the reduction map).
    num_partials : int
        Scratch slots needed for segments of split outputs.
    """

    lengths: tuple[int, ...]
    num_kv_heads: int
    tile: int
    num_workers: int
    output_tiles: tuple[int, ...]
    worker_tiles: tuple[int, ...]
    segments: tuple[Segment, ...]
    worker_segments: tuple[int, ...]
    output_segments: tuple[int, ...]
    num_partials: int
    _split: tuple[int, ...] = field(default=(), repr=False)

    @property
    def num_outputs(self) -> int:
        return len(self.lengths) * self.num_kv_heads

    @property
    def total_tiles(self) -> int:
        return self.output_tiles[-1]

    @property
    def split_outputs(self) -> tuple[int, ...]:
        """Outputs computed by more than one segment (they need a reduction)."""
        return self._split

    def worker_load(self, w: int) -> int:
        """Tiles assigned to worker ``w``."""
        return self.worker_tiles[w + 1] - self.worker_tiles[w]

    def summary(self) -> str:
        loads = [self.worker_load(w) for w in range(self.num_workers)]
        return (f"LeanPlan(B={len(self.lengths)}, Hkv={self.num_kv_heads}, tile={self.tile}, "
                f"workers={self.num_workers}, tiles={self.total_tiles}, load={min(loads)}..{max(loads)}, "
                f"segments={len(self.segments)}, split_outputs={len(self._split)}, partials={self.num_partials})")


def _check_int(name: str, value: object, lo: int) -> int:
    # numbers.Integral admits numpy / Python ints; bool is an int but never a sensible count
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PlanError(f"lean plan: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < lo:
        raise PlanError(f"lean plan: {name} must be >= {lo}, got {value}")
    return int(value)


def make_plan(lengths: Sequence[int], num_kv_heads: int, tile: int, num_workers: int) -> LeanPlan:
    """Partition decode attention over ragged KV lengths into contiguous per-worker tile ranges.

    Parameters
    ----------
    lengths : sequence of int
        Real (unpadded) KV length of each sequence, each >= 1.
    num_kv_heads : int
        Key/value heads; each (sequence, kv head) is one output whose query rows are the GQA group.
    tile : int
        Keys per tile, the unit of work balancing.
    num_workers : int
        Threads on a CPU, CTAs (SMs x CTAs per SM) on a GPU.

    Returns
    -------
    LeanPlan
        Worker ranges differ by at most one tile; every tile is covered exactly once.

    Raises
    ------
    PlanError
        On empty batches, lengths < 1, or non-positive heads, tile or workers.

    Examples
    --------
    >>> p = make_plan([1000, 10], num_kv_heads=1, tile=256, num_workers=2)
    >>> p.total_tiles, [p.worker_load(w) for w in range(2)], p.split_outputs
    (5, [3, 2], (0,))
    """
    lengths = tuple(_check_int(f"lengths[{i}]", n, 1) for i, n in enumerate(lengths))
    if not lengths:
        raise PlanError("lean plan: the batch is empty (no sequence lengths)")
    hkv = _check_int("num_kv_heads", num_kv_heads, 1)
    tile = _check_int("tile", tile, 1)
    nw = _check_int("num_workers", num_workers, 1)

    output_tiles = [0]
    for n in lengths:
        t = -(-n // tile)
        for _ in range(hkv):
            output_tiles.append(output_tiles[-1] + t)
    total = output_tiles[-1]
    base, extra = divmod(total, nw)
    worker_tiles = [0]
    for w in range(nw):
        worker_tiles.append(worker_tiles[-1] + base + (1 if w < extra else 0))

    # Walk workers and outputs together: each (worker, output) overlap is one segment.
    segs: list[tuple[int, int, int, int]] = []  # (worker, output, tile_lo, tile_hi) in global tiles
    o = 0
    for w in range(nw):
        lo, hi = worker_tiles[w], worker_tiles[w + 1]
        t = lo
        while t < hi:
            while output_tiles[o + 1] <= t:
                o += 1
            end = min(hi, output_tiles[o + 1])
            segs.append((w, o, t, end))
            t = end
    # How many segments each output has decides whether it is split.
    count = [0] * (len(output_tiles) - 1)
    for _, o, _, _ in segs:
        count[o] += 1
    segments: list[Segment] = []
    n_partials = 0
    for w, o, t0, t1 in segs:
        b, h = divmod(o, hkv)
        first = output_tiles[o]
        k_lo, k_hi = (t0 - first) * tile, min(lengths[b], (t1 - first) * tile)
        slot = -1
        if count[o] > 1:
            slot, n_partials = n_partials, n_partials + 1
        segments.append(Segment(w, o, b, h, k_lo, k_hi, slot))
    worker_segments = [0] * (nw + 1)
    output_segments = [0] * (len(count) + 1)
    for s in segments:
        worker_segments[s.worker + 1] += 1
        output_segments[s.output + 1] += 1
    for i in range(nw):
        worker_segments[i + 1] += worker_segments[i]
    for i in range(len(count)):
        output_segments[i + 1] += output_segments[i]
    split = tuple(o for o, c in enumerate(count) if c > 1)
    return LeanPlan(lengths, hkv, tile, nw, tuple(output_tiles), tuple(worker_tiles), tuple(segments),
                    tuple(worker_segments), tuple(output_segments), n_partials, split)


def ranges_from_padding_mask(mask) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-row ``(starts, lengths)`` of the real keys of an HF ``[B, S]`` 0/1 padding mask.

    Each row's ones must be one contiguous run (left or right padding); raises
    :class:`PlanError` otherwise, or for a row with no real key.

    >>> import torch
    >>> ranges_from_padding_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    ((2, 0), (2, 4))
    """
    import torch

    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise PlanError(f"lean plan: padding mask must be a [B, S] tensor, got {getattr(mask, 'shape', type(mask))}")
    m = mask.detach().to("cpu") != 0
    n = m.sum(dim=1)
    if bool((n == 0).any()):
        raise PlanError(f"lean plan: padding-mask rows {torch.nonzero(n == 0).flatten().tolist()} have no real key")
    start = m.int().argmax(dim=1)
    # contiguous iff the ones span exactly n positions from the first one
    idx = torch.arange(m.shape[1])[None, :]
    want = (idx >= start[:, None]) & (idx < (start + n)[:, None])
    bad = (want != m).any(dim=1)
    if bool(bad.any()):
        raise PlanError(f"lean plan: padding-mask rows {torch.nonzero(bad).flatten().tolist()} are not one contiguous run of ones")
    return tuple(start.tolist()), tuple(n.tolist())


# --------------------------------------------------------------------------------------
# GPU schedule parameters and the static per-SM view
# --------------------------------------------------------------------------------------


def default_tile(head_dim: int) -> int:
    """Keys per tile on a GPU: 256/128/64 for head dim <= 64 / <= 128 / larger (ORT's LeanTile)."""
    return 256 if head_dim <= 64 else 128 if head_dim <= 128 else 64


def gpu_num_workers(total_tiles: int, num_sms: int, tiles_per_output: int = 1) -> int:
    """Persistent CTAs for ``total_tiles``: 2 per SM, fewer when there is little work (ORT's rule)."""
    _check_int("num_sms", num_sms, 1)
    if total_tiles <= 4 * num_sms:
        return max(1, min((total_tiles + 1) // 2, (32 * total_tiles + tiles_per_output - 1) // max(1, tiles_per_output)))
    return 2 * num_sms


def flashdecoding_splits(batch_heads: int, num_sms: int, n_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention-2's split-KV heuristic: fewest splits within 85% of the best wave efficiency.

    ``n_blocks`` is the KV block count of the *longest* sequence; every sequence gets the same
    number of splits (the fixed schedule lean attention improves on).
    """
    if batch_heads >= 0.8 * num_sms:
        return 1
    max_splits = min(max_splits, num_sms, n_blocks)
    eff = []
    for s in range(1, max_splits + 1):
        waves = batch_heads * s / num_sms
        eff.append(waves / math.ceil(waves))
    best = max(eff)
    for s in range(1, max_splits + 1):
        # skip split counts that give the same blocks per split as a smaller one
        if s > 1 and -(-n_blocks // s) == -(-n_blocks // (s - 1)):
            continue
        if eff[s - 1] >= 0.85 * best:
            return s
    return 1


def _greedy_sm_loads(cta_work: Sequence[int], num_sms: int, ctas_per_sm: int) -> list[int]:
    """Per-SM work when CTAs launch in order onto the SM slot that frees up first."""
    slots = [(0, i) for i in range(num_sms * ctas_per_sm)]  # (busy until, slot)
    heapq.heapify(slots)
    sm = [0] * num_sms
    for w in cta_work:
        t, i = heapq.heappop(slots)
        sm[i % num_sms] += w
        heapq.heappush(slots, (t + w, i))
    return sm


def static_gpu_view(lengths: Sequence[int], num_kv_heads: int, num_sms: int, tile: int = 256,
                    splits: Sequence[int | None] = (None,)) -> dict:
    """Model per-SM work (in tiles) of the lean schedule and a fixed-split FlashDecoding schedule.

    Lean: ``gpu_num_workers`` persistent CTAs, 2 per SM, each running one plan range. Fixed
    split: one CTA per (sequence, kv head, split) with the same ``splits`` for every sequence
    (FA2's heuristic from the longest sequence unless given), CTAs scheduled greedily.
    Returns max/mean work per SM for both, plus the reduction sizes.
    """
    hkv = _check_int("num_kv_heads", num_kv_heads, 1)
    tiles = [-(-n // tile) for n in lengths]
    total = sum(tiles) * hkv
    nw = gpu_num_workers(total, num_sms, max(tiles))
    plan = make_plan(lengths, hkv, tile, nw)
    per_sm = max(1, nw // num_sms) if nw >= num_sms else 1
    lean_sm = _greedy_sm_loads([plan.worker_load(w) for w in range(nw)], num_sms, per_sm)
    mean = total / num_sms
    fd = []
    for sp in splits:
        sp = sp or flashdecoding_splits(len(lengths) * hkv, num_sms, max(tiles))
        work = []
        for t in tiles:
            chunk = -(-t // sp)
            for _ in range(hkv):
                work.extend(max(0, min(chunk, t - s * chunk)) for s in range(sp))
        sm_load = _greedy_sm_loads(work, num_sms, 2)
        fd.append({"splits": sp, "ctas": len(work), "max": max(sm_load), "ratio": max(sm_load) / mean,
                   "partials": len(work) if sp > 1 else 0})
    return {
        "num_sms": num_sms, "tile": tile, "total_tiles": total,
        "lean_workers": nw, "lean_max": max(lean_sm), "lean_mean": mean, "lean_ratio": max(lean_sm) / mean,
        "lean_split_outputs": len(plan.split_outputs), "lean_partials": plan.num_partials, "fd": fd,
    }


def format_static_view(rows: Sequence[dict]) -> str:
    """A text table of :func:`static_gpu_view` results (one row per GPU and schedule)."""
    out = [f"{'GPU':<12}{'schedule':<26}{'CTAs':>6}{'max tiles/SM':>14}{'mean':>9}{'max/mean':>10}{'partials':>10}"]
    for r in rows:
        name = r.get("name", f"{r['num_sms']} SMs")
        out.append(f"{name:<12}{'lean (stream-K)':<26}{r['lean_workers']:>6}{r['lean_max']:>14}"
                   f"{r['lean_mean']:>9.1f}{r['lean_ratio']:>10.2f}{r['lean_partials']:>10}")
        for f in r["fd"]:
            out.append(f"{name:<12}{'FlashDecoding splits=' + str(f['splits']):<26}{f['ctas']:>6}{f['max']:>14}"
                       f"{r['lean_mean']:>9.1f}{f['ratio']:>10.2f}{f['partials']:>10}")
    return "\n".join(out)


def parse_lengths(spec: str) -> list[int]:
    """``"131072,1024x31"`` → ``[131072] + [1024] * 31``; raises :class:`PlanError` on bad text."""
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "x" in part:
                n, c = part.split("x")
                out.extend([int(n)] * int(c))
            else:
                out.append(int(part))
        except ValueError:
            raise PlanError(f"lean plan: bad length spec {part!r} (want N or NxCOUNT, comma separated)") from None
    if not out:
        raise PlanError(f"lean plan: no lengths in {spec!r}")
    return out
