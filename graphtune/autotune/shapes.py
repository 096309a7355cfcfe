"""Attention shapes, their tuning-database keys, and example inputs for measuring them.

The key of a tuning record has an *exact* part (``shape_key``: batch bucket, heads, kv heads,
head dims, dtype, mask kind, causality) and a *bucketed* part searched by distance (``q_bucket``,
``kv_bucket``: sequence lengths rounded up to powers of two). Batch is bucketed to a power of two
and kept in the exact part: serving batch sizes vary continuously, the winner rarely flips within
a power-of-two band, and a decode kernel tuned for batch 1 says little about batch 64.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from graphtune.errors import OptionError, ShapeError

__all__ = ["AttentionShape", "MergeShape", "LeanShape", "ShapeKey", "pow2_bucket", "key_for_args", "key_for_merge_args",
           "lean_key", "parse_shape", "parse_merge_shape", "parse_lean_shape", "ATTENTION_OP", "MERGE_OP", "LEAN_OP"]

# Both attention ops are tuned and looked up under this one op name (attention = its out).
ATTENTION_OP = "attention_with_lse"
MERGE_OP = "merge_states"
LEAN_OP = "lean_decode"  # lean (stream-K) decode over a ragged, padded batch: tile and worker counts
_MASKS = ("none", "bool", "additive")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pow2_bucket(n: int) -> int:
    """Smallest power of two ``>= n`` (``0 -> 0``): ``17 -> 32``, ``1 -> 1``."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class ShapeKey:
    """Where a shape lands in the tuning database."""

    op: str
    shape_key: str  # exact part
    q_bucket: int
    kv_bucket: int


