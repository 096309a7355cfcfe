"""The merge_states family's tuning key: :class:`MergeShape`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from graphtune.codegen.tuning_key import DTYPES, ShapeKey, check_shape, pow2_bucket
from graphtune.errors import OptionError, ShapeError

__all__ = ["MERGE_OP", "MergeShape", "key_for_merge_args", "parse_merge_shape"]

MERGE_OP = "merge_states"


@dataclass(frozen=True)
class MergeShape:
    """One ``merge_states`` problem: ``n_partials`` pairs ``out [batch, heads, q_len, head_dim]``, ``lse [batch, heads, q_len]``.

    Keyed by batch bucket, heads, head dim and dtype (exact) and the pow2 buckets of ``q_len``
    (``q_bucket``) and of ``n_partials`` (``kv_bucket``: merge cost grows with it).

    >>> MergeShape(4, 1, 32, 1, 128).key().shape_key
    'b1_h32_d128_float32'
    """

    n_partials: int
    batch: int
    heads: int
    q_len: int
    head_dim: int
    dtype: str = "float32"
    op = MERGE_OP

    def __post_init__(self) -> None:
        check_shape(self, ("n_partials", "batch", "heads", "q_len", "head_dim"), gqa=False)

    @classmethod
    def examples(cls) -> tuple["MergeShape", ...]:
        """Small problems that, together, every implementation of the op supports (tests)."""
        return (cls(2, 1, 4, 1, 32),)

    @staticmethod
    def keys_of_call(args: tuple) -> list[ShapeKey]:
        """The tuning key of a ``merge_states(outs, lses)`` call."""
        return [key_for_merge_args(args)]

    def key(self) -> ShapeKey:
        return ShapeKey(MERGE_OP, f"b{pow2_bucket(self.batch)}_h{self.heads}_d{self.head_dim}_{self.dtype}",
                        pow2_bucket(self.q_len), pow2_bucket(self.n_partials))

    def make_args(self, seed: int = 0) -> tuple:
        """``(outs, lses)`` with some empty partials (``lse = -inf``), as the rewrites produce."""
        g = torch.Generator().manual_seed(seed)
        shape = (self.batch, self.heads, self.q_len)
        outs = [torch.randn(*shape, self.head_dim, generator=g).to(DTYPES[self.dtype]) for _ in range(self.n_partials)]
        lses = [torch.randn(*shape, generator=g) * 4 for _ in range(self.n_partials)]
        if self.n_partials > 1:
            lses[-1][..., ::3] = float("-inf")
        return (outs, lses)

    def meta_args(self, device: str = "meta") -> tuple:
        """Shape-only ``(outs, lses)`` for static mode."""
        shape = (self.batch, self.heads, self.q_len)
        outs = [torch.empty(*shape, self.head_dim, dtype=DTYPES[self.dtype], device=device)] * self.n_partials
        return (outs, [torch.empty(*shape, device=device)] * self.n_partials)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"merge N={self.n_partials} B={self.batch} H={self.heads} L={self.q_len} D={self.head_dim} {self.dtype}"

    @classmethod
    def from_args(cls, args: tuple) -> "MergeShape":
        outs, _ = args  # (outs, lses)
        o = outs[0]
        dims = list(o.shape[:-1])
        L = dims[-1] if dims else 1
        H = dims[-2] if len(dims) >= 2 else 1
        B = 1
        for d in dims[:-2]:
            B *= int(d)
        return cls(len(outs), int(B), int(H), int(L), int(o.shape[-1]), str(o.dtype).removeprefix("torch."))


def key_for_merge_args(args: tuple) -> ShapeKey:
    """Tuning key of a ``merge_states(outs, lses)`` call."""
    return MergeShape.from_args(args).key()


def parse_merge_shape(text: str) -> MergeShape:
    """Parse ``N,B,H,L,D[,dtype]`` (the CLI's ``--merge``).

    >>> parse_merge_shape("4,1,32,1,128")
    MergeShape(n_partials=4, batch=1, heads=32, q_len=1, head_dim=128, dtype='float32')
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        nums = [int(x) for x in parts[:5]]
        if len(nums) != 5 or len(parts) > 6:
            raise ValueError
        return MergeShape(*nums, dtype=parts[5] if len(parts) == 6 else "float32")
    except (ValueError, ShapeError) as e:
        raise OptionError(f"merge shape {text!r} is not N,B,H,L,D[,dtype] ({e})") from None
