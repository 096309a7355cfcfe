"""A KV cache that stores each shared prefix segment once and attends with the decomposition.

Rows of a batch hold a path of shared segments (a tree: a system prompt shared by all rows,
few-shot blocks shared by subsets, ...) followed by their own suffix, which grows as they
decode. Shared segments are stored once (``[L, Hkv, n, D]``); suffixes live in one padded,
geometrically grown buffer (``[L, B, Hkv, cap, D]``) with per-row lengths, so ragged appends
are cheap. :meth:`SharedPrefixKVCache.attention` runs the exact Hydragen decomposition and
:meth:`SharedPrefixKVCache.plan` describes the sharing as a
:class:`~graphtune.runtime.shared_prefix.SharedPrefixPlan`.

This cache is for graphtune's own runtime and benchmarks; it is not a ``transformers.Cache``
(HF's attention needs each row's full K/V tensor, which is exactly what this cache avoids holding).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from graphtune.codegen.shared_prefix.decompose import Segment, shared_prefix_attention
from graphtune.errors import PlanError, ShapeError
from graphtune.runtime.shared_prefix import SharedPrefixPlan, SharedSegment

__all__ = ["SharedPrefixKVCache"]


class SharedPrefixKVCache:
    """Shared-prefix KV cache for ``batch_size`` rows and ``num_layers`` layers.

    Parameters
    ----------
    batch_size, num_kv_heads, head_dim : int
    num_layers : int
    dtype, device :
        Of the stored K/V.

    Examples
    --------
    >>> import torch
    >>> c = SharedPrefixKVCache(batch_size=4, num_kv_heads=2, head_dim=16)
    >>> c.add_shared([0, 1, 2, 3], torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16))  # system prompt
    0
    >>> c.add_shared([0, 2], torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16))          # few-shot block
    1
    >>> c.append(torch.randn(1, 4, 2, 3, 16), torch.randn(1, 4, 2, 3, 16), lens=torch.tensor([3, 1, 2, 3]))
    >>> c.seq_lens().tolist()
    [133, 101, 132, 103]
    >>> out = c.attention(torch.randn(4, 4, 1, 16), layer=0, enable_gqa=True)
    >>> out.shape, c.nbytes() < c.per_row_nbytes()
    (torch.Size([4, 4, 1, 16]), True)
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        num_layers: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(batch_size, num_kv_heads, head_dim, num_layers) < 1:
            raise ShapeError("SharedPrefixKVCache: batch_size, num_kv_heads, head_dim, num_layers must be >= 1")
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.num_layers = num_layers
        self.dtype, self.device = dtype, torch.device(device)
        self._seg_k: list[Tensor] = []  # each [L, Hkv, n, D]
        self._seg_v: list[Tensor] = []
        self._seg_rows: list[tuple[int, ...]] = []
        self._seg_start: list[int] = []
        self._seg_idx: list[Tensor] = []  # row index tensors, built once
        self._path: list[list[int]] = [[] for _ in range(batch_size)]  # segment ids per row, in order
        self._prefix_len = [0] * batch_size
        self._lens = torch.zeros(batch_size, dtype=torch.long)
        self._suf_k = torch.empty(num_layers, batch_size, num_kv_heads, 0, head_dim, dtype=dtype, device=self.device)
        self._suf_v = torch.empty_like(self._suf_k)

    # -- building -------------------------------------------------------------------------

    def _check_kv(self, k: Tensor, v: Tensor, lead: tuple[int, ...], what: str) -> None:
        want = (self.num_layers, *lead, self.num_kv_heads)
        if k.dim() != len(want) + 2 or tuple(k.shape[: len(want)]) != want or k.shape[-1] != self.head_dim:
            raise ShapeError(f"SharedPrefixKVCache.{what}: k must be {list(want) + ['n', self.head_dim]}, "
                             f"got {list(k.shape)}")
        if v.shape != k.shape:
            raise ShapeError(f"SharedPrefixKVCache.{what}: v {list(v.shape)} != k {list(k.shape)}")

    def add_shared(self, rows: Sequence[int], k: Tensor, v: Tensor) -> int:
        """Append a segment shared by ``rows``, stored once; returns its id.

        ``k``, ``v``: ``[num_layers, Hkv, n, D]``. The rows must currently hold the same segments
        (the sharing is a tree) and no suffix tokens yet.
        """
        rows = tuple(int(r) for r in rows)
        if not rows or len(set(rows)) != len(rows) or not all(0 <= r < self.batch_size for r in rows):
            raise PlanError(f"add_shared: rows {rows} must be distinct rows of the batch of {self.batch_size}")
        self._check_kv(k, v, (), "add_shared")
        paths = {tuple(self._path[r]) for r in rows}
        if len(paths) != 1:
            raise PlanError(f"add_shared: rows {rows} hold different shared segments {sorted(paths)}; a shared "
                            "segment must extend one node of the sharing tree")
        if bool((self._lens[list(rows)] > 0).any()):
            raise PlanError(f"add_shared: some of rows {rows} already have suffix tokens; shared segments come first")
        sid = len(self._seg_k)
        self._seg_k.append(k.to(self.device, self.dtype))
        self._seg_v.append(v.to(self.device, self.dtype))
        self._seg_rows.append(rows)
        self._seg_start.append(self._prefix_len[rows[0]])
        self._seg_idx.append(torch.tensor(rows, device=self.device))
        for r in rows:
            self._path[r].append(sid)
            self._prefix_len[r] += k.shape[-2]
        return sid

    def append(self, k: Tensor, v: Tensor, lens: Tensor | None = None) -> None:
        """Append unique tokens to every row: ``k``, ``v``: ``[num_layers, B, Hkv, n, D]``.

        ``lens`` (``[B]``, each ``<= n``): only the first ``lens[b]`` tokens of row b are appended
        (ragged appends); default all ``n``.
        """
        self._check_kv(k, v, (self.batch_size,), "append")
        n = k.shape[-2]
        lens = torch.full((self.batch_size,), n, dtype=torch.long) if lens is None else lens.to("cpu", torch.long)
        if lens.shape != (self.batch_size,) or bool((lens < 0).any()) or bool((lens > n).any()):
            raise ShapeError(f"append: lens must be [B={self.batch_size}] with 0 <= lens <= {n}, got {lens.tolist()}")
        new = self._lens + lens
        need = int(new.max()) if self.batch_size else 0
        if need > self._suf_k.shape[-2]:
            cap = max(need, 2 * self._suf_k.shape[-2], 16)
            self._suf_k = self._grow(self._suf_k, cap)
            self._suf_v = self._grow(self._suf_v, cap)
        if bool((lens == n).all()) and bool((self._lens == self._lens[0]).all()):
            s = int(self._lens[0])  # common case (decode): one slice copy
            self._suf_k[..., s : s + n, :] = k.to(self.dtype)
            self._suf_v[..., s : s + n, :] = v.to(self.dtype)
        else:
            for b in range(self.batch_size):
                s, m = int(self._lens[b]), int(lens[b])
                self._suf_k[:, b, :, s : s + m] = k[:, b, :, :m].to(self.dtype)
                self._suf_v[:, b, :, s : s + m] = v[:, b, :, :m].to(self.dtype)
        self._lens = new

    def _grow(self, buf: Tensor, cap: int) -> Tensor:
        out = buf.new_zeros(*buf.shape[:-2], cap, buf.shape[-1])
        out[..., : buf.shape[-2], :] = buf
        return out

    # -- reading --------------------------------------------------------------------------

    def seq_lens(self) -> Tensor:
        """Tokens per row (shared + own), ``[B]``."""
        return torch.tensor(self._prefix_len, dtype=torch.long) + self._lens

    def suffix_lens(self) -> Tensor:
        return self._lens.clone()

    def plan(self) -> SharedPrefixPlan:
        """The sharing as a plan over each row's logical key sequence (segments, then suffix)."""
        segs = tuple(SharedSegment(r, s, s + k.shape[-2])
                     for r, s, k in zip(self._seg_rows, self._seg_start, self._seg_k))
        return SharedPrefixPlan(self.batch_size, segs, reason="SharedPrefixKVCache")

    def attention(
        self,
        q: Tensor,
        layer: int = 0,
        is_causal: bool = True,
        scale: float | None = None,
        enable_gqa: bool = False,
        suffix_mode: str = "padded",
    ) -> Tensor:
        """Attention of ``q`` (``[B, Hq, Lq, D]``, the last ``Lq`` tokens of each row) over the cache.

        Exactly equal to attention over each row's concatenated KV; ``is_causal`` is bottom-right
        causal inside the suffix (the new tokens must already be appended).
        """
        return self.attention_with_lse(q, layer, is_causal, scale, enable_gqa, suffix_mode)[0]

    def attention_with_lse(
        self,
        q: Tensor,
        layer: int = 0,
        is_causal: bool = True,
        scale: float | None = None,
        enable_gqa: bool = False,
        suffix_mode: str = "padded",
    ) -> tuple[Tensor, Tensor]:
        """:meth:`attention` that also returns the fp32 log-sum-exp ``[B, Hq, Lq]``."""
        if not 0 <= layer < self.num_layers:
            raise ShapeError(f"attention: layer {layer} out of range [0, {self.num_layers})")
        if q.dim() != 4 or q.shape[0] != self.batch_size:
            raise ShapeError(f"attention: q must be [B={self.batch_size}, Hq, Lq, D], got {list(q.shape)}")
        segs = [Segment(idx, k[layer], v[layer]) for idx, k, v in zip(self._seg_idx, self._seg_k, self._seg_v)]
        ls = int(self._lens.max()) if self.batch_size else 0
        lens = None if bool((self._lens == ls).all()) else self._lens.to(self.device)
        sk = self._suf_k[layer, :, :, :ls]
        sv = self._suf_v[layer, :, :, :ls]
        return shared_prefix_attention(q, segs, sk, sv, suffix_lens=lens, is_causal=is_causal, scale=scale,
                                       enable_gqa=enable_gqa, suffix_mode=suffix_mode)

    def dense(self, layer: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row caches, as a per-row cache would hold them: ``k, v [B, Hkv, S_max, D]``, valid ``[B, S_max]``.

        Keys are right-padded; the bool ``valid`` marks real tokens (for reference attention).
        """
        lens = self.seq_lens()
        S = int(lens.max())
        k = torch.zeros(self.batch_size, self.num_kv_heads, S, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.zeros_like(k)
        for b in range(self.batch_size):
            parts_k = [self._seg_k[s][layer] for s in self._path[b]] + [self._suf_k[layer, b, :, : int(self._lens[b])]]
            parts_v = [self._seg_v[s][layer] for s in self._path[b]] + [self._suf_v[layer, b, :, : int(self._lens[b])]]
            n = int(lens[b])
            k[b, :, :n] = torch.cat(parts_k, dim=-2)
            v[b, :, :n] = torch.cat(parts_v, dim=-2)
        valid = torch.arange(S)[None, :] < lens[:, None]
        return k, v, valid.to(self.device)

    # -- accounting -----------------------------------------------------------------------

    def _elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def nbytes(self, allocated: bool = True) -> int:
        """Bytes of K/V held: shared segments once + suffix buffer (its capacity if ``allocated``)."""
        shared = sum(k.numel() + v.numel() for k, v in zip(self._seg_k, self._seg_v)) * self._elem_bytes()
        if allocated:
            suffix = (self._suf_k.numel() + self._suf_v.numel()) * self._elem_bytes()
        else:
            suffix = int(self._lens.sum()) * self._token_bytes()
        return shared + suffix

    def _token_bytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self._elem_bytes()

    def per_row_nbytes(self, padded: bool = False) -> int:
        """Bytes a per-row cache of the same tokens holds (every row its full copy of the prefix).

        ``padded=True``: as HF's rectangular cache, ``B * max_len`` tokens.
        """
        lens = self.seq_lens()
        tokens = self.batch_size * int(lens.max()) if padded else int(lens.sum())
        return tokens * self._token_bytes()
