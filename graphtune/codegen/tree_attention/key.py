"""The tree-attention family's tuning key: :class:`TreeShape` (one verification step) and :func:`tree_key`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from graphtune.codegen.tuning_key import DTYPES, ShapeKey, check_shape, dtype_name, pow2_bucket
from graphtune.errors import OptionError, ShapeError

__all__ = ["TREE_OP", "TREES", "TreeShape", "tree_key", "tree_parents", "parse_tree_shape"]

TREE_OP = "tree_attention"
TREES = ("chain", "tree")
_PAD = 3  # free pool slots after each row's keys (the pool is not tightly packed)


def tree_key(batch: int, heads: int, kv_heads: int, head_dim: int, max_n: int, max_ctx: int, tree: str,
             dtype: str | torch.dtype) -> ShapeKey:
    """Tuning key of a verification step: exact ``b<pow2 B>_h<Hq>_kvh<Hkv>_d<D>_<tree>_<dtype>``,
    ``q_bucket`` = pow2 of the largest row's tokens, ``kv_bucket`` = pow2 of the longest context.

    ``tree`` is ``"chain"`` when every row's draft is a chain (one shared mask per group on the
    CPU), else ``"tree"``.

    >>> tree_key(8, 9, 3, 64, 5, 1000, "chain", torch.float32)
    ShapeKey(op='tree_attention', shape_key='b8_h9_kvh3_d64_chain_float32', q_bucket=8, kv_bucket=1024)
    """
    exact = f"b{pow2_bucket(batch)}_h{heads}_kvh{kv_heads}_d{head_dim}_{tree}_{dtype_name(dtype)}"
    return ShapeKey(TREE_OP, exact, pow2_bucket(max_n), pow2_bucket(max_ctx))


def tree_parents(n: int, tree: str, g: torch.Generator | None = None) -> list[int]:
    """Row-local parents of an ``n``-token draft: a chain, or a random tree (one root, parents drawn before).

    >>> tree_parents(4, "chain")
    [-1, 0, 1, 2]
    """
    if tree == "chain":
        return list(range(-1, n - 1))
    return [-1] + [int(torch.randint(0, j, (), generator=g)) for j in range(1, n)]


@dataclass(frozen=True)
class TreeShape:
    """One verification step: ``batch`` rows of ``n`` query tokens over ``ctx_len`` context keys each.

    The op's arguments: ``q [heads, batch * n, head_dim]``, a pool ``k, v [kv_heads, S, head_dim]``
    with row ``i``'s keys at ``kv_start = i * (ctx_len + n + 3)`` (evenly spaced, as a slot-per-row
    engine lays them out), ``ctx_len``, ``cu_q`` and ``parent`` (chains, or random trees per row).

    Examples
    --------
    >>> s = TreeShape(8, 9, 3, 64, 1000, 5)
    >>> s.key().shape_key, s.key().q_bucket, s.key().kv_bucket
    ('b8_h9_kvh3_d64_chain_float32', 8, 1024)
    >>> [tuple(a.shape) for a in s.make_args()[:4]]
    [(9, 40, 64), (3, 8064, 64), (3, 8064, 64), (8,)]
    """

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    ctx_len: int
    n: int
    tree: str = "chain"
    dtype: str = "float32"
    op = TREE_OP

    def __post_init__(self) -> None:
        check_shape(self, ("batch", "heads", "kv_heads", "head_dim", "n"))
        if not isinstance(self.ctx_len, int) or self.ctx_len < 0:
            raise ShapeError(f"TreeShape.ctx_len must be an int >= 0, got {self.ctx_len!r}")
        if self.tree not in TREES:
            raise ShapeError(f"TreeShape.tree {self.tree!r} is not one of {TREES}")

    @classmethod
    def examples(cls) -> tuple["TreeShape", ...]:
        """Small problems that, together, every implementation of the op supports (tests)."""
        return (cls(2, 4, 2, 32, 40, 4, "tree"),)

    @property
    def tokens(self) -> int:
        return self.batch * self.n

    @property
    def pool_slots(self) -> int:
        return self.batch * (self.ctx_len + self.n + _PAD)

    def key(self) -> ShapeKey:
        return tree_key(self.batch, self.heads, self.kv_heads, self.head_dim, self.n, self.ctx_len, self.tree,
                        self.dtype)

    def _index(self, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed + 1)
        step = self.ctx_len + self.n + _PAD
        parent = [p for _ in range(self.batch) for p in tree_parents(self.n, self.tree, g)]
        return (torch.arange(self.batch) * step, torch.full((self.batch,), self.ctx_len),
                torch.arange(self.batch + 1) * self.n, torch.tensor(parent, dtype=torch.int64))

    def make_args(self, seed: int = 0) -> tuple:
        """Random inputs ``(q, k, v, kv_start, ctx_len, cu_q, parent, None)``; the pool's free slots hold keys too."""
        g = torch.Generator().manual_seed(seed)
        dt = DTYPES[self.dtype]
        q = torch.randn(self.heads, self.tokens, self.head_dim, generator=g).to(dt)
        k = torch.randn(self.kv_heads, self.pool_slots, self.head_dim, generator=g).to(dt)
        v = torch.randn(self.kv_heads, self.pool_slots, self.head_dim, generator=g).to(dt)
        return (q, k, v, *self._index(seed), None)

    def meta_args(self, device: str = "meta") -> tuple:
        """Shape-only inputs in the op's argument order (static mode)."""
        dt = DTYPES[self.dtype]
        q = torch.empty(self.heads, self.tokens, self.head_dim, dtype=dt, device=device)
        k = torch.empty(self.kv_heads, self.pool_slots, self.head_dim, dtype=dt, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        return (q, k, k, torch.empty(self.batch, **i64), torch.empty(self.batch, **i64),
                torch.empty(self.batch + 1, **i64), torch.empty(self.tokens, **i64), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def keys_of_call(args: tuple) -> list[ShapeKey]:
        """The tuning key of a ``tree_attention(q, k, v, kv_start, ctx_len, cu_q, parent, scale)`` call
        (reads the index tensors: one host sync each)."""
        q, k, _, kv_start, ctx_len, cu_q, parent = args[:7]
        cu = [int(x) for x in (cu_q.tolist() if isinstance(cu_q, Tensor) else cu_q)]
        par = [int(x) for x in (parent.tolist() if isinstance(parent, Tensor) else parent)]
        ctx = [int(x) for x in (ctx_len.tolist() if isinstance(ctx_len, Tensor) else ctx_len)]
        chain = all(p == (j - cu[i]) - 1 for i in range(len(cu) - 1) for j, p in
                    zip(range(cu[i], cu[i + 1]), par[cu[i]:cu[i + 1]]))
        return [tree_key(len(cu) - 1, int(q.shape[0]), int(k.shape[0]), int(q.shape[2]),
                         max(b - a for a, b in zip(cu[:-1], cu[1:])), max(ctx), "chain" if chain else "tree",
                         q.dtype)]

    def __str__(self) -> str:
        return (f"tree B={self.batch} H={self.heads}/{self.kv_heads} D={self.head_dim} ctx={self.ctx_len} "
                f"n={self.n} {self.tree} {self.dtype}")


def parse_tree_shape(text: str) -> TreeShape:
    """Parse ``B,H,KVH,D,CTX,N[,tree][,dtype]``.

    >>> parse_tree_shape("16,9,3,64,2048,4,tree")
    TreeShape(batch=16, heads=9, kv_heads=3, head_dim=64, ctx_len=2048, n=4, tree='tree', dtype='float32')
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        nums = [int(x) for x in parts[:6]]
        rest = parts[6:]
        if len(nums) != 6 or len(rest) > 2:
            raise ValueError("want B,H,KVH,D,CTX,N[,tree][,dtype]")
        tree = next((r for r in rest if r in TREES), "chain")
        dts = [r for r in rest if r not in TREES]
        return TreeShape(*nums, tree=tree, dtype=dts[0] if dts else "float32")
    except (ValueError, ShapeError) as e:
        raise OptionError(f"tree shape {text!r} is not B,H,KVH,D,CTX,N[,tree][,dtype] ({e})") from None
