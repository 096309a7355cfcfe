"""The linear family's tuning key: :class:`LinearShape`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from graphtune.codegen.tuning_key import DTYPES, ShapeKey, check_shape, pow2_bucket
from graphtune.errors import OptionError, ShapeError

__all__ = ["LINEAR_OP", "EXACT_ROWS", "LinearShape", "parse_linear_shape"]

LINEAR_OP = "linear"
EXACT_ROWS = 16  # row counts up to this are keyed exactly (the winner flips between 2, 3 and 4 rows)


@dataclass(frozen=True)
class LinearShape:
    """One ``linear`` problem: ``x [rows, in_features] @ W[out_features, in_features]^T``.

    Keyed exactly by ``out_features``, ``in_features``, dtype and the torch thread count (a
    formulation that splits over threads wins or loses with them), and by the row count: exactly
    up to ``EXACT_ROWS`` rows, by the nearest power-of-two bucket above.

    >>> LinearShape(3, 1536, 576, threads=2).key().shape_key
    'n1536_k576_float32_t2_m3'
    >>> LinearShape(40, 1536, 576, threads=2).key()
    ShapeKey(op='linear', shape_key='n1536_k576_float32_t2_mbig', q_bucket=64, kv_bucket=1)
    """

    rows: int
    out_features: int
    in_features: int
    dtype: str = "float32"
    threads: int = field(default_factory=torch.get_num_threads)
    op = LINEAR_OP
    # operands are timed cycling through copies of at least this many bytes: in a model the
    # weights stream from memory (hundreds of MB per step), never from a warm cache
    cold_bytes = 96 << 20

    def __post_init__(self) -> None:
        check_shape(self, ("rows", "out_features", "in_features", "threads"), gqa=False)

    @classmethod
    def examples(cls) -> tuple["LinearShape", ...]:
        """Small problems every implementation supports (tests)."""
        return (cls(1, 48, 32, threads=1), cls(3, 40, 24, threads=1))

    @staticmethod
    def keys_of_call(args: tuple) -> list[ShapeKey]:
        """The tuning key of a ``linear(x, weight, bias)`` call (at this process's thread count)."""
        x, w = args[0], args[1]
        return [LinearShape(int(x.shape[0]), int(w.shape[0]), int(w.shape[1]),
                            str(x.dtype).removeprefix("torch.")).key()]

    def key(self) -> ShapeKey:
        exact = self.rows <= EXACT_ROWS
        m = f"m{self.rows}" if exact else "mbig"
        return ShapeKey(LINEAR_OP, f"n{self.out_features}_k{self.in_features}_{self.dtype}_t{self.threads}_{m}",
                        self.rows if exact else pow2_bucket(self.rows), 1)

    def make_args(self, seed: int = 0) -> tuple:
        """``(x, weight, None)`` with weights scaled like a trained layer's (``1/sqrt(in)``)."""
        g = torch.Generator().manual_seed(seed)
        dt = DTYPES[self.dtype]
        x = torch.randn(self.rows, self.in_features, generator=g).to(dt)
        w = (torch.randn(self.out_features, self.in_features, generator=g) / self.in_features ** 0.5).to(dt)
        return (x, w, None)

    def meta_args(self, device: str = "meta") -> tuple:
        dt = DTYPES[self.dtype]
        return (torch.empty(self.rows, self.in_features, dtype=dt, device=device),
                torch.empty(self.out_features, self.in_features, dtype=dt, device=device), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"linear M={self.rows} N={self.out_features} K={self.in_features} {self.dtype} threads={self.threads}"


def parse_linear_shape(text: str) -> LinearShape:
    """Parse ``M,N,K[,dtype]`` (the CLI's ``--linear-shape``), at this process's thread count.

    >>> parse_linear_shape("2,49152,576").out_features
    49152
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        nums = [int(x) for x in parts[:3]]
        if len(nums) != 3 or len(parts) > 4:
            raise ValueError
        return LinearShape(*nums, dtype=parts[3] if len(parts) == 4 else "float32")
    except (ValueError, ShapeError) as e:
        raise OptionError(f"linear shape {text!r} is not M,N,K[,dtype] ({e})") from None
