"""Shared-prefix (Hydragen) attention: prefix-batched attention, suffix attention, LSE merge.

Attention of a batch whose KV caches share prefixes is split exactly into

* one attention per shared *segment*, with the queries of every row sharing it folded into
  one matrix (``[1, Hkv, rows*G*Lq, D]``, the GQA group folded in too) against the segment's
  KV read **once**, non-causal (the queries all come after the segment);
* one attention per row over its own suffix (bottom-right causal when several queries append);
* a log-sum-exp merge (:func:`torch.ops.graphtune.merge_states`) of the partials.

The partial attentions run through graphtune's attention-with-LSE: on CPU ATen's flash kernel
directly (no op-dispatch overhead per call), elsewhere ``torch.ops.graphtune.attention_with_lse``
so the GPU implementation chosen by the runtime (Triton) is used. The runtime's re-entry guard
(``Feature(reenters=True)`` in :mod:`graphtune.runtime.context`) keeps the shared-prefix selector
from decomposing those inner calls again.

The sharing description here is low level (tensors + row indices); plans live in
:mod:`graphtune.runtime.shared_prefix`, which builds :class:`Segment` lists from them.

>>> import torch
>>> from graphtune.codegen.shared_prefix.decompose import Segment, shared_prefix_attention
>>> q = torch.randn(4, 8, 1, 64)                               # 4 rows decoding
>>> pk, pv = torch.randn(2, 100, 64), torch.randn(2, 100, 64)  # prefix KV stored once, 2 kv heads
>>> sk, sv = torch.randn(4, 2, 5, 64), torch.randn(4, 2, 5, 64)
>>> seg = Segment(rows=torch.arange(4), k=pk, v=pv)
>>> out, lse = shared_prefix_attention(q, [seg], sk, sv, enable_gqa=True)
>>> out.shape, lse.shape
(torch.Size([4, 8, 1, 64]), torch.Size([4, 8, 1]))
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from graphtune import flags
from graphtune.codegen.family import family, load_impl_modules
from graphtune.codegen.registry import get_impl
from graphtune.errors import KernelError, PlanError, ShapeError
from graphtune.ir.ops import attention_cpu, check_attention_args
from graphtune.ir.reference import merge_states_ref

__all__ = [
    "Segment",
    "Partial",
    "SUFFIX_MODES",
    "partial_attention",
    "prefix_attention",
    "suffix_attention",
    "merge_partials",
    "shared_prefix_attention",
    "fused_available",
    "suffix_merge_ref",
]

# "padded": one batched call over the padded suffix buffer with a length mask;
# "loop": one call per row over exactly its keys (varlen). Measured in
# benchmarks/bench_shared_prefix.py::test_suffix_mode_*: padded wins on this CPU for decode.
SUFFIX_MODES = ("padded", "loop")

@dataclass(frozen=True)
class Segment:
    """A KV segment shared by several batch rows, stored once.

    Attributes
    ----------
    rows : LongTensor ``[R]`` or None
        Batch rows whose keys include this segment (all their queries come after it);
        None means every row of the batch, in order (saves a gather).
    k, v : Tensor ``[Hkv, n, D]`` / ``[Hkv, n, Dv]``
        The segment's keys and values (a view into a larger cache is fine).
    key_mask : Tensor ``[n]`` or None
        Same for every sharing row and query: bool (True = attend) or additive float.
    """

    rows: Tensor | None
    k: Tensor
    v: Tensor
    key_mask: Tensor | None = None


@dataclass(frozen=True)
class Partial:
    """A partial attention result over a disjoint key set: ``out [R, Hq, Lq, Dv]``, ``lse [R, Hq, Lq]``.

    ``rows`` (LongTensor ``[R]``) says which batch rows it belongs to; None means all rows in order.
    """

    rows: Tensor | None
    out: Tensor
    lse: Tensor


def partial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention returning ``(out, lse)`` through graphtune's attention-with-LSE (SDPA semantics)."""
    if q.device.type == "cpu":
        return attention_cpu(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    # through the op, so tuned dispatch serves it; the runtime's re-entry guard keeps the
    # shared-prefix feature itself from taking this inner call
    return torch.ops.graphtune.attention_with_lse(q, k, v, attn_mask, is_causal, scale, enable_gqa)


def _kv_groups(hq: int, hkv: int, enable_gqa: bool) -> int:
    if hq == hkv:
        return 1
    if not enable_gqa or hq % hkv:
        raise ShapeError(f"shared-prefix attention: {hq} query heads vs {hkv} kv heads needs enable_gqa=True "
                         "and a multiple")
    return hq // hkv


def prefix_attention(q: Tensor, seg: Segment, scale: float | None = None, enable_gqa: bool = False) -> Partial:
    """Attention of the sharing rows' queries, batched into one matrix, against a segment read once.

    ``q``: ``[B, Hq, Lq, D]`` (all rows; ``seg.rows`` are picked out). Non-causal: valid only when
    every query comes after the segment. Returns a :class:`Partial` over ``seg.rows``.
    """
    if seg.k.dim() != 3 or seg.v.dim() != 3:
        raise ShapeError(f"shared segment k/v must be [Hkv, n, D], got {tuple(seg.k.shape)} and {tuple(seg.v.shape)}")
    rows = seg.rows
    B, Hq, Lq, D = q.shape
    R = B if rows is None else rows.numel()
    Hkv, n = seg.k.shape[0], seg.k.shape[1]
    G = _kv_groups(Hq, Hkv, enable_gqa)
    Dv = seg.v.shape[-1]
    valid = n > 0
    if valid and seg.key_mask is not None:
        m = seg.key_mask
        valid = bool(m.any()) if m.dtype == torch.bool else bool((m > float("-inf")).any())
    if not valid:  # the segment contributes nothing (empty or fully masked): lse = -inf
        return Partial(rows, q.new_zeros(R, Hq, Lq, Dv), q.new_full((R, Hq, Lq), float("-inf"), dtype=torch.float32))
    qr = q if rows is None else q.index_select(0, rows)
    # fold rows and the GQA group into the query axis: [R, Hkv*G, Lq, D] -> [1, Hkv, R*G*Lq, D]
    qf = qr.reshape(R, Hkv, G * Lq, D).transpose(0, 1).reshape(1, Hkv, R * G * Lq, D)
    mask = None if seg.key_mask is None else seg.key_mask.view(1, 1, 1, n)
    o, lse = partial_attention(qf, seg.k.unsqueeze(0), seg.v.unsqueeze(0), mask, False, scale)
    # unfold: [1, Hkv, R*G*Lq, Dv] -> [R, Hq, Lq, Dv]
    o = o.reshape(Hkv, R, G * Lq, Dv).transpose(0, 1).reshape(R, Hq, Lq, Dv)
    lse = lse.reshape(Hkv, R, G * Lq).transpose(0, 1).reshape(R, Hq, Lq)
    return Partial(rows, o, lse)


def _is_arange(rows: Tensor) -> bool:
    n = rows.numel()
    return n == 0 or (int(rows[0]) == 0 and int(rows[-1]) == n - 1 and bool((rows.diff() == 1).all()))


def _suffix_mask(lens: Tensor, Lq: int, Ls: int, is_causal: bool) -> Tensor:
    """Bool ``[B, 1, Lq, Ls]``: key j of row b is valid iff j < len_b and, if is_causal, bottom-right aligned."""
    j = torch.arange(Ls, device=lens.device).view(1, 1, 1, Ls)
    ln = lens.view(-1, 1, 1, 1)
    m = j < ln
    if is_causal and Lq > 1:
        i = torch.arange(Lq, device=lens.device).view(1, 1, Lq, 1)
        m = m & (j <= ln - Lq + i)
    return m


def _has_key(mask: Tensor) -> Tensor:
    """Which (row, head, query) of a 4-D mask attend to at least one key."""
    return mask.any(-1) if mask.dtype == torch.bool else (mask > float("-inf")).any(-1)


def suffix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lens: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    mode: str = "padded",
) -> Partial:
    """Each row's attention over its own (ragged) suffix KV.

    Parameters
    ----------
    q : ``[B, Hq, Lq, D]``
    k, v : ``[B, Hkv, Ls, D]``, padded to the longest suffix.
    lens : LongTensor ``[B]`` or None
        Valid suffix length per row (None: all ``Ls``).
    attn_mask : ``[B|1, 1|Hq, Lq, Ls]`` or None
        Extra mask (bool or additive), combined with ``lens``/``is_causal``.
    is_causal : bool
        Bottom-right causal: the ``Lq`` queries are the last ``Lq`` tokens of each row's suffix,
        so each row's suffix must hold at least ``Lq`` tokens.
    mode : {"padded", "loop"}
        One masked batched call, or one call per row over exactly its keys.
    """
    if mode not in SUFFIX_MODES:
        raise ValueError(f"suffix_attention: mode must be one of {SUFFIX_MODES}, got {mode!r}")
    B, Hq, Lq, _ = q.shape
    Ls = k.shape[-2]
    _check_suffix(B, Lq, Ls, lens, is_causal)
    if mode == "loop" and B > 0:
        return _suffix_loop(q, k, v, lens, attn_mask, is_causal, scale, enable_gqa)
    mask = attn_mask
    if lens is not None or (is_causal and Lq > 1):
        lm = _suffix_mask(lens if lens is not None else torch.full((B,), Ls, device=q.device), Lq, Ls, is_causal)
        if mask is None:
            mask = lm
        elif mask.dtype == torch.bool:
            mask = mask & lm
        else:
            mask = mask.masked_fill(~lm, float("-inf"))
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
    o, lse = partial_attention(q, k, v, mask, False, scale, enable_gqa)
    if mask is not None:
        # ATen's kernel reports lse = 0 for rows with no valid key; the merge needs -inf
        hk = _has_key(mask).expand(B, Hq, Lq)
        lse = torch.where(hk, lse, float("-inf"))
        o = o.masked_fill(~hk[..., None], 0.0)
    return Partial(None, o, lse)


