"""graphtune's canonical ops: ``torch.ops.graphtune.attention``, ``attention_with_lse``, ``merge_states``.

Every attention form in a captured model is rewritten to ``graphtune::attention``; later
rewrites (shared prefix, lean decode, ...) split it into partial attentions that return their
log-sum-exp and recombine them with ``merge_states``.

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
from torch.fx.experimental.symbolic_shapes import statically_known_true

from graphtune.errors import ShapeError
from graphtune.ir.reference import attention_ref, merge_states_ref

__all__ = [
    "attention",
    "attention_with_lse",
    "merge_states",
    "check_attention_args",
    "attention_cpu",
    "flash_cpu",
    "additive_mask4",
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


def _differ(a: object, b: object) -> bool:
    # Real calls see ints. Under fake tensors with symbolic sizes only a provable difference counts:
    # comparing SymInts would add guards from inside a backend (and k/v caches get distinct symbols).
    if isinstance(a, int) and isinstance(b, int):
        return a != b
    return bool(statically_known_true(a != b))


def check_attention_args(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, enable_gqa: bool) -> None:
    """Raise :class:`ShapeError` naming what is wrong with attention inputs."""
    if type(q) is Tensor and type(k) is Tensor and type(v) is Tensor:
        # Hot path (every attention call of every layer): plain 4-D tensors, checked in ~1 µs.
        qs, ks, vs = q.shape, k.shape, v.shape
        if (len(qs) == len(ks) == len(vs) == 4 and qs[3] == ks[3] and ks[2] == vs[2] and ks[1] == vs[1]
                and ks[0] == vs[0] and (qs[1] == ks[1] or (enable_gqa and ks[1] > 0 and qs[1] % ks[1] == 0))
                and q.dtype == k.dtype == v.dtype
                and (attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.dtype == q.dtype)):
            return
    _check_attention_args_slow(q, k, v, attn_mask, enable_gqa)


def _check_attention_args_slow(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, enable_gqa: bool) -> None:
    if not (q.dim() == k.dim() == v.dim()) or q.dim() < 2:
        raise ShapeError(f"attention: q, k, v must have the same rank >= 2, got {q.dim()}, {k.dim()}, {v.dim()}")
    if _differ(q.shape[-1], k.shape[-1]):
        raise ShapeError(f"attention: q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if _differ(k.shape[-2], v.shape[-2]):
        raise ShapeError(f"attention: k has {k.shape[-2]} keys but v has {v.shape[-2]} values")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() >= 3:
        hq, hkv = q.shape[-3], k.shape[-3]
        if _differ(k.shape[-3], v.shape[-3]):
            raise ShapeError(f"attention: k has {hkv} heads but v has {v.shape[-3]}")
        if _differ(hq, hkv) and not (enable_gqa and not _differ(hq % hkv, 0)):
            what = "is not a multiple of" if enable_gqa else "!= (pass enable_gqa=True for grouped-query attention)"
            raise ShapeError(f"attention: {hq} query heads {what} {hkv} key/value heads")
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        raise ShapeError(f"attention: attn_mask dtype {attn_mask.dtype} must be bool or the query dtype {q.dtype}")


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default  # the overload: no per-call resolution


def as_4d(t: Tensor) -> Tensor:
    """``[H, L, E]`` -> ``[1, H, L, E]``; 4-D tensors pass through."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def additive_mask4(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """SDPA's bool (True = attend) or float mask as an additive float mask of rank 4."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


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
    h // (Hq / Hkv)); ``mask`` additive, broadcastable to [B, Hq, L, S].
    """
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

    Exactly SDPA's semantics (SDPA dispatches to the same kernel on CPU). Ranks other than 3
    and 4, or a head dim of v different from q's, go through the fp32 reference.
    """
    if q.dim() not in (3, 4) or v.shape[-1] != q.shape[-1] or q.shape[-2] == 0 or k.shape[-2] == 0:
        return attention_ref(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    out, lse = flash_cpu(as_4d(q), as_4d(k), as_4d(v), additive_mask4(attn_mask, q.dtype), is_causal, scale)
    if q.dim() == 3:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return out, lse


def _select(name: str, args: tuple) -> Callable[..., object] | None:
    sel = _selector
    return sel(name, args) if sel is not None else None


def _attention_impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    check_attention_args(q, k, v, attn_mask, enable_gqa)
    impl = _select("attention", (q, k, v, attn_mask, is_causal, scale, enable_gqa))
    if impl is not None:
        out = impl(q, k, v, attn_mask, is_causal, scale, enable_gqa)[0]
    else:
        # No LSE needed and nothing better selected: SDPA itself (on CPU it runs the same flash
        # kernel as attention_cpu, through a cheaper C++ binding, and parallelizes GQA better).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                             enable_gqa=enable_gqa)
    # The fake implementation promises a contiguous output (Inductor asserts strides); kernels lay
    # the output out like q, which is a transposed view in GPT-2/OPT-style graphs.
    return out.contiguous()


def _attention_with_lse_impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    check_attention_args(q, k, v, attn_mask, enable_gqa)
    impl = _select("attention_with_lse", (q, k, v, attn_mask, is_causal, scale, enable_gqa))
    if impl is not None:
        out, lse = impl(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    elif q.device.type == "cpu":
        out, lse = attention_cpu(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    else:
        out, lse = attention_ref(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    return out.contiguous(), lse.contiguous()


def _check_merge_args(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> None:
    if len(outs) == 0 or len(outs) != len(lses):
        raise ShapeError(f"merge_states: need as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.shape[:-1] != l.shape or o.shape != outs[0].shape:
            raise ShapeError(f"merge_states: partial {i} has out {tuple(o.shape)} and lse {tuple(l.shape)}; "
                             f"expected out {tuple(outs[0].shape)} and lse {tuple(outs[0].shape[:-1])}")


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


@torch.library.register_fake("graphtune::attention")
def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    check_attention_args(q, k, v, attn_mask, enable_gqa)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.register_fake("graphtune::attention_with_lse")
def _attention_with_lse_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    check_attention_args(q, k, v, attn_mask, enable_gqa)
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


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
