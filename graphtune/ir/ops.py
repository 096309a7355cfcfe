"""graphtune's canonical ops: ``torch.ops.graphtune.attention``, ``attention_with_lse``, ``merge_states``.

Every attention form in a captured model is rewritten to ``graphtune::attention`` (an exact,
shape-static graph rewrite). Faster variants are *runtime selectors*, not rewrites: per call, the
shared-prefix and lean-decode selectors (data-dependent: which rows share a prompt, how ragged the
KV lengths are) split the op into partial attentions that return their log-sum-exp and recombine
them with ``merge_states``, and decline wherever that would not be exact.

Why ``torch.library.Library`` + ``register_fake`` rather than ``torch.library.custom_op``: the
latter wraps every call in Python dispatch layers that cost ~50 µs per call on this CPU
(measured, see ``benchmarks/bench_op_overhead.py``), more than the whole decode attention at
small shapes. The ops are still opaque to Dynamo/Inductor through their fake implementations.

Implementations are chosen per call: a selector installed by :mod:`graphtune.runtime`
(tuning-database driven) may return a faster implementation for the given tensors; otherwise
the CPU fast path (ATen's flash kernel, which also yields the LSE) runs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from graphtune.errors import DTypeError, ShapeError
from graphtune.ir.reference import FLOAT_DTYPES, additive_mask, attention_ref, merge_states_ref, sdpa_shapes

__all__ = [
    "attention",
    "attention_with_lse",
    "merge_states",
    "check_attention_args",
    "broadcast_attention_args",
    "attention_cpu",
    "flash_cpu",
    "fix_empty_rows",
    "as_4d",
    "set_impl_selector",
    "ATTENTION_OPS",
    "EAGER_IMPLS",
]

_lib = torch.library.Library("graphtune", "DEF")
_ATTN_ARGS = "Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, bool is_causal=False, float? scale=None, bool enable_gqa=False"
_lib.define(f"attention({_ATTN_ARGS}) -> Tensor")
_lib.define(f"attention_with_lse({_ATTN_ARGS}) -> (Tensor, Tensor)")
_lib.define("merge_states(Tensor[] outs, Tensor[] lses) -> (Tensor, Tensor)")

# A selector maps (op name, args) to an implementation callable, or None for the default.
ImplSelector = Callable[[str, tuple], Optional[Callable[..., object]]]
_selector: ImplSelector | None = None


def set_impl_selector(selector: ImplSelector | None) -> ImplSelector | None:
    """Install the runtime's implementation selector; returns the previous one."""
    global _selector
    prev, _selector = _selector, selector
    return prev


_BOOL = torch.bool


def _plain(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, enable_gqa: bool) -> bool:
    """Hot path (every attention call of every layer), ~1 µs: real 4-D tensors with equal batch and
    k/v heads, q's heads equal to (or with GQA a multiple of) k's, one floating dtype, and no mask
    or a 4-D mask that broadcasts into ``[B, Hq, L, S]``. Everything else takes the full check."""
    if type(q) is Tensor and type(k) is Tensor and type(v) is Tensor:
        qs, ks, vs = q.shape, k.shape, v.shape
        if len(qs) == len(ks) == len(vs) == 4:
            b, hq, lq, e = qs
            bk, hk, sk, ek = ks
            qd = q.dtype
            if (e == ek and sk == vs[2] and hk == vs[1] and b == bk == vs[0]
                    and (hq == hk or (enable_gqa and hk > 0 and hq % hk == 0))
                    and qd == k.dtype == v.dtype and qd in FLOAT_DTYPES):
                if attn_mask is None:
                    return True
                md, ms = attn_mask.dtype, attn_mask.shape
                if len(ms) != 4 or (md != _BOOL and md != qd):
                    return False
                m0, m1, m2, m3 = ms
                return (m3 == sk or m3 == 1) and (m2 == lq or m2 == 1) and (m1 == hq or m1 == 1) and (m0 == b or m0 == 1)
    return False


def check_attention_args(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, enable_gqa: bool) -> None:
    """Raise :class:`ShapeError` / :class:`DTypeError` naming what is wrong with attention inputs.

    Accepts exactly what ``F.scaled_dot_product_attention`` accepts (batch dims broadcast, see
    :func:`~graphtune.ir.reference.sdpa_shapes`), except k and v with different key counts.
    """
    if not _plain(q, k, v, attn_mask, enable_gqa):
        sdpa_shapes(q, k, v, attn_mask, enable_gqa)