def _check_suffix(B: int, Lq: int, Ls: int, lens: Tensor | None, is_causal: bool) -> None:
    if lens is not None:
        if lens.shape != (B,):
            raise ShapeError(f"suffix lengths must be [B={B}], got {tuple(lens.shape)}")
        if B and (int(lens.max()) > Ls or int(lens.min()) < 0):
            raise PlanError(f"suffix lengths {lens.tolist()} exceed the suffix buffer of {Ls} tokens")
    if is_causal and Lq > 1:
        short = (lens if lens is not None else torch.full((B,), Ls)) < Lq
        if bool(short.any()):
            raise PlanError(f"rows {short.nonzero().flatten().tolist()} have fewer suffix tokens than the {Lq} "
                            "queries: queries would overlap the shared prefix, which is attended non-causally")


def _suffix_loop(q, k, v, lens, attn_mask, is_causal, scale, enable_gqa) -> Partial:
    B, Hq, Lq, _ = q.shape
    outs, lses = [], []
    for b in range(B):
        n = int(lens[b]) if lens is not None else k.shape[-2]
        m = None
        if attn_mask is not None:
            m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            m = m4.expand(B, -1, -1, -1)[b : b + 1, :, :, :n]
        p = suffix_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], None, m, is_causal, scale,
                             enable_gqa, "padded")
        outs.append(p.out)
        lses.append(p.lse)
    return Partial(None, torch.cat(outs), torch.cat(lses))


