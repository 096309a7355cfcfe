"""Shared-prefix plans: which batch rows share which key ranges, and how they are found.

A :class:`SharedPrefixPlan` is a tree of :class:`SharedSegment` (a system prompt shared by all
rows, few-shot blocks shared by subsets, ...); each row's segments tile ``[0, suffix_start(row))``
and everything after is the row's own suffix. :func:`detect_shared_prefixes` builds one from a
prompt batch (ids, padding and positions). Running a plan lives in
:mod:`graphtune.runtime.shared_prefix`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from graphtune import flags
from graphtune.errors import PlanError

__all__ = ["SharedSegment", "SharedPrefixPlan", "DEFAULT_MIN_PREFIX", "DEFAULT_MIN_ROWS", "thresholds",
           "detect_shared_prefixes"]

# Measured on this CPU (benchmarks/bench_shared_prefix.py::test_threshold_sweep; decode, 8 heads,
# d=64, suffix 32, fp32, 1 thread, SDPA over the duplicated cache / decomposition):
#   B=4: P=256 0.71x, P=512 1.14x;  B=6: P=256 0.99x, P=384 1.28x;  B=8: P=128 0.79x, P=256 3.2x;
#   B=16: P=128 ~1x (noisy), P=256 4.0x;  B=32: P=256 1.9-6x.
# The gain jumps once the duplicated cache no longer stays in cache; below that the extra calls
# and the merge cost more than they save. 256 tokens and 8 rows is the smallest rule of that
# form at which every measured point pays (it happens to be vLLM's GPU rule too).
DEFAULT_MIN_PREFIX = 256
DEFAULT_MIN_ROWS = 8



@dataclass(frozen=True)
class SharedSegment:
    """Key range ``[start, end)`` whose K/V is identical in every row of ``rows``."""

    rows: tuple[int, ...]
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SharedPrefixPlan:
    """Which rows share which key ranges; validated on construction.

    Parameters
    ----------
    batch_size : int
    segments : tuple of :class:`SharedSegment`
        A row's segments must tile ``[0, e)`` without gap or overlap (tree levels along its path);
        ``e`` is where the row's own suffix starts.
    reason : str
        Why the plan was made (shown by :meth:`describe`).

    Examples
    --------
    >>> plan = SharedPrefixPlan(4, (SharedSegment((0, 1, 2, 3), 0, 100), SharedSegment((0, 2), 100, 130)))
    >>> plan.suffix_starts
    (130, 100, 130, 100)
    """

    batch_size: int
    segments: tuple[SharedSegment, ...]
    reason: str = ""
    suffix_starts: tuple[int, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        B = self.batch_size
        if B < 1:
            raise PlanError(f"shared-prefix plan: batch_size must be >= 1, got {B}")
        per_row: list[list[tuple[int, int, int]]] = [[] for _ in range(B)]
        for i, s in enumerate(self.segments):
            if s.start < 0 or s.end < s.start:
                raise PlanError(f"segment {i}: bad key range [{s.start}, {s.end})")
            if len(set(s.rows)) != len(s.rows) or not s.rows:
                raise PlanError(f"segment {i}: rows {s.rows} must be non-empty and distinct")
            for r in s.rows:
                if not 0 <= r < B:
                    raise PlanError(f"segment {i}: row {r} out of range for batch size {B}")
                per_row[r].append((s.start, s.end, i))
        starts = []
        for r, segs in enumerate(per_row):
            pos = 0
            for a, b, i in sorted(segs):
                if a != pos:
                    what = "overlaps" if a < pos else "leaves a gap before"
                    raise PlanError(f"row {r}: segment {i} [{a}, {b}) {what} key {pos}; a row's segments must "
                                    "tile its prefix contiguously from key 0")
                pos = b
            starts.append(pos)
        object.__setattr__(self, "suffix_starts", tuple(starts))

    @property
    def max_end(self) -> int:
        return max(self.suffix_starts)

    def shared_tokens_saved(self) -> int:
        """Token positions of KV not read (or stored) again thanks to sharing."""
        return sum(s.length * (len(s.rows) - 1) for s in self.segments)

    def describe(self) -> str:
        """One line per segment: rows, key range, and the reason for the plan."""
        lines = [f"shared-prefix plan: batch {self.batch_size}, {len(self.segments)} shared segment(s)"
                 + (f" ({self.reason})" if self.reason else "")]
        for s in self.segments:
            rows = f"rows {s.rows[0]}..{s.rows[-1]}" if list(s.rows) == list(range(s.rows[0], s.rows[-1] + 1)) \
                else f"rows {list(s.rows)}"
            lines.append(f"  keys [{s.start}, {s.end}) shared by {len(s.rows)} {rows}")
        return "\n".join(lines)


def thresholds() -> tuple[int, int]:
    """(min shared tokens, min sharing rows) from the flags, -1 meaning the measured default."""
    p, r = flags.get("SHARED_PREFIX_MIN_PREFIX"), flags.get("SHARED_PREFIX_MIN_ROWS")
    return (DEFAULT_MIN_PREFIX if p < 0 else p), (DEFAULT_MIN_ROWS if r < 0 else r)


def detect_shared_prefixes(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    min_prefix: int | None = None,
    min_rows: int | None = None,
    position_ids: Tensor | None = None,
) -> SharedPrefixPlan | None:
    """Find the sharing tree of a prompt batch, or None if no sharing pays.

    Rows share key range ``[a, b)`` when their token ids, padding mask *and* positions agree on
    every position ``< b`` (so their K/V there is identical). Ranges holding fewer than
    ``min_prefix`` *real* (unpadded) tokens or shared by fewer than ``min_rows`` rows are merged
    into the level below: identically padded positions are identical too, but attention never
    reads them (masked), so sharing them saves nothing the decomposition should pay extra calls
    for — skipping padding is lean decode's job (``graphtune.runtime.lean_decode``). Rows of a
    ragged, left-padded batch share only padding: no plan (measured in
    ``benchmarks/bench_hf_loop.py``: such a plan made every decode step gather the cache).

    Parameters
    ----------
    input_ids : LongTensor ``[B, L]``
    attention_mask : ``[B, L]`` 0/1, optional (left padding)
    min_prefix, min_rows : int, optional
        Defaults: :func:`thresholds`.
    position_ids : LongTensor ``[B, L]`` or ``[1, L]``, optional
        Explicit positions (rotary/learned position embeddings make K depend on them).

    Examples
    --------
    >>> import torch
    >>> ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7]])
    >>> detect_shared_prefixes(ids, min_prefix=1, min_rows=2).segments
    (SharedSegment(rows=(0, 1, 2), start=0, end=2), SharedSegment(rows=(0, 1), start=2, end=3))
    >>> pos = torch.tensor([[0, 1, 2, 3], [0, 1, 5, 6], [0, 1, 2, 3]])  # row 1 skips positions
    >>> detect_shared_prefixes(ids, min_prefix=1, min_rows=2, position_ids=pos).segments
    (SharedSegment(rows=(0, 1, 2), start=0, end=2),)
    >>> mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])  # rows 0, 1 share 2 pads + 2 tokens
    >>> detect_shared_prefixes(ids * mask, mask, min_prefix=3, min_rows=2) is None  # 2 real tokens < 3
    True
    """
    mp, mr = thresholds()
    min_prefix = mp if min_prefix is None else min_prefix
    min_rows = max(2, mr if min_rows is None else min_rows)
    if input_ids.dim() != 2:
        raise PlanError(f"detect_shared_prefixes: input_ids must be [B, L], got {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    ids = input_ids.long()
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < L:
            raise PlanError(f"detect_shared_prefixes: attention_mask {tuple(attention_mask.shape)} does not cover "
                            f"input_ids {tuple(input_ids.shape)}")
        # a padded position compares equal only to a padded position: encode the mask in the key
        m = attention_mask[:, -L:].to(torch.bool)
        ids = torch.where(m, ids, -1 - ids)
        # real tokens before each position, per row (rows sharing a range agree on its padding)
        real = torch.cat([m.new_zeros(B, 1, dtype=torch.long), m.long().cumsum(1)], 1)
    else:
        real = None
    keys = ids[:, :, None]  # [B, L, C]: what must agree for two rows to hold the same K/V
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != L:
            raise PlanError(f"detect_shared_prefixes: position_ids {tuple(position_ids.shape)} do not match "
                            f"input_ids {tuple(input_ids.shape)}")
        keys = torch.cat([keys, position_ids.long().expand(B, L)[:, :, None].to(keys.device)], dim=2)
    segments: list[SharedSegment] = []

    # Walk the trie: rows share [start, end); ranges too short to pay are pushed down (kept_start).
    def visit(rows: list[int], start: int, kept_start: int) -> None:
        if len(rows) < min_rows or start >= L:
            return
        block = keys[rows, start:]  # [R, L - start, C]
        diff = (block != block[:1]).any(0).any(-1).nonzero()
        end = start + (int(diff[0]) if diff.numel() else L - start)
        n_real = end - kept_start if real is None else int(real[rows[0], end] - real[rows[0], kept_start])
        if n_real >= min_prefix:
            segments.append(SharedSegment(tuple(rows), kept_start, end))
            kept_start = end
        if end >= L:
            return
        parts: dict[int, list[int]] = {}
        for r, key in zip(rows, keys[rows, end].tolist()):
            parts.setdefault(tuple(key), []).append(r)
        for sub in parts.values():
            visit(sub, end, kept_start)

    visit(list(range(B)), 0, 0)
    if not segments:
        return None
    return SharedPrefixPlan(B, tuple(segments), reason=f">= {min_prefix} shared real tokens and >= {min_rows} rows")
