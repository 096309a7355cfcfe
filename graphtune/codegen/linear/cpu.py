"""CPU implementations of ``linear``: ``cpu.aten`` (``F.linear``), ``cpu.wt`` (weight-major) and
``cpu.onednn`` (oneDNN with a packed weight).

Why a second formulation: for a skinny ``x [M, K]`` (M = tokens of a decode or verify step),
``F.linear`` reaches BLAS as ``x @ W^T`` with ``M`` as the outer dimension. For ``M < 4`` that is a
path that runs on one core and, for ``M`` of 2 or 3, re-reads the weight per row (the LM head of
SmolLM2 takes 2x and 3x the one-row time). ``W @ x^T`` hands BLAS the weight as the row-major
left operand, which it streams once and splits over the threads. Knob ``PAD``: rows are padded
with zeros up to ``PAD`` first (a 1-row product becomes a small matrix product that every thread
shares; the extra rows cost nothing in a memory-bound product). The output is made contiguous,
so callers may ``view`` it like ``F.linear``'s.

``cpu.onednn``: oneDNN's inner-product primitive on a weight reordered once into its blocked
layout (the ops Inductor's CPU weight freezing uses). From 4 rows up to prefill-sized chunks it
is 2-4x faster than ``F.linear`` here (SmolLM2's LM head at 8 rows: 4.6 ms vs 12.8 ms on 2 cores).
The cost is memory: a second, packed copy of every weight it serves, kept while the weight lives
and rebuilt when the weight is modified in place (its version counter moves). ``LINEAR_PACKED=0``
keeps the tuner from choosing it.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from graphtune import flags
from graphtune.codegen.linear.reference import linear_ref
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash

__all__ = ["linear_aten", "linear_wt", "linear_onednn", "packed_weight", "PADS"]

PADS = (1, 2, 4)  # PAD values tried (1: no padding); padding applies only when M < PAD


def linear_aten(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                config: KernelConfig = KernelConfig.make()) -> tuple[Tensor, None]:
    """``F.linear``: the untuned path (``x [M, K]``, ``weight [N, K]`` -> ``[M, N]``)."""
    return F.linear(x, weight, bias), None


def linear_wt(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
              config: KernelConfig = KernelConfig.make(PAD=1)) -> tuple[Tensor, None]:
    """``(W @ x^T)^T + b``, rows zero-padded to ``PAD`` first.

    Examples
    --------
    >>> x, w = torch.randn(1, 64), torch.randn(96, 64)
    >>> y, _ = linear_wt(x, w, config=KernelConfig.make(PAD=4))
    >>> y.shape, torch.allclose(y, x @ w.T, atol=1e-4)
    (torch.Size([1, 96]), True)
    """
    m = x.shape[0]
    pad = config.get("PAD", 1)
    xp = torch.cat([x, x.new_zeros(pad - m, x.shape[1])]) if m < pad else x  # [max(M, PAD), K]
    y = (weight @ xp.t()).t()[:m]  # [M, N], a transposed view
    if bias is not None:
        return torch.add(y, bias).contiguous(), None
    return y.contiguous(), None


PACK_HINT = 16  # the row count oneDNN's reorder is told to expect (the layout serves every row count)
# id(weight) -> (weakref to it, its version when packed, packed copy). By id, not by the tensor:
# tensors compare elementwise, so they cannot key a dict.
_PACKS: dict[int, tuple[weakref.ref, int, Tensor]] = {}
_packs_lock = threading.Lock()


def packed_weight(weight: Tensor) -> Tensor:
    """``weight [N, K]`` reordered into oneDNN's blocked layout: made once, rebuilt after an in-place
    change of the weight, dropped with the weight."""
    key = id(weight)
    ent = _PACKS.get(key)
    if ent is not None and ent[0]() is weight and ent[1] == weight._version:
        return ent[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT)
    with _packs_lock:
        _PACKS[key] = (weakref.ref(weight, lambda _, k=key: _PACKS.pop(k, None)), weight._version, packed)
    return packed


def linear_onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                  config: KernelConfig = KernelConfig.make()) -> tuple[Tensor, None]:
    """oneDNN inner product with the packed weight (:func:`packed_weight`).

    Examples
    --------
    >>> x, w, b = torch.randn(5, 64), torch.randn(96, 64), torch.randn(96)
    >>> y, _ = linear_onednn(x, w, b)
    >>> torch.allclose(y, x @ w.T + b, atol=1e-4)
    True
    """
    y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias, "none", [], "")
    return y, None


def _onednn_usable(args: tuple) -> bool:
    x = args[0]
    return (bool(flags.get("LINEAR_PACKED")) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and x.dtype in (torch.float32, torch.bfloat16) and _supports(args))


def _supports(args: tuple) -> bool:
    x, w = args[0], args[1]
    return x.device.type == "cpu" and x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1]


def _wt_configs(args: tuple) -> list[KernelConfig]:
    m = args[0].shape[0]
    return [KernelConfig.make(PAD=p) for p in PADS if p == 1 or m < p]


register_impl(Impl("linear", "cpu.aten", "cpu", linear_aten, KernelConfig.make(), lambda args: [KernelConfig.make()],
                   source_hash(linear_aten), _supports))
register_impl(Impl("linear", "cpu.wt", "cpu", linear_wt, KernelConfig.make(PAD=1), _wt_configs,
                   source_hash(linear_wt, linear_ref), _supports))
register_impl(Impl("linear", "cpu.onednn", "cpu", linear_onednn, KernelConfig.make(), lambda args: [KernelConfig.make()],
                   source_hash(linear_onednn, packed_weight), _onednn_usable))