def _assign_levels(partials: Sequence[Partial]) -> list[list[Partial]]:
    """Pack partials into levels whose row sets are disjoint (greedy, first fit)."""
    levels: list[tuple[set[int], list[Partial]]] = []
    for p in partials:
        rows = set(p.rows.tolist()) if p.rows is not None else None
        for used, members in levels:
            if rows is not None and used is not None and not (used & rows):
                used |= rows
                members.append(p)
                break
        else:
            levels.append((rows, [p]))  # type: ignore[arg-type]
    return [m for _, m in levels]


def merge_partials(batch: int, partials: Sequence[Partial]) -> tuple[Tensor, Tensor]:
    """Merge partial attentions over disjoint key sets into ``(out [B, Hq, Lq, Dv], lse [B, Hq, Lq])``.

    Partials touching disjoint rows are first scattered into one level tensor (rows they do not
    cover get ``lse = -inf``), then the levels are merged by log-sum-exp with ``merge_states``.
    """
    if not partials:
        raise PlanError("shared-prefix attention: nothing to merge (no segment and no suffix)")
    outs, lses = [], []
    for level in _assign_levels(partials):
        p0 = level[0]
        if len(level) == 1 and (p0.rows is None or (p0.rows.numel() == batch and _is_arange(p0.rows))):
            outs.append(p0.out)
            lses.append(p0.lse)
            continue
        o = p0.out.new_zeros(batch, *p0.out.shape[1:])
        lse = p0.lse.new_full((batch, *p0.lse.shape[1:]), float("-inf"))
        for p in level:
            o.index_copy_(0, p.rows, p.out)
            lse.index_copy_(0, p.rows, p.lse)
        outs.append(o)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    if outs[0].device.type == "cpu":
        return merge_states_ref(outs, lses)  # the torch merge directly: no op dispatch per call
    return torch.ops.graphtune.merge_states(outs, lses)


