"""Shared helpers of the spec_accept tests: random ragged draft batches, warped distributions, a chi-square check."""
from __future__ import annotations

import math

import torch


def gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def warped(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """softmax after top-k (keep the k largest) and top-p (smallest set with mass >= top_p): rows with zeros."""
    p = logits.double().softmax(-1)
    if top_k is not None:
        kth = p.topk(top_k, -1).values[..., -1:]
        p = torch.where(p >= kth, p, 0.0)
    if top_p is not None:
        sp, order = p.sort(-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass of the strictly more likely tokens
        keep_sorted = before < top_p * sp.sum(-1, keepdim=True)
        p = p * torch.zeros_like(p).scatter(-1, order, keep_sorted.double())
    return (p / p.sum(-1, keepdim=True)).float()


def random_batch(seed: int, B: int, V: int, max_n: int, *, tree: bool, sampled: bool, zeros: bool = True,
                 argmax_bias: float = 0.0):
    """A ragged batch: (draft_tokens, cu_draft, parent, draft_probs or None, target_probs).

    ``tree``: random parents (forests, duplicates); else chains. ``zeros``: target rows with
    top-k zeros. ``argmax_bias``: the chance a draft token is its scoring position's argmax.
    """
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_n + 1, (B,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    T = int(cu[-1])
    par = []
    for n in lens.tolist():
        par += [int(torch.randint(-1, j, (1,), generator=g)) if tree and j else j - 1 for j in range(n)]
    par_t = torch.tensor(par, dtype=torch.long)
    logits = torch.randn(T + B, V, generator=g) * 2
    tp = warped(logits, top_k=max(1, V // 2)) if zeros else logits.softmax(-1)
    dp = torch.randn(T, V, generator=g).softmax(-1) if sampled else None
    tok = torch.randint(0, V, (T,), generator=g)
    if argmax_bias:
        row = torch.repeat_interleave(torch.arange(B), lens)
        pos = cu[:-1][row] + row + par_t + 1
        hit = torch.rand(T, generator=g) < argmax_bias
        tok = torch.where(hit, tp.argmax(-1)[pos], tok)
    return tok, cu, par_t, dp, tp


def chi2_quantile(dof: int, z: float = 4.753) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 4.753: upper tail 1e-6)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def assert_distribution(counts: torch.Tensor, probs: torch.Tensor, what: str) -> float:
    """Counts drawn from ``probs``: zero where probs is 0, chi-square below its 1e-6 quantile, TV below 4 sqrt(K/N).

    Returns the chi-square statistic (the tests of the checks' power use it).
    """
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = float(counts.sum())
    outside = counts[probs == 0].sum()
    assert outside == 0, f"{what}: {int(outside)} samples where the target probability is 0"
    stat = chi2_statistic(counts, probs)
    support = int((probs > 0).sum())
    tv = 0.5 * float((counts / n - probs).abs().sum())
    assert tv < 4 * math.sqrt(support / n), f"{what}: total variation {tv:.4f} with N={int(n)}"
    assert stat < chi2_quantile(support - 1), f"{what}: chi-square {stat:.1f} >= {chi2_quantile(support - 1):.1f}"
    return stat


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n, m = float(counts.sum()), probs > 0
    exp = probs[m] * n
    return float(((counts[m] - exp) ** 2 / exp).sum())