@dataclass(frozen=True)
class AttentionShape:
    """One attention problem: ``q [batch, heads, q_len, head_dim]``, ``k, v [batch, kv_heads, kv_len, head_dim]``.

    Parameters
    ----------
    batch, heads, kv_heads, q_len, kv_len, head_dim : int
        Problem sizes; ``heads`` must be a multiple of ``kv_heads`` (GQA).
    dtype : str
        ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    causal : bool
        SDPA's top-left ``is_causal``.
    mask : str
        ``"none"``, ``"bool"`` or ``"additive"`` (an ``[q_len, kv_len]`` mask).

    Examples
    --------
    >>> s = AttentionShape(1, 8, 2, 1, 1000, 64)
    >>> s.key().q_bucket, s.key().kv_bucket
    (1, 1024)
    """

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = False
    mask: str = "none"

    def __post_init__(self) -> None:
        for f in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ShapeError(f"AttentionShape.{f} must be a positive int, got {getattr(self, f)!r}")
        if self.heads % self.kv_heads:
            raise ShapeError(f"AttentionShape: heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.dtype not in _DTYPES:
            raise ShapeError(f"AttentionShape.dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        object.__setattr__(self, "dtype", str(_DTYPES[self.dtype]).removeprefix("torch."))
        if self.mask not in _MASKS:
            raise ShapeError(f"AttentionShape.mask {self.mask!r} is not one of {_MASKS}")

    op = ATTENTION_OP

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def key(self, op: str = ATTENTION_OP) -> ShapeKey:
        exact = (f"b{pow2_bucket(self.batch)}_h{self.heads}_kvh{self.kv_heads}_d{self.head_dim}"
                 f"_dv{self.head_dim}_{self.dtype}_{self.mask}_{'causal' if self.causal else 'full'}")
        return ShapeKey(op, exact, pow2_bucket(self.q_len), pow2_bucket(self.kv_len))

    def make_args(self, seed: int = 0) -> tuple:
        """Random inputs in the op's argument order ``(q, k, v, attn_mask, is_causal, scale, enable_gqa)``."""
        g = torch.Generator().manual_seed(seed)
        dt = self.torch_dtype

        def rnd(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(dt)

        q = rnd(self.batch, self.heads, self.q_len, self.head_dim)
        k = rnd(self.batch, self.kv_heads, self.kv_len, self.head_dim)
        v = rnd(self.batch, self.kv_heads, self.kv_len, self.head_dim)
        mask = None
        if self.mask != "none":
            keep = torch.rand(self.q_len, self.kv_len, generator=g) > 0.2
            keep[:, -1] = True  # no empty rows: timing should not hinge on the mask's luck
            mask = keep if self.mask == "bool" else torch.zeros(keep.shape, dtype=dt).masked_fill(~keep, float("-inf"))
        return (q, k, v, mask, self.causal, None, self.heads != self.kv_heads)

    def meta_args(self, device: str = "meta") -> tuple:
        """Shape-only inputs (no data) in the op's argument order, for static mode."""
        dt = self.torch_dtype
        q = torch.empty(self.batch, self.heads, self.q_len, self.head_dim, dtype=dt, device=device)
        k = torch.empty(self.batch, self.kv_heads, self.kv_len, self.head_dim, dtype=dt, device=device)
        mask = None
        if self.mask != "none":
            mask = torch.empty(self.q_len, self.kv_len, dtype=torch.bool if self.mask == "bool" else dt, device=device)
        return (q, k, k, mask, self.causal, None, self.heads != self.kv_heads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        extra = ("causal " if self.causal else "") + ("" if self.mask == "none" else f"mask={self.mask} ")
        return (f"B={self.batch} H={self.heads}/{self.kv_heads} L={self.q_len} S={self.kv_len} "
                f"D={self.head_dim} {self.dtype} {extra}").strip()

    @classmethod
    def from_args(cls, args: tuple) -> "AttentionShape":
        """The shape of an op call ``(q, k, v, attn_mask, is_causal, ...)``."""
        q, k, v, mask, causal = args[:5]
        if q.dim() not in (3, 4):
            raise ShapeError(f"AttentionShape.from_args: q must be 3-D or 4-D, got {q.dim()}-D")
        B = q.shape[0] if q.dim() == 4 else 1
        kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
        return cls(int(B), int(q.shape[-3]), int(k.shape[-3]), int(q.shape[-2]), int(k.shape[-2]),
                   int(q.shape[-1]), str(q.dtype).removeprefix("torch."), bool(causal), kind)


def key_for_args(args: tuple, op: str = ATTENTION_OP) -> ShapeKey:
    """Tuning key of an attention call; the head dim of v enters the exact part."""
    q, k, v, mask, causal = args[:5]
    B = q.shape[0] if q.dim() == 4 else 1
    kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    exact = (f"b{pow2_bucket(int(B))}_h{q.shape[-3]}_kvh{k.shape[-3]}_d{q.shape[-1]}_dv{v.shape[-1]}"
             f"_{str(q.dtype).removeprefix('torch.')}_{kind}_{'causal' if causal else 'full'}")
    return ShapeKey(op, exact, pow2_bucket(int(q.shape[-2])), pow2_bucket(int(k.shape[-2])))


_SHAPE_RE = re.compile(r"^\s*(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)((?:,[A-Za-z0-9_=]+)*)\s*$")


def parse_shape(text: str) -> AttentionShape:
    """Parse ``B,H,KVH,L,S,D[,dtype][,causal][,mask=bool|additive]`` (the CLI's ``--shape``).

    >>> parse_shape("1,8,2,1,4096,64,bfloat16")
    AttentionShape(batch=1, heads=8, kv_heads=2, q_len=1, kv_len=4096, head_dim=64, dtype='bfloat16', causal=False, mask='none')
    """
    m = _SHAPE_RE.match(text)
    if not m:
        raise OptionError(f"shape {text!r} is not B,H,KVH,L,S,D[,dtype][,causal][,mask=KIND]")
    nums = [int(x) for x in m.groups()[:6]]
    dtype, causal, mask = "float32", False, "none"
    for extra in filter(None, m.group(7).split(",")):
        if extra == "causal":
            causal = True
        elif extra.startswith("mask="):
            mask = extra[5:]
        elif extra in _DTYPES:
            dtype = extra
        else:
            raise OptionError(f"shape {text!r}: unknown field {extra!r} (dtype, 'causal' or 'mask=KIND')")
    try:
        return AttentionShape(*nums, dtype=dtype, causal=causal, mask=mask)
    except ShapeError as e:
        raise OptionError(f"shape {text!r}: {e}") from None


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
        for f in ("n_partials", "batch", "heads", "q_len", "head_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ShapeError(f"MergeShape.{f} must be a positive int, got {getattr(self, f)!r}")
        if self.dtype not in _DTYPES:
            raise ShapeError(f"MergeShape.dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        object.__setattr__(self, "dtype", str(_DTYPES[self.dtype]).removeprefix("torch."))

    def key(self) -> ShapeKey:
        return ShapeKey(MERGE_OP, f"b{pow2_bucket(self.batch)}_h{self.heads}_d{self.head_dim}_{self.dtype}",
                        pow2_bucket(self.q_len), pow2_bucket(self.n_partials))

    def make_args(self, seed: int = 0) -> tuple:
        """``(outs, lses)`` with some empty partials (``lse = -inf``), as the rewrites produce."""
        g = torch.Generator().manual_seed(seed)
        shape = (self.batch, self.heads, self.q_len)
        outs = [torch.randn(*shape, self.head_dim, generator=g).to(_DTYPES[self.dtype]) for _ in range(self.n_partials)]
        lses = [torch.randn(*shape, generator=g) * 4 for _ in range(self.n_partials)]
        if self.n_partials > 1:
            lses[-1][..., ::3] = float("-inf")
        return (outs, lses)

    def meta_args(self, device: str = "meta") -> tuple:
        """Shape-only ``(outs, lses)`` for static mode."""
        shape = (self.batch, self.heads, self.q_len)
        outs = [torch.empty(*shape, self.head_dim, dtype=_DTYPES[self.dtype], device=device)] * self.n_partials
        return (outs, [torch.empty(*shape, device=device)] * self.n_partials)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"merge N={self.n_partials} B={self.batch} H={self.heads} L={self.q_len} D={self.head_dim} {self.dtype}"

    @classmethod
    def from_args(cls, args: tuple) -> "MergeShape":
        outs = args[0]
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
        for f in ("heads", "kv_heads", "head_dim", "q_len"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ShapeError(f"LeanShape.{f} must be a positive int, got {getattr(self, f)!r}")
        if not self.lengths or any(not isinstance(n, int) or n < self.q_len for n in self.lengths):
            raise ShapeError(f"LeanShape.lengths must be a non-empty list of ints >= q_len={self.q_len}, "
                             f"got {self.lengths[:8]!r}")
        if self.q_len > 16:
            raise ShapeError(f"LeanShape.q_len {self.q_len} is not a decode width (<= 16)")
        if self.heads % self.kv_heads:
            raise ShapeError(f"LeanShape: heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.dtype not in _DTYPES:
            raise ShapeError(f"LeanShape.dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        object.__setattr__(self, "dtype", str(_DTYPES[self.dtype]).removeprefix("torch."))

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
        dt = _DTYPES[self.dtype]
        B, S = len(self.lengths), max(self.lengths)
        q = torch.randn(B, self.heads, self.q_len, self.head_dim, generator=g).to(dt)
        k = torch.randn(B, self.kv_heads, S, self.head_dim, generator=g).to(dt)
        v = torch.randn(B, self.kv_heads, S, self.head_dim, generator=g).to(dt)
        return (q, k, v, self._mask(), False, None, self.heads != self.kv_heads)

    def meta_args(self, device: str = "meta") -> tuple:
        """Shape-only inputs in the op's argument order."""
        dt, B, S = _DTYPES[self.dtype], len(self.lengths), max(self.lengths)
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
