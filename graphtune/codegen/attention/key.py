"""The attention family's tuning key: :class:`AttentionShape` (one attention problem) and its database key."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from graphtune.codegen.tuning_key import DTYPES, MASKS, ShapeKey, check_shape, pow2_bucket
from graphtune.errors import OptionError, ShapeError
from graphtune.ir.args import AttentionArgs
from graphtune.ir.reference import additive_mask

__all__ = ["ATTENTION_OP", "AttentionShape", "key_for_args", "parse_shape"]

# Both attention ops are tuned and looked up under this one op name (attention = its out).
ATTENTION_OP = "attention_with_lse"


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
        check_shape(self, ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"))
        if self.mask not in MASKS:
            raise ShapeError(f"AttentionShape.mask {self.mask!r} is not one of {MASKS}")

    op = ATTENTION_OP

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def examples(cls) -> tuple["AttentionShape", ...]:
        """Small problems that, together, every implementation of the op supports (tests)."""
        return (cls(1, 4, 2, 8, 64, 32), cls(1, 8, 2, 1, 512, 64))

    @staticmethod
    def keys_of_call(args: tuple) -> list[ShapeKey]:
        """Tuning keys to look up for an op call, best first: its own, then (masked calls) the
        unmasked shape's (masks cost every implementation alike, and the mask a model passes is
        rarely the one tuned; the implementation's ``supports`` still has the last word)."""
        keys = [key_for_args(args)]
        a = AttentionArgs.of(args)
        if a.attn_mask is not None:
            keys.append(key_for_args(a.replace(attn_mask=None).op_args()))
        return keys

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
            mask = keep if self.mask == "bool" else additive_mask(keep, False, self.q_len, self.kv_len, dt)
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
        a = AttentionArgs.of(args)
        q, k = a.q, a.k
        if q.dim() not in (3, 4):
            raise ShapeError(f"AttentionShape.from_args: q must be 3-D or 4-D, got {q.dim()}-D")
        B = q.shape[0] if q.dim() == 4 else 1
        return cls(int(B), int(q.shape[-3]), int(k.shape[-3]), int(q.shape[-2]), int(k.shape[-2]),
                   int(q.shape[-1]), str(q.dtype).removeprefix("torch."), bool(a.is_causal), a.mask_kind)


def key_for_args(args: tuple, op: str = ATTENTION_OP) -> ShapeKey:
    """Tuning key of an attention call; the head dim of v enters the exact part."""
    a = AttentionArgs.of(args)
    q, k = a.q, a.k
    B = q.shape[0] if q.dim() == 4 else 1
    exact = (f"b{pow2_bucket(int(B))}_h{q.shape[-3]}_kvh{k.shape[-3]}_d{q.shape[-1]}_dv{a.v.shape[-1]}"
             f"_{str(q.dtype).removeprefix('torch.')}_{a.mask_kind}_{'causal' if a.is_causal else 'full'}")
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
        elif extra in DTYPES:
            dtype = extra
        else:
            raise OptionError(f"shape {text!r}: unknown field {extra!r} (dtype, 'causal' or 'mask=KIND')")
    try:
        return AttentionShape(*nums, dtype=dtype, causal=causal, mask=mask)
    except ShapeError as e:
        raise OptionError(f"shape {text!r}: {e}") from None