def broadcast_attention_args(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, enable_gqa: bool
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool, tuple | None]:
    """SDPA's broadcasting made explicit: ``(q4, k4, v4, mask, enable_gqa, out_batch)``.

    ``q4 [B, Hq, L, E]``, ``k4 [B, Hkv, S, E]``, ``v4 [B, Hkv, S, Ev]`` (``Hq`` a multiple of
    ``Hkv``; expanded views where SDPA broadcasts, copies only for rank > 4 or k/v heads that
    differ under GQA), the mask broadcastable to ``[B, Hq, L, S]``; kernels written for equal
    batches then compute exactly SDPA's result, to be reshaped to ``[*out_batch, L, Ev]``
    (lse: ``[*out_batch, L]``). ``out_batch`` is None for inputs already in that form (returned
    unchanged). Raises like :func:`check_attention_args`.
    """
    if _plain(q, k, v, attn_mask, enable_gqa):
        return q, k, v, attn_mask, enable_gqa, None
    _, out_batch = sdpa_shapes(q, k, v, attn_mask, enable_gqa)
    ob = (1,) * max(0, 2 - len(out_batch)) + tuple(out_batch)
    lead, hq = ob[:-1], ob[-1]
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    if enable_gqa and k.shape[-3] != v.shape[-3]:  # rare: repeat both to q's heads
        k = k.repeat_interleave(hq // k.shape[-3], dim=-3) if k.shape[-3] != hq else k
        v = v.repeat_interleave(hq // v.shape[-3], dim=-3) if v.shape[-3] != hq else v
    hk = k.shape[-3] if k.dim() >= 3 else 1
    hkv = hk if hk != hq and (enable_gqa or hk == 1) else hq  # GQA, or one kv head broadcast over q's heads
    q4 = q.expand(*lead, hq, L, E).reshape(-1, hq, L, E)
    k4 = k.expand(*lead, hkv, S, E).reshape(-1, hkv, S, E)
    v4 = v.expand(*lead, hkv, S, Ev).reshape(-1, hkv, S, Ev)
    mask = attn_mask
    if mask is not None and len(lead) > 1:  # rank > 4: flatten the batch dims of the mask too
        mask = mask.expand(*ob, L, S).reshape(-1, hq, L, S)
    return q4, k4, v4, mask, hkv != hq, tuple(out_batch)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default  # the overload: no per-call resolution


def as_4d(t: Tensor) -> Tensor:
    """``[H, L, E]`` -> ``[1, H, L, E]``; 4-D tensors pass through."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def fix_empty_rows(out: Tensor, lse: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """ATen's flash kernel returns ``lse = 0`` for a fully masked row; graphtune's convention
    (and ``merge_states``) needs ``lse = -inf`` and ``out = 0`` there."""
    if mask is None:
        return out, lse
    empty = torch.isneginf(mask).all(dim=-1)  # broadcastable to lse: [.., L]
    if bool(empty.any()):
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse


def flash_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    """ATen's CPU flash kernel with graphtune's empty-row convention.

    q: [B, Hq, L, E]  k, v: [B, Hkv, S, E] (GQA handled by the kernel: query head h reads kv head
    h // (Hq / Hkv)); ``mask`` additive, broadcastable to [B, Hq, L, S]. The kernel does not check
    the batch sizes (it reads out of bounds), so this does; broadcast first with
    :func:`broadcast_attention_args`. Rows emptied by ``is_causal`` *and* the mask together are
    only found when causality is part of the mask (as :func:`attention_cpu` does).
    """
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ShapeError(f"flash_cpu: batch sizes of q, k, v differ ({q.shape[0]}, {k.shape[0]}, {v.shape[0]}); "
                         "broadcast them first")
    out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    return fix_empty_rows(out, lse, mask)


def attention_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """CPU fast path: ATen's flash-attention kernel, returning ``(out, lse)``.

    Exactly SDPA's semantics, broadcasting included (SDPA dispatches to the same kernel on CPU),
    except that rows attending to nothing get ``out = 0``, ``lse = -inf``. Empty inputs or a head
    dim of v different from q's go through the reference.
    """
    q, k, v, attn_mask, enable_gqa, out_batch = broadcast_attention_args(q, k, v, attn_mask, enable_gqa)
    out, lse = _cpu_4d(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    if out_batch is not None:
        L = q.shape[2]
        out, lse = out.reshape(*out_batch, L, v.shape[-1]), lse.reshape(*out_batch, L)
    return out, lse


def _cpu_4d(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None,
            enable_gqa: bool) -> tuple[Tensor, Tensor]:
    # attention_cpu on broadcast_attention_args's output (equal batches, 4-D)
    B, H, L, E = q.shape
    S, Ev = k.shape[2], v.shape[3]
    if Ev != E or L == 0 or S == 0 or B * H == 0:
        return attention_ref(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    mask = None
    if attn_mask is not None:  # causality joins the mask, so that rows emptied by both get lse = -inf
        mask = additive_mask(attn_mask, is_causal, L, S, q.dtype, rank=4)
        is_causal = False
    out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    if lse.dtype != torch.float32:  # fp64 inputs: the op's LSE is fp32 whatever the inputs (as its fake says)
        lse = lse.float()
    return fix_empty_rows(out, lse, mask)


def _select(name: str, args: tuple) -> Callable[..., object] | None:
    sel = _selector
    return sel(name, args) if sel is not None else None


def _attention_impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    q4, k4, v4, mask, gqa, out_batch = broadcast_attention_args(q, k, v, attn_mask, enable_gqa)
    op_args = (q4, k4, v4, mask, is_causal, scale, gqa)
    impl = _select("attention", op_args)
    if impl is not None or (is_causal and attn_mask is not None):
        # SDPA refuses a mask with is_causal for some ranks; graphtune's ops take their conjunction
        fn = impl or (attention_cpu if q.device.type == "cpu" else attention_ref)
        out = fn(*op_args)[0]
        if out_batch is not None:
            out = out.reshape(*out_batch, q.shape[-2], v.shape[-1])
    else:
        # No LSE needed and nothing better selected: SDPA itself (on CPU it runs the same flash
        # kernel as attention_cpu, through a cheaper C++ binding, and parallelizes GQA better).
        if attn_mask is not None and attn_mask.dim() == 1:  # SDPA's 4-D kernels refuse [S]: same as [1, S]
            attn_mask = attn_mask[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                             enable_gqa=enable_gqa)
    # The fake implementation promises a contiguous output (Inductor asserts strides); kernels lay
    # the output out like q, which is a transposed view in GPT-2/OPT-style graphs.
    return out.contiguous()


def _attention_with_lse_impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    q4, k4, v4, mask, gqa, out_batch = broadcast_attention_args(q, k, v, attn_mask, enable_gqa)
    op_args = (q4, k4, v4, mask, is_causal, scale, gqa)
    impl = _select("attention_with_lse", op_args)
    if impl is not None:
        out, lse = impl(*op_args)
    elif q.device.type == "cpu":
        out, lse = _cpu_4d(*op_args)
    else:
        out, lse = attention_ref(*op_args)
    if out_batch is not None:
        L = q.shape[-2]
        out, lse = out.reshape(*out_batch, L, v.shape[-1]), lse.reshape(*out_batch, L)
    return out.contiguous(), lse.contiguous()


def _check_merge_args(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> None:
    if len(outs) == 0 or len(outs) != len(lses):
        raise ShapeError(f"merge_states: need as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    o0, l0 = outs[0], lses[0]
    if o0.dtype not in FLOAT_DTYPES or l0.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"merge_states: outs and lses must be floating point, got dtypes {o0.dtype} and {l0.dtype}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape[:-1] != l.shape or o.shape != o0.shape:
            raise ShapeError(f"merge_states: partial {i} has out {tuple(o.shape)} and lse {tuple(l.shape)}; "
                             f"expected out {tuple(o0.shape)} and lse {tuple(o0.shape[:-1])}")
        if o.dtype != o0.dtype or l.dtype != l0.dtype:
            raise DTypeError(f"merge_states: partial {i} has out dtype {o.dtype} and lse dtype {l.dtype}; "
                             f"partial 0 has {o0.dtype} and {l0.dtype} (mixed dtypes)")
        if o.device != o0.device or l.device != o0.device:
            raise ShapeError(f"merge_states: partial {i} is on {o.device}/{l.device}, partial 0 on {o0.device}")


def _merge_states_impl(outs, lses):
    _check_merge_args(outs, lses)
    impl = _select("merge_states", (outs, lses))
    if impl is not None:
        return tuple(impl(outs, lses))
    return merge_states_ref(outs, lses)


for _dev in ("CPU", "CUDA"):
    _lib.impl("attention", _attention_impl, _dev)
    _lib.impl("attention_with_lse", _attention_with_lse_impl, _dev)
    _lib.impl("merge_states", _merge_states_impl, _dev)
# Empty lists carry no dispatch key: the dispatcher then runs the CompositeExplicitAutograd kernel
# (its "Undefined" entry), which raises our ShapeError instead of a NotImplementedError.
_lib.impl("merge_states", _merge_states_impl, "CompositeExplicitAutograd")


def _out_shape(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, enable_gqa: bool) -> tuple:
    _, out_batch = sdpa_shapes(q, k, v, attn_mask, enable_gqa)
    return (*out_batch, q.shape[-2], v.shape[-1])


@torch.library.register_fake("graphtune::attention")
def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    return q.new_empty(_out_shape(q, k, v, attn_mask, enable_gqa))


@torch.library.register_fake("graphtune::attention_with_lse")
def _attention_with_lse_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    shape = _out_shape(q, k, v, attn_mask, enable_gqa)
    return q.new_empty(shape), q.new_empty(shape[:-1], dtype=torch.float32)


@torch.library.register_fake("graphtune::merge_states")
def _merge_states_fake(outs, lses):
    _check_merge_args(outs, lses)
    return torch.empty_like(outs[0]), torch.empty_like(lses[0], dtype=torch.float32)


# The Python implementations behind each overload. A graph that runs eagerly (optimize's Dynamo
# path) calls these directly: going through the dispatcher back into Python costs ~13 µs a call.
EAGER_IMPLS = {
    torch.ops.graphtune.attention.default: _attention_impl,
    torch.ops.graphtune.attention_with_lse.default: _attention_with_lse_impl,
    torch.ops.graphtune.merge_states.default: _merge_states_impl,
}

# Public handles (OpOverloadPackets); rewrites insert `attention.default` nodes.
attention = torch.ops.graphtune.attention
attention_with_lse = torch.ops.graphtune.attention_with_lse
merge_states = torch.ops.graphtune.merge_states
ATTENTION_OPS = (attention.default, attention_with_lse.default)
