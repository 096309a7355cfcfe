"""Token selection: greedy, or sampling with temperature, top-k and top-p as Hugging Face applies them.

The warpers run in HF's order (temperature, then top-k, then top-p) with HF's semantics (top-k
keeps ties of the k-th logit; top-p keeps the smallest set whose probability exceeds ``top_p``,
at least one token), so the sampled distribution equals HF ``generate``'s. Each row draws from its
own generator seeded by ``(seed, row)``: a row's samples do not depend on which other rows share
its batch or when it was admitted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from graphtune.errors import OptionError

__all__ = ["Sampling", "select_tokens"]


@dataclass(frozen=True)
class Sampling:
    """How to choose the next token. ``do_sample=False`` is greedy (argmax)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.do_sample:
            if not self.temperature > 0:
                raise OptionError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k is not None and self.top_k < 0:
                raise OptionError(f"top_k must be >= 0, got {self.top_k}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise OptionError(f"top_p must be in (0, 1], got {self.top_p}")

    def generators(self, rows: int) -> list[torch.Generator] | None:
        if not self.do_sample:
            return None
        base = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return [torch.Generator().manual_seed((base * 1_000_003 + r) % 2**63) for r in range(rows)]


def warp(logits: Tensor, s: Sampling) -> Tensor:
    """HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, in that order. logits: [n, V] fp32."""
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k:
        k = min(s.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - s.top_p)
        drop[..., -1:] = False  # keep at least one token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def select_tokens(logits: Tensor, s: Sampling, gens: list[torch.Generator] | None, rows: list[int]) -> list[int]:
    """One token per row of ``logits [n, V]``; ``rows[i]`` is the engine row of logits row i (its generator)."""
    if not s.do_sample:
        return logits.argmax(dim=-1).tolist()
    probs = warp(logits, s).softmax(dim=-1)
    assert gens is not None
    return [int(torch.multinomial(probs[i], 1, generator=gens[r]).item()) for i, r in enumerate(rows)]
