"""The lean-decode family's tuning key: :class:`LeanShape` (a ragged batch) and :func:`lean_key`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from graphtune.codegen.tuning_key import DTYPES, ShapeKey, check_shape, pow2_bucket
from graphtune.errors import OptionError, ShapeError

__all__ = ["LEAN_OP", "LeanShape", "lean_key", "parse_lean_shape"]

LEAN_OP = "lean_decode"  # lean (stream-K) decode over a ragged, padded batch: tile and worker counts


def lean_key(lengths: Sequence[int], heads: int, kv_heads: int, head_dim: int, q_len: int = 1,
             dtype: str | torch.dtype = "float32") -> ShapeKey:
    """Tuning key of a lean-decode batch: exact ``b<pow2 B>_h<Hq>_kvh<Hkv>_d<D>_q<pow2 q_len>_<dtype>``;
    ``q_bucket`` = pow2 of the longest row, ``kv_bucket`` = pow2 of the real keys of all rows.

    The two buckets describe a ragged batch compactly: with ``B`` fixed by the exact part, their
    ratio is the skew (a 1x32K + 31x1K batch is ``(32768, 65536)``, a uniform 32x2K one
    ``(2048, 65536)``), and the lookup's log2 distance finds the nearest tuned batch.

    >>> lean_key([32768] + [1024] * 31, 8, 8, 64)
    ShapeKey(op='lean_decode', shape_key='b32_h8_kvh8_d64_q1_float32', q_bucket=32768, kv_bucket=65536)
    """
    dt = str(dtype).removeprefix("torch.")
    exact = f"b{pow2_bucket(len(lengths))}_h{heads}_kvh{kv_heads}_d{head_dim}_q{pow2_bucket(q_len)}_{dt}"
    return ShapeKey(LEAN_OP, exact,
                    pow2_bucket(max(lengths)), pow2_bucket(sum(lengths)))


@dataclass(frozen=True)
class LeanShape:
    """One lean-decode problem: a left-padded ragged batch of real KV ``lengths`` (op ``lean_decode``).

    The op takes attention's arguments: ``q [B, heads, q_len, head_dim]``, ``k, v [B, kv_heads,
    max(lengths), head_dim]`` (the padded cache) and a bool ``[B, 1, q_len, S]`` mask that allows
    each row's real keys (bottom-right causal among them when ``q_len > 1``, as in speculative
    verification), so the reference is :func:`graphtune.ir.reference.attention_ref` on the padded
    batch, i.e. attention over the unpadded rows. Keyed by :func:`lean_key`.

    Parameters
    ----------
    lengths : tuple of int
        Real KV length per row (each >= ``q_len``).
    heads, kv_heads, head_dim, q_len : int
        ``heads`` a multiple of ``kv_heads`` (GQA); ``q_len`` <= 16.
    dtype : str

    Examples
    --------
    >>> s = LeanShape((300, 20, 7), 4, 2, 16)
    >>> s.key().shape_key, s.key().q_bucket, s.key().kv_bucket
    ('b4_h4_kvh2_d16_q1_float32', 512, 512)
    """

    lengths: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    q_len: int = 1
    dtype: str = "float32"
    op = LEAN_OP

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(self.lengths))
        check_shape(self, ("heads", "kv_heads", "head_dim", "q_len"))
        if not self.lengths or any(not isinstance(n, int) or n < self.q_len for n in self.lengths):
            raise ShapeError(f"LeanShape.lengths must be a non-empty list of ints >= q_len={self.q_len}, "
                             f"got {self.lengths[:8]!r}")
        if self.q_len > 16:
            raise ShapeError(f"LeanShape.q_len {self.q_len} is not a decode width (<= 16)")

    @classmethod
    def examples(cls) -> tuple["LeanShape", ...]:
        """Small problems that, together, every implementation of the op supports (tests)."""
        return (cls((64, 20, 7), 4, 2, 32),)

    def key(self) -> ShapeKey:
        return lean_key(self.lengths, self.heads, self.kv_heads, self.head_dim, self.q_len, self.dtype)

    def _mask(self) -> Tensor:
        B, S, lq = len(self.lengths), max(self.lengths), self.q_len
        j = torch.arange(S)[None, None, :]
        starts = torch.tensor([S - n for n in self.lengths])[:, None, None]  # left padding, as HF
        allowed = (j >= starts).expand(B, lq, S)
        if lq > 1:  # bottom-right causal: query i sees keys <= S - lq + i
            allowed = allowed & (j <= S - lq + torch.arange(lq)[None, :, None])
        return allowed[:, None]  # [B, 1, lq, S]

    def make_args(self, seed: int = 0) -> tuple:
        """Random inputs ``(q, k, v, mask, False, None, enable_gqa)``; the padding holds random keys too."""
        g = torch.Generator().manual_seed(seed)
        dt = DTYPES[self.dtype]
        B, S = len(self.lengths), max(self.lengths)
        q = torch.randn(B, self.heads, self.q_len, self.head_dim, generator=g).to(dt)
        k = torch.randn(B, self.kv_heads, S, self.head_dim, generator=g).to(dt)
        v = torch.randn(B, self.kv_heads, S, self.head_dim, generator=g).to(dt)
        return (q, k, v, self._mask(), False, None, self.heads != self.kv_heads)

    def meta_args(self, device: str = "meta") -> tuple:
        """Shape-only inputs in the op's argument order."""
        dt, B, S = DTYPES[self.dtype], len(self.lengths), max(self.lengths)
        q = torch.empty(B, self.heads, self.q_len, self.head_dim, dtype=dt, device=device)
        k = torch.empty(B, self.kv_heads, S, self.head_dim, dtype=dt, device=device)
        mask = torch.empty(B, 1, self.q_len, S, dtype=torch.bool, device=device)
        return (q, k, k, mask, False, None, self.heads != self.kv_heads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        n = self.lengths
        return (f"lean B={len(n)} len={min(n)}..{max(n)} sum={sum(n)} H={self.heads}/{self.kv_heads} "
                f"L={self.q_len} D={self.head_dim} {self.dtype}")


def parse_lean_shape(text: str) -> LeanShape:
    """Parse ``LENGTHS,H,KVH,D[,q_len][,dtype]`` (the CLI's ``--lean``); ``LENGTHS`` is ``+``-separated
    ``N`` (one row of N keys) or ``NxCOUNT`` (COUNT rows of N keys).

    >>> s = parse_lean_shape("32768+1024x31,8,8,64")
    >>> len(s.lengths), max(s.lengths), s.q_len
    (32, 32768, 1)
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        lengths: list[int] = []
        for part in parts[0].split("+"):
            n, sep, count = part.partition("x")
            lengths += [int(n)] * (int(count) if sep else 1)
        nums = [int(x) for x in parts[1:] if x.isdigit()]
        rest = [x for x in parts[1:] if not x.isdigit()]
        if len(nums) not in (3, 4) or len(rest) > 1 or parts[1:len(nums) + 1] != [str(x) for x in nums]:
            raise ValueError("want LENGTHS,H,KVH,D[,q_len][,dtype]")
        return LeanShape(tuple(lengths), *nums, dtype=rest[0] if rest else "float32")
    except (ValueError, ShapeError) as e:
        raise OptionError(f"lean shape {text!r} is not LENGTHS,H,KVH,D[,q_len][,dtype] with LENGTHS like "
                          f"32768+1024x31 ({e})") from None
