"""Loop references of the spec_accept ops: one row at a time, one draft node at a time, textbook rules.

They take the same arguments as :mod:`graphtune.codegen.spec_accept.accept`'s ops, check nothing
beyond the layout, and consume the generators in the same order (row ``i``: one
``torch.rand(n_i + 1, generator=generators[i], dtype=torch.float64)``; node ``j`` tests with
``u[j]``, the final token uses ``u[n_i]``), so with equal seeds a fast op and its reference return
the same tokens. The final token is drawn by inverse CDF: the first token whose cumulative weight
exceeds ``u * total``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from graphtune.codegen.spec_accept.layout import AcceptResult

__all__ = ["greedy_accept_ref", "rejection_accept_chain_ref", "rejection_accept_tree_ref"]


def _rows(cu_draft: Tensor | Sequence[int]) -> list[tuple[int, int]]:
    cu = [int(c) for c in (cu_draft.tolist() if isinstance(cu_draft, Tensor) else cu_draft)]
    return [(cu[i], cu[i + 1] - cu[i]) for i in range(len(cu) - 1)]


def _draws(rows: list[tuple[int, int]], generators: list[torch.Generator] | None) -> list[list[float]]:
    if generators is None:
        u = torch.rand(sum(n + 1 for _, n in rows), dtype=torch.float64).tolist()
        out, k = [], 0
        for _, n in rows:
            out.append(u[k:k + n + 1])
            k += n + 1
        return out
    return [torch.rand(n + 1, generator=g, dtype=torch.float64, device=g.device).tolist()
            for (_, n), g in zip(rows, generators)]


def _sample(weights: Tensor, u: float) -> int:
    c = weights.double().cumsum(0).tolist()
    target = u * c[-1]
    return next((v for v, cv in enumerate(c) if cv > target), len(c) - 1)


def _depth(par: list[int], j: int) -> int:
    d = 0
    while j >= 0:
        j, d = par[j], d + 1
    return d


def _pack(results: list[tuple[list[int], list[int]]], width: int, device: torch.device) -> AcceptResult:
    """``results``: per row (accepted path nodes, emitted tokens); ``width``: the batch's deepest draft."""
    B = len(results)
    tokens = torch.full((B, width + 1), -1, dtype=torch.long)
    nodes = torch.full((B, width), -1, dtype=torch.long)
    for i, (path, emitted) in enumerate(results):
        tokens[i, :len(emitted)] = torch.tensor(emitted, dtype=torch.long)
        nodes[i, :len(path)] = torch.tensor(path, dtype=torch.long)
    n = torch.tensor([len(p) for p, _ in results], dtype=torch.long)
    return AcceptResult(tokens.to(device), n.to(device), nodes.to(device))


def greedy_accept_ref(draft_tokens: Tensor, cu_draft: Tensor | Sequence[int], target_argmax: Tensor,
                      parent: Tensor | None = None) -> AcceptResult:
    """Reference of :func:`~graphtune.codegen.spec_accept.accept.greedy_accept`: check every root-to-node path.

    Examples
    --------
    >>> greedy_accept_ref(torch.tensor([5, 6, 7]), [0, 3], torch.tensor([5, 6, 7, 9])).emitted()
    [[5, 6, 7, 9]]
    """
    tok, am = draft_tokens.tolist(), target_argmax.tolist()
    out, width = [], 0
    for i, (s, n) in enumerate(_rows(cu_draft)):
        par = parent[s:s + n].tolist() if parent is not None else list(range(-1, n - 1))
        tb = s + i
        best: list[int] = []
        for j in range(n):
            width = max(width, _depth(par, j))
            path, k = [], j
            while k >= 0:
                path.insert(0, k)
                k = par[k]
            if all(tok[s + k] == am[tb + par[k] + 1] for k in path) and len(path) > len(best):
                best = path  # deeper wins; among equally deep, the first (smallest index) stays
        last = best[-1] if best else -1
        out.append((best, [tok[s + k] for k in best] + [am[tb + last + 1]]))
    return _pack(out, width, draft_tokens.device)


def rejection_accept_chain_ref(draft_tokens: Tensor, cu_draft: Tensor | Sequence[int], draft_probs: Tensor | None,
                               target_probs: Tensor, generators: list[torch.Generator] | None = None) -> AcceptResult:
    """Reference of :func:`~graphtune.codegen.spec_accept.accept.rejection_accept_chain`: Leviathan/Chen per row.

    Examples
    --------
    >>> p = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    >>> rejection_accept_chain_ref(torch.tensor([0]), [0, 1], None, p).emitted()  # p(0) = 0: rejected
    [[1]]
    """
    tok = draft_tokens.tolist()
    rows = _rows(cu_draft)
    draws = _draws(rows, generators)
    out, width = [], 0
    for i, (s, n) in enumerate(rows):
        u, tb = draws[i], s + i
        width = max(width, n)
        path: list[int] = []
        final = None
        for j in range(n):
            x = tok[s + j]
            p = target_probs[tb + j].double()
            q = draft_probs[s + j].double() if draft_probs is not None else torch.nn.functional.one_hot(
                torch.tensor(x), p.shape[0]).double()
            if u[j] * q[x] < p[x]:  # accept with probability min(1, p(x) / q(x))
                path.append(j)
                continue
            r = (p - q).clamp(min=0)
            final = _sample(r if r.sum() > 0 else p, u[n])
            break
        if final is None:  # every draft accepted: the bonus token
            final = _sample(target_probs[tb + n].double(), u[n])
        out.append((path, [tok[s + j] for j in path] + [final]))
    return _pack(out, width, draft_tokens.device)


def rejection_accept_tree_ref(draft_tokens: Tensor, cu_draft: Tensor | Sequence[int], parent: Tensor | None,
                              draft_probs: Tensor | None, target_probs: Tensor,
                              generators: list[torch.Generator] | None = None) -> AcceptResult:
    """Reference of :func:`~graphtune.codegen.spec_accept.accept.rejection_accept_tree`: SpecInfer per row.

    Examples
    --------
    >>> p = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])   # root children: token 0 (p = 0), token 1
    >>> r = rejection_accept_tree_ref(torch.tensor([0, 1]), [0, 2], torch.tensor([-1, -1]), None, p)
    >>> r.paths(), r.emitted()[0][0]
    ([[1]], 1)
    """
    tok = draft_tokens.tolist()
    rows = _rows(cu_draft)
    draws = _draws(rows, generators)
    V = target_probs.shape[1]
    out, width = [], 0
    for i, (s, n) in enumerate(rows):
        u, tb = draws[i], s + i
        par = parent[s:s + n].tolist() if parent is not None else list(range(-1, n - 1))
        width = max([width] + [_depth(par, j) for j in range(n)])
        cur, path = -1, []
        p = target_probs[tb].double()  # the distribution at the current node
        while True:
            accepted = None
            for c in [j for j in range(n) if par[j] == cur]:  # children, in index order
                x = tok[s + c]
                q = draft_probs[s + c].double() if draft_probs is not None else torch.nn.functional.one_hot(
                    torch.tensor(x), V).double()
                if u[c] * q[x] < p[x]:  # accept with probability min(1, p(x) / q(x))
                    accepted = c
                    break
                r = (p - q).clamp(min=0)  # rejected: p <- norm(max(0, p - q))
                if r.sum() > 0:
                    p = r / r.sum()
            if accepted is None:
                break
            path.append(accepted)
            cur = accepted
            p = target_probs[tb + cur + 1].double()
        out.append((path, [tok[s + j] for j in path] + [_sample(p, u[n])]))
    return _pack(out, width, draft_tokens.device)
