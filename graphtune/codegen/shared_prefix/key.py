"""The shared-prefix family's tuning key: :class:`SuffixMergeShape`, one fused suffix-attention + merge problem.

Op ``shared_prefix_suffix_merge(q, k, v, lens, prior_out, prior_lse, attn_mask, is_causal, scale,
enable_gqa)``: ``B`` rows of ``q_len`` queries, each attending to its own ragged suffix (at most
``suffix_len`` keys, ``lens`` per row) and merged with a prior (shared-prefix) state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from graphtune.codegen.tuning_key import DTYPES, ShapeKey, check_shape, pow2_bucket
from graphtune.errors import ShapeError

__all__ = ["SUFFIX_MERGE_OP", "SuffixMergeShape"]

SUFFIX_MERGE_OP = "shared_prefix_suffix_merge"


@dataclass(frozen=True)
class SuffixMergeShape:
    """``B`` rows, ``heads``/``kv_heads``, ``q_len`` queries over suffixes of up to ``suffix_len`` keys.

    >>> SuffixMergeShape(8, 8, 2, 1, 300, 64).key()
    ShapeKey(op='shared_prefix_suffix_merge', shape_key='b8_h8_kvh2_d64_float32_full', q_bucket=1, kv_bucket=512)
    """

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    suffix_len: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = False
    op = SUFFIX_MERGE_OP

    def __post_init__(self) -> None:
        check_shape(self, ("batch", "heads", "kv_heads", "q_len", "suffix_len", "head_dim"))
        if self.causal and self.suffix_len < self.q_len:
            raise ShapeError(f"SuffixMergeShape: causal suffixes need suffix_len >= q_len ({self.suffix_len} < {self.q_len})")

    @classmethod
    def examples(cls) -> tuple["SuffixMergeShape", ...]:
        """Small problems that, together, every implementation of the op supports (tests)."""
        return (cls(4, 4, 2, 1, 96, 32),)

    def key(self) -> ShapeKey:
        exact = (f"b{pow2_bucket(self.batch)}_h{self.heads}_kvh{self.kv_heads}_d{self.head_dim}_{self.dtype}"
                 f"_{'causal' if self.causal else 'full'}")
        return ShapeKey(SUFFIX_MERGE_OP, exact, pow2_bucket(self.q_len), pow2_bucket(self.suffix_len))

    def make_args(self, seed: int = 0) -> tuple:
        """Random inputs with ragged suffix lengths and a prior state (some rows without one: lse -inf)."""
        g = torch.Generator().manual_seed(seed)
        dt = DTYPES[self.dtype]
        B, Hq, Hkv, L, S, D = self.batch, self.heads, self.kv_heads, self.q_len, self.suffix_len, self.head_dim
        q = torch.randn(B, Hq, L, D, generator=g).to(dt)
        k = torch.randn(B, Hkv, S, D, generator=g).to(dt)
        v = torch.randn(B, Hkv, S, D, generator=g).to(dt)
        lens = torch.randint(max(L, 1) if self.causal else 1, S + 1, (B,), generator=g)
        lens[0] = S
        prior_out = torch.randn(B, Hq, L, D, generator=g).to(dt)
        prior_lse = torch.randn(B, Hq, L, generator=g) * 3
        prior_lse[-1] = float("-inf")  # a row with no prefix keys
        return (q, k, v, lens, prior_out, prior_lse, None, self.causal, None, Hq != Hkv)

    def meta_args(self, device: str = "meta") -> tuple:
        dt = DTYPES[self.dtype]
        B, Hq, Hkv, L, S, D = self.batch, self.heads, self.kv_heads, self.q_len, self.suffix_len, self.head_dim
        q = torch.empty(B, Hq, L, D, dtype=dt, device=device)
        k = torch.empty(B, Hkv, S, D, dtype=dt, device=device)
        lens = torch.empty(B, dtype=torch.long, device=device)
        return (q, k, k, lens, q, torch.empty(B, Hq, L, device=device), None, self.causal, None, Hq != Hkv)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"suffix-merge B={self.batch} H={self.heads}/{self.kv_heads} L={self.q_len} S<={self.suffix_len} "
                f"D={self.head_dim} {self.dtype}{' causal' if self.causal else ''}")
