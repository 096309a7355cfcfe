"""The engine's KV cache: one preallocated slot pool, contiguous ranges per prefix-tree node.

Layout: ``[layers, 2, kv_heads, slots, head_dim]``. A node (a shared prefix, or a row's private
tail + generated tokens) owns one contiguous range of slots, reserved once for everything it will
ever hold, so:

- a decode step writes only the new tokens' K/V (``index_copy_`` of ``T`` tokens per layer; the
  bytes copied per step do not grow with the context);
- attention reads a node's keys as a strided *view* ``pool[l, 0, :, s:e]`` (``[kv_heads, len,
  D]``), never gathered: ATen's CPU flash kernel takes strided inputs, and rows of equal-length
  ranges reserved back to back are one batched view (``as_strided``);
- a shared prefix is stored once, whatever the number of rows reading it.

Why contiguous ranges rather than pages (vLLM, HF continuous batching): pages need a gather (or a
block-table kernel) before every CPU attention call, which is exactly the per-layer copy this
engine exists to avoid; the price is fragmentation, bounded here because an offline batch knows
every node's final size up front (first fit over a coalescing free list).
"""
from __future__ import annotations

import bisect

import torch
from torch import Tensor

from graphtune.errors import PlanError

__all__ = ["KVPool"]


class KVPool:
    """``capacity`` token slots of K and V for every layer, and a first-fit range allocator.

    Examples
    --------
    >>> pool = KVPool(num_layers=2, kv_heads=3, head_dim=8, capacity=100)
    >>> a = pool.alloc(40); b = pool.alloc(60); pool.alloc(1) is None
    True
    >>> pool.free(a, 40); pool.alloc(30)
    0
    >>> pool.keys(1).shape
    torch.Size([3, 100, 8])
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if min(num_layers, kv_heads, head_dim, capacity) < 1:
            raise PlanError(f"KV pool: layers {num_layers}, kv heads {kv_heads}, head dim {head_dim} and "
                            f"capacity {capacity} must all be >= 1")
        self.capacity = capacity
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        # torch.empty: slots are written before they are read (a node's range is filled in order)
        self.data = torch.empty((num_layers, 2, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), sorted, coalesced
        self.used = 0
        self.peak = 0

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.data.element_size()

    def keys(self, layer: int) -> Tensor:
        """``[kv_heads, slots, D]`` keys of a layer (a view)."""
        return self.data[layer, 0]

    def values(self, layer: int) -> Tensor:
        return self.data[layer, 1]

    def alloc(self, n: int) -> int | None:
        """First slot of a free range of ``n`` slots, or None if no free range is that long."""
        if n < 0:
            raise PlanError(f"KV pool: cannot reserve {n} slots")
        if n == 0:  # nothing to store (an entirely shared prompt, one new token): fits even a full pool
            return 0
        for i, (s, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (s + n, length - n)
                self.used += n
                self.peak = max(self.peak, self.used)
                return s
        return None

    def free(self, start: int, n: int) -> None:
        """Return a range to the pool (merged with free neighbours)."""
        if n <= 0:
            return
        if start < 0 or start + n > self.capacity:
            raise PlanError(f"KV pool: range [{start}, {start + n}) is outside the pool of {self.capacity} slots")
        i = bisect.bisect_left(self._free, (start, 0))
        if (i < len(self._free) and self._free[i][0] < start + n) or (i > 0 and sum(self._free[i - 1]) > start):
            raise PlanError(f"KV pool: range [{start}, {start + n}) is already free (double free)")
        self._free.insert(i, (start, n))
        # coalesce with the next, then the previous range
        if i + 1 < len(self._free) and start + n == self._free[i + 1][0]:
            self._free[i] = (start, n + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and sum(self._free[i - 1]) == start:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
        self.used -= n

    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)