def shared_prefix_attention(
    q: Tensor,
    segments: Sequence[Segment],
    suffix_k: Tensor,
    suffix_v: Tensor,
    suffix_lens: Tensor | None = None,
    suffix_mask: Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    suffix_mode: str = "padded",
    fused: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention over shared segments + per-row suffixes, as Hydragen computes it.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]``
        Queries; they are the last ``Lq`` tokens of each row (after every segment it shares).
    segments : sequence of :class:`Segment`
        Shared KV segments. The segments of one row are disjoint key sets (e.g. tree levels);
        sharing groups need not be contiguous rows.
    suffix_k, suffix_v : Tensor ``[B, Hkv, Ls, D]``
        Per-row unique KV, padded to the longest.
    suffix_lens : LongTensor ``[B]``, optional
        Valid suffix tokens per row (ragged suffixes); None means all ``Ls``.
    suffix_mask : Tensor, optional
        Extra bool/additive mask over the suffix keys, ``[B|1, 1|Hq, Lq, Ls]``.
    is_causal : bool
        Bottom-right causal attention inside the suffix (append/prefill of ``Lq > 1`` tokens).
    scale, enable_gqa :
        As in ``F.scaled_dot_product_attention``.
    suffix_mode : {"padded", "loop"}
        How ragged suffixes are computed (see :func:`suffix_attention`).
    fused : bool, optional
        Suffix attention and merge in one Triton kernel
        (:func:`graphtune.codegen.shared_prefix.triton_kernels.suffix_merge`, which applies ``suffix_mask``
        too). Default: on CUDA unless ``GRAPHTUNE_DISABLE_TRITON``; ``True`` on CPU needs
        ``TRITON_INTERPRET=1``.

    Returns
    -------
    out : Tensor ``[B, Hq, Lq, Dv]``
    lse : Tensor ``[B, Hq, Lq]`` fp32, natural log.

    Examples
    --------
    >>> import torch
    >>> q = torch.randn(3, 4, 1, 16)
    >>> seg = Segment(torch.tensor([0, 2]), torch.randn(4, 10, 16), torch.randn(4, 10, 16))
    >>> out, lse = shared_prefix_attention(q, [seg], torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16))
    >>> out.shape
    torch.Size([3, 4, 1, 16])
    """
    if q.dim() != 4 or suffix_k.dim() != 4 or suffix_v.dim() != 4:
        raise ShapeError(f"shared_prefix_attention: q and suffix k/v must be 4-D [B, H, L, D], got "
                         f"{tuple(q.shape)}, {tuple(suffix_k.shape)}, {tuple(suffix_v.shape)}")
    B = q.shape[0]
    if suffix_k.shape[0] != B or suffix_v.shape[0] != B:
        raise ShapeError(f"shared_prefix_attention: suffix k/v have batch {suffix_k.shape[0]}/{suffix_v.shape[0]}, "
                         f"queries {B}")
    check_attention_args(q, suffix_k, suffix_v, suffix_mask, enable_gqa)
    partials = []
    for i, seg in enumerate(segments):
        r = seg.rows
        if r is None:
            partials.append(prefix_attention(q, seg, scale, enable_gqa))
            continue
        if r.dim() != 1 or (r.numel() and (int(r.min()) < 0 or int(r.max()) >= B)):
            raise PlanError(f"segment {i}: rows {r.tolist()} out of range for batch {B}")
        if r.numel() != len(set(r.tolist())):
            raise PlanError(f"segment {i}: rows {r.tolist()} repeat a row")
        if r.numel():
            partials.append(prefix_attention(q, seg, scale, enable_gqa))
    if fused if fused is not None else fused_available(q, suffix_mask, passes_mask=True):
        _check_suffix(q.shape[0], q.shape[-2], suffix_k.shape[-2], suffix_lens, is_causal)
        prior = merge_partials(B, partials) if partials else None
        return _fused_suffix_merge(q, suffix_k, suffix_v, suffix_lens, prior, suffix_mask, is_causal, scale, enable_gqa)
    partials.append(suffix_attention(q, suffix_k, suffix_v, suffix_lens, suffix_mask, is_causal, scale, enable_gqa,
                                     suffix_mode))
    return merge_partials(B, partials)


def fused_available(q: Tensor, suffix_mask: Tensor | None = None, *, passes_mask: bool = False) -> bool:
    """Whether the fused Triton suffix+merge kernel serves this call by default (CUDA, Triton enabled).

    The kernel applies a suffix mask only when given one (``suffix_merge(..., attn_mask=m)``):
    callers that hand it ``suffix_mask`` say so with ``passes_mask=True``; for the others a mask
    rules the fused path out, so that it is never dropped silently.
    """
    return q.device.type == "cuda" and (suffix_mask is None or passes_mask) and not flags.get("DISABLE_TRITON")


def _fused_suffix_merge(q, k, v, lens, prior, attn_mask, is_causal, scale, enable_gqa) -> tuple[Tensor, Tensor]:
    # the family's fused Triton kernel, reached through the registry (its module imports this
    # one for the reference, so importing it here would close a cycle); Triton only when used
    fam = family("shared_prefix")
    load_impl_modules("cuda")
    impl = get_impl(fam.ops[0], fam.default_impls["cuda"])
    prior_out, prior_lse = prior if prior is not None else (None, None)
    args = (q, k, v, lens, prior_out, prior_lse, attn_mask, is_causal, scale, enable_gqa)
    try:
        if impl is None:
            raise KernelError(f"{fam.default_impls['cuda']} is not registered (no Triton?)")
        return impl.fn(*args, config=impl.default_config(args))
    except KernelError as e:  # a kernel failure falls back to the reference path, with a warning
        warnings.warn(f"graphtune: fused shared-prefix suffix merge failed ({e}); using the torch path",
                      stacklevel=3)
        return suffix_merge_ref(*args)


def suffix_merge_ref(q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None = None, prior_out: Tensor | None = None,
                     prior_lse: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
                     scale: float | None = None, enable_gqa: bool = False, mode: str = "padded") -> tuple[Tensor, Tensor]:
    """Op ``shared_prefix_suffix_merge`` in torch: each row's suffix attention merged with a prior state.

    The family's reference and its CPU implementation (``mode``: :data:`SUFFIX_MODES`); the
    Triton kernel fuses both steps. Arguments in the op's order ``(q, k, v, lens, prior_out,
    prior_lse, attn_mask, is_causal, scale, enable_gqa)``; returns ``(out, lse)``.
    """
    parts = [suffix_attention(q, k, v, lens, attn_mask, is_causal, scale, enable_gqa, mode)]
    if prior_out is not None:
        parts.insert(0, Partial(None, prior_out, prior_lse))
    return merge_partials(q.shape[0], parts)
