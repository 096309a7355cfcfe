"""The PBS family's tuning key: :class:`PBSShape` (one prefill attention call) and :func:`pbs_key`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from graphtune.codegen.pbs_attention.plan import PBSConfig
from graphtune.codegen.tuning_key import DTYPES, ShapeKey, check_shape, dtype_name, pow2_bucket
from graphtune.errors import OptionError, ShapeError

__all__ = ["PBS_OP", "PBSShape", "pbs_key", "parse_pbs_shape"]

PBS_OP = "pbs_attention"


def pbs_key(batch: int, heads: int, kv_heads: int, head_dim: int, m: int, n: int, block: int, segment: int,
            dtype: str | torch.dtype) -> ShapeKey:
    """Tuning key of a PBS call: exact ``b<pow2 B>_h<Hq>_kvh<Hkv>_d<D>_blk<b>_seg<S>_<dtype>``,
    ``q_bucket`` = pow2 of the queries, ``kv_bucket`` = pow2 of the keys.

    >>> pbs_key(1, 9, 3, 64, 8192, 8192, 128, 256, torch.float32)
    ShapeKey(op='pbs_attention', shape_key='b1_h9_kvh3_d64_blk128_seg256_float32', q_bucket=8192, kv_bucket=8192)
    """
    exact = f"b{pow2_bucket(batch)}_h{heads}_kvh{kv_heads}_d{head_dim}_blk{block}_seg{segment}_{dtype_name(dtype)}"
    return ShapeKey(PBS_OP, exact, pow2_bucket(m), pow2_bucket(n))


@dataclass(frozen=True)
class PBSShape:
    """One PBS prefill call: ``m`` queries (the last positions) over ``n`` keys, with the plan's knobs.

    The op's arguments are ``(q [B, Hq, m, D], k, v [B, Hkv, n, D], PBSConfig, scale)``. Random
    inputs get a planted structure (a few heavy keys per segment, a sink), so the selection is
    sparse the way real attention is, not uniform.

    Examples
    --------
    >>> s = PBSShape(1, 4, 2, 32, 1024)
    >>> s.key().shape_key, s.key().q_bucket
    ('b1_h4_kvh2_d32_blk128_seg256_float32', 1024)
    >>> [tuple(a.shape) for a in s.make_args()[:3]]
    [(1, 4, 1024, 32), (1, 2, 1024, 32), (1, 2, 1024, 32)]
    """

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    n: int
    m: int = 0  # 0: m = n (a whole prefill)
    block: int = 128
    segment: int = 256
    tau: float = 0.9
    permute: bool = True
    dtype: str = "float32"
    op = PBS_OP

    def __post_init__(self) -> None:
        check_shape(self, ("batch", "heads", "kv_heads", "head_dim", "n"))
        if self.m == 0:
            object.__setattr__(self, "m", self.n)
        self.pbs_config()  # validates block/segment/tau (first: the check of m divides by block)
        if (not isinstance(self.m, int) or isinstance(self.m, bool) or not 1 <= self.m <= self.n
                or (self.n - self.m) % self.block):
            raise ShapeError(f"PBSShape.m={self.m!r}: want 1 <= m <= n={self.n} with n - m a multiple of "
                             f"block {self.block}")

    def pbs_config(self) -> PBSConfig:
        return PBSConfig(self.block, self.segment, float(self.tau), bool(self.permute))

    @classmethod
    def examples(cls) -> tuple["PBSShape", ...]:
        """Small problems that, together, every implementation of the op supports (tests)."""
        return (cls(1, 4, 2, 32, 600, block=32, segment=64, tau=0.8), cls(2, 2, 1, 16, 320, 192, 64, 128, 0.9))

    def key(self) -> ShapeKey:
        return pbs_key(self.batch, self.heads, self.kv_heads, self.head_dim, self.m, self.n, self.block,
                       self.segment, self.dtype)

    def make_args(self, seed: int = 0) -> tuple:
        """``(q, k, v, PBSConfig, None)``: random inputs with heavy keys planted (see the class docstring)."""
        g = torch.Generator().manual_seed(seed)
        dt = DTYPES[self.dtype]
        B, H, Hk, D, N, M = self.batch, self.heads, self.kv_heads, self.head_dim, self.n, self.m
        q = torch.randn(B, H, M, D, generator=g)
        k = torch.randn(B, Hk, N, D, generator=g)
        v = torch.randn(B, Hk, N, D, generator=g)
        # heavy keys: a shared direction every query leans towards, on ~3% of keys plus key 0
        u = torch.randn(D, generator=g)
        u = u / u.norm()
        heavy = torch.rand(B, Hk, N, generator=g) < 0.03
        heavy[..., 0] = True
        k = k + heavy[..., None] * 3.0 * u
        q = q + 1.5 * u
        return (q.to(dt), k.to(dt), v.to(dt), self.pbs_config(), None)

    def meta_args(self, device: str = "meta") -> tuple:
        """Shape-only inputs in the op's argument order (static mode)."""
        dt = DTYPES[self.dtype]
        q = torch.empty(self.batch, self.heads, self.m, self.head_dim, dtype=dt, device=device)
        k = torch.empty(self.batch, self.kv_heads, self.n, self.head_dim, dtype=dt, device=device)
        return (q, k, k, self.pbs_config(), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def keys_of_call(args: tuple) -> list[ShapeKey]:
        """The tuning key of a ``pbs_attention(q, k, v, pbs, scale)`` call."""
        q, k = args[0], args[1]
        pbs = args[3] if len(args) > 3 and isinstance(args[3], PBSConfig) else PBSConfig()
        return [pbs_key(int(q.shape[0]), int(q.shape[1]), int(k.shape[1]), int(q.shape[3]), int(q.shape[2]),
                        int(k.shape[2]), pbs.block, pbs.segment, q.dtype)]

    def __str__(self) -> str:
        return (f"pbs B={self.batch} H={self.heads}/{self.kv_heads} D={self.head_dim} N={self.n} M={self.m} "
                f"b={self.block} S={self.segment} tau={self.tau:g} {self.dtype}")


def parse_pbs_shape(text: str) -> PBSShape:
    """Parse ``B,H,KVH,D,N[,M][,block][,segment][,dtype]``.

    >>> parse_pbs_shape("1,9,3,64,8192")
    PBSShape(batch=1, heads=9, kv_heads=3, head_dim=64, n=8192, m=8192, block=128, segment=256, tau=0.9, permute=True, dtype='float32')
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        dts = [p for p in parts if p in DTYPES]
        nums = [int(p) for p in parts if p not in DTYPES]
        if not 5 <= len(nums) <= 8 or len(dts) > 1:
            raise ValueError("want B,H,KVH,D,N[,M][,block][,segment][,dtype]")
        names = ("batch", "heads", "kv_heads", "head_dim", "n", "m", "block", "segment")
        return PBSShape(**dict(zip(names, nums)), dtype=dts[0] if dts else "float32")
    except (ValueError, ShapeError) as e:
        raise OptionError(f"PBS shape {text!r} is not B,H,KVH,D,N[,M][,block][,segment][,dtype] ({e})") from None
