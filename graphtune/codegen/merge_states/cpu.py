"""CPU implementation of ``merge_states``: ``cpu.torch``, the one torch LSE merge with a tuning knob.

The numerics are :func:`graphtune.ir.reference.merge_lse` (every torch merge in graphtune calls it).
Knob ``STACKED``: ``1`` stacks all ``N`` partials and merges them at once (a constant number of
ops); ``0`` folds them in two at a time, so no ``[N, ...]`` stack is ever materialised (for many
large partials).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.ir.reference import merge_lse, merge_states_ref

__all__ = ["merge_states_torch"]


def merge_states_torch(outs: Sequence[Tensor], lses: Sequence[Tensor], *,
                       config: KernelConfig = KernelConfig.make(STACKED=1)) -> tuple[Tensor, Tensor]:
    """Merge partial attentions ``(outs[i], lses[i])``; returns ``(out, lse)``.

    Examples
    --------
    >>> from graphtune.ir.ops import attention_cpu
    >>> q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 40, 16)
    >>> parts = [attention_cpu(q, k[:, :, :25], k[:, :, :25]), attention_cpu(q, k[:, :, 25:], k[:, :, 25:])]
    >>> out, lse = merge_states_torch([p[0] for p in parts], [p[1] for p in parts], config=KernelConfig.make(STACKED=0))
    >>> torch.allclose(out, attention_cpu(q, k, k)[0], atol=1e-5)
    True
    """
    if config.get("STACKED", 1) or len(outs) <= 2:
        return merge_states_ref(outs, lses)
    out, lse = outs[0].float(), lses[0].float()
    for o, l in zip(outs[1:], lses[1:]):
        out, lse = merge_lse(torch.stack([out, o.float()]), torch.stack([lse, l.float()]))
    return out.to(outs[0].dtype), lse


def _configs(args: tuple) -> list[KernelConfig]:
    return [KernelConfig.make(STACKED=1), KernelConfig.make(STACKED=0)]


def _supports(args: tuple) -> bool:
    outs, _ = args  # the op's arguments (outs, lses)
    return outs[0].device.type == "cpu"


register_impl(Impl("merge_states", "cpu.torch", "cpu", merge_states_torch, KernelConfig.make(STACKED=1), _configs,
                   source_hash(merge_states_torch, merge_lse, merge_states_ref), _supports))
