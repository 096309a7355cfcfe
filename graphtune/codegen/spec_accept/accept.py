"""Speculative-decoding acceptance ops: greedy, chain rejection sampling and tree (multi-draft) rejection sampling.

All three take a batch of ragged drafts and what the target model said at every draft position
(layout, target-position convention and random draws: :mod:`graphtune.codegen.spec_accept.layout`)
and return an :class:`~graphtune.codegen.spec_accept.layout.AcceptResult`.

- :func:`greedy_accept`: keep the longest draft path the target's argmaxes agree with.
- :func:`rejection_accept_chain`: Leviathan et al. / Chen et al. rejection sampling of a draft
  chain; the emitted tokens are distributed exactly as sampling from the target one token at a time.
- :func:`rejection_accept_tree`: SpecInfer's recursive rejection sampling over a draft tree
  (several candidates per position, sampled or deterministic); lossless too.

The target probabilities are taken *already warped* (temperature, top-k, top-p applied, then
softmax), so the caller applies exactly the warpers it samples with; the ops never emit a token of
target probability 0. The greedy and chain ops are vectorized over rows and draft positions (one
host sync for the output width); the tree op walks each row's tree on the host (a handful of
scalars per node, gathered in one transfer) and samples the final tokens of all rows in one batch.
Loop references of all three: :mod:`graphtune.codegen.spec_accept.reference`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from graphtune.codegen.spec_accept.layout import (AcceptResult, Ragged, check_parent, check_probs, check_tokens,
                                                  draw_uniforms, ragged, sample_inverse_cdf)

__all__ = ["greedy_accept", "rejection_accept_chain", "rejection_accept_tree", "AcceptResult"]


# ======================================================================================
# Greedy
# ======================================================================================


def greedy_accept(draft_tokens: Tensor, cu_draft: Tensor | Sequence[int], target_argmax: Tensor,
                  parent: Tensor | None = None, *, check: bool = True) -> AcceptResult:
    """Greedy verification: keep the longest draft path whose every token is the target's argmax.

    Parameters
    ----------
    draft_tokens : Tensor
        ``[T]`` integer, the draft tokens of all rows, row after row.
    cu_draft : Tensor or sequence of int
        ``[B + 1]`` offsets: row ``i`` owns ``draft_tokens[cu_draft[i]:cu_draft[i + 1]]``.
    target_argmax : Tensor
        ``[T + B]`` integer, the target's argmax at every target position: row ``i``'s
        ``n_i + 1`` positions start at ``cu_draft[i] + i``; position ``0`` follows the root,
        position ``j + 1`` follows draft node ``j``.
    parent : Tensor, optional
        ``[T]`` row-local parents (``-1``: child of the root; ``parent[j] < j``). ``None``: each
        row is a chain (``-1, 0, 1, ...``).
    check : bool
        Check token ids and the tree (a few host syncs); the engine may pass ``False``.

    Returns
    -------
    AcceptResult
        Node ``j`` is accepted when its token equals the argmax at its parent's position and its
        parent is accepted (the root always is); the accepted path is the deepest accepted node's
        (ties: the smallest row-local index) and the emitted tokens are its tokens, then the argmax
        at the position after its last node (the bonus token when a whole chain is accepted).

    Examples
    --------
    >>> drafts = torch.tensor([5, 6, 7, 9, 4])          # row 0: chain 5, 6, 7; row 1: chain 9, 4
    >>> argmax = torch.tensor([5, 6, 1, 2, 9, 3, 8])    # row 0 rejects 7 (argmax 1); row 1 rejects 4
    >>> greedy_accept(drafts, [0, 3, 5], argmax).emitted()
    [[5, 6, 1], [9, 3]]
    >>> parent = torch.tensor([-1, -1, 1])              # a tree: two root children, node 2 under node 1
    >>> r = greedy_accept(torch.tensor([3, 4, 8]), [0, 3], torch.tensor([4, 0, 8, 0]), parent)
    >>> r.emitted(), r.paths()                           # 4 (node 1) then 8 (node 2), bonus 0
    ([[4, 8, 0]], [[1, 2]])
    """
    op = "greedy_accept"
    tok, lay = ragged(op, draft_tokens, cu_draft)
    am = check_tokens(op, "target_argmax", target_argmax, lay, lay.T + lay.B, None, check)
    par = check_parent(op, parent, lay, check)
    if check:
        check_tokens(op, "draft_tokens", tok, lay, lay.T, None, True)
    B, T, dev = lay.B, lay.T, lay.device
    ar_b = torch.arange(B, device=dev)
    if par is None or T == 0:
        row, local, pos = _chain_index(lay)
        n_acc = _prefix_len(tok == am[pos], row, local, lay)
        final = am[lay.cu_t[:-1] + ar_b + n_acc]
        return _chain_result(tok, row, local, n_acc, final, lay)

    row = lay.rows()
    start = lay.cu_t[:-1][row]
    gpar = torch.where(par >= 0, start + par, -1)  # flat parent, -1 = root
    match = tok == am[start + row + par + 1]  # scored at the parent's position
    ok, depth = match.clone(), torch.ones_like(tok)
    anc = gpar.clone()
    for _ in range(lay.K.bit_length()):  # pointer jumping: 2^k ancestors per step, depth <= K
        has = anc >= 0
        a = anc.clamp(min=0)
        ok = ok & (~has | ok[a])
        depth = depth + torch.where(has, depth[a], 0)
        anc = torch.where(has, anc[a], -1)
    D = int(depth.max())
    local = torch.arange(T, device=dev) - start
    key = torch.where(ok, depth * (T + 1) + (T - local), 0)  # deepest, then smallest index
    best = torch.zeros(B, dtype=torch.long, device=dev).scatter_reduce(0, row, key, "amax")
    n_acc = best // (T + 1)
    leaf = lay.cu_t[:-1] + T - best % (T + 1)  # flat index of the deepest accepted node (if n_acc > 0)
    # ancestors of the leaf, leaf first: column k = k-th ancestor (flat), then reversed per row
    cols, cur = [], leaf.clamp(max=T - 1)
    for _ in range(D):
        cols.append(cur)
        cur = gpar[cur].clamp(min=0)
    anc_flat = torch.stack(cols, 1)  # [B, D]
    ar_d = torch.arange(D, device=dev)
    keep = ar_d < n_acc[:, None]
    flat = torch.where(keep, anc_flat.gather(1, (n_acc[:, None] - 1 - ar_d).clamp(min=0)), 0)
    nodes = torch.where(keep, flat - lay.cu_t[:-1, None], -1)
    last = torch.where(n_acc > 0, leaf - lay.cu_t[:-1], -1)
    final = am[lay.cu_t[:-1] + ar_b + last + 1]
    tokens = torch.full((B, D + 1), -1, dtype=torch.long, device=dev)
    tokens[:, :D] = torch.where(keep, tok[flat], -1)
    tokens.scatter_(1, n_acc[:, None], final[:, None])
    return AcceptResult(tokens, n_acc, nodes)


# ======================================================================================
# Chain rejection sampling
# ======================================================================================


def rejection_accept_chain(draft_tokens: Tensor, cu_draft: Tensor | Sequence[int], draft_probs: Tensor | None,
                           target_probs: Tensor, generators: list[torch.Generator] | None = None, *,
                           check: bool = True) -> AcceptResult:
    """Lossless rejection sampling of draft chains (Leviathan et al. 2023, Chen et al. 2023).

    Draft ``j`` of a row (token ``x``, drawn from ``q_j``) is accepted with probability
    ``min(1, p_j(x) / q_j(x))`` if every earlier draft was; at the first rejection the row emits
    ``y ~ norm(max(0, p_j - q_j))`` and stops; if every draft is accepted it emits a bonus token
    ``y ~ p_{n}``. The emitted tokens are distributed exactly as sampling ``p`` token by token.

    Parameters
    ----------
    draft_tokens : Tensor
        ``[T]`` integer draft tokens, row after row.
    cu_draft : Tensor or sequence of int
        ``[B + 1]`` offsets of the rows' drafts.
    draft_probs : Tensor or None
        ``[T, V]``: ``q`` of every draft token (the distribution it was *sampled* from). ``None``:
        one-hot ``q``, a draft ``x`` is accepted with probability ``p(x)`` and the residual is
        ``p`` without ``x``: exact for deterministic drafts (n-gram, greedy draft model), and for
        any drafts that do not depend on ``generators`` (sampled ones are accepted less often).
    target_probs : Tensor
        ``[T + B, V]`` warped target probabilities at every target position (layout of
        :func:`greedy_accept`'s ``target_argmax``: position ``j`` scores draft ``j``, position
        ``n_i`` gives the bonus token).
    generators : list of torch.Generator, optional
        One per row; row ``i`` draws ``n_i + 1`` float64 uniforms in one call (draft ``j``'s test
        uses ``u[j]``, the final token ``u[n_i]``). ``None``: torch's default generator.
    check : bool
        Check token ids and that probability rows are non-negative and sum to 1.

    Returns
    -------
    AcceptResult

    Examples
    --------
    >>> p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])   # one row, one draft: target is sure of token 1
    >>> r = rejection_accept_chain(torch.tensor([1]), [0, 1], None, p, [torch.Generator().manual_seed(0)])
    >>> r.num_accepted.tolist(), r.tokens[0, 0].item()         # accepted; then a bonus token from p[1]
    ([1], 1)
    >>> r = rejection_accept_chain(torch.tensor([2]), [0, 1], None, p, [torch.Generator().manual_seed(0)])
    >>> r.emitted()                                            # token 2 has p = 0: rejected, y ~ p[0] = 1
    [[1]]
    """
    op = "rejection_accept_chain"
    tok, lay, dp, tp = _check_sampling(op, draft_tokens, cu_draft, draft_probs, target_probs, check)
    u = draw_uniforms(op, generators, lay)
    return _chain_sample(tok, lay, dp, tp, u)


def _chain_sample(tok: Tensor, lay: Ragged, dp: Tensor | None, tp: Tensor, u: Tensor) -> AcceptResult:
    B, T, dev = lay.B, lay.T, lay.device
    row, local, pos = _chain_index(lay)
    ar_t, ar_b = torch.arange(T, device=dev), torch.arange(B, device=dev)
    px = tp[pos, tok].double()
    qx = dp[ar_t, tok].double() if dp is not None else torch.ones_like(px)
    n_acc = _prefix_len(u[pos] * qx < px, row, local, lay)
    lens = lay.cu_t[1:] - lay.cu_t[:-1]
    base = lay.cu_t[:-1] + ar_b  # each row's first target position (and first uniform)
    p = tp[base + n_acc].double()  # [B, V]: the distribution after the accepted prefix
    r = p
    if T:
        rejected = (n_acc < lens)[:, None]
        node = (lay.cu_t[:-1] + n_acc).clamp(max=T - 1)  # the rejected draft (where there is one)
        if dp is not None:
            r = torch.where(rejected, (p - dp[node].double()).clamp(min=0), p)
        else:
            x = tok[node][:, None]
            r = p.scatter(1, x, torch.where(rejected, 0.0, p.gather(1, x)))
        r = torch.where(r.sum(1, keepdim=True) > 0, r, p)  # rounding guard: an empty residual keeps p
    final = sample_inverse_cdf(r, u[base + lens])
    return _chain_result(tok, row, local, n_acc, final, lay)


# ======================================================================================
# Tree rejection sampling
# ======================================================================================


def rejection_accept_tree(draft_tokens: Tensor, cu_draft: Tensor | Sequence[int], parent: Tensor | None,
                          draft_probs: Tensor | None, target_probs: Tensor,
                          generators: list[torch.Generator] | None = None, *, check: bool = True) -> AcceptResult:
    """Lossless recursive rejection sampling over draft trees (SpecInfer; multi-draft speculative sampling).

    Starting at the root with ``p`` = the target's distribution at the root's position, the
    children of the current node are tried in index order: child ``c`` (token ``x``, drawn from
    ``q_c``) is accepted with probability ``min(1, p(x) / q_c(x))``; on rejection
    ``p <- norm(max(0, p - q_c))`` and the next child is tried. An accepted child becomes the
    current node (``p`` = the target's distribution after it); when every child is rejected (or
    the node is a leaf) the row emits ``y ~ p`` and stops. Exact for children drawn independently
    given their parent: sampled with replacement, or deterministic (``q`` one-hot: then a rejected
    token gets ``p = 0``, so a duplicate sibling is rejected with certainty).

    Parameters
    ----------
    draft_tokens : Tensor
        ``[T]`` integer draft tokens, row after row.
    cu_draft : Tensor or sequence of int
        ``[B + 1]`` offsets of the rows' drafts.
    parent : Tensor or None
        ``[T]`` row-local parents (``-1``: child of the root; ``parent[j] < j``); ``None``: chains,
        served by :func:`rejection_accept_chain` (same draws, same result).
    draft_probs : Tensor or None
        ``[T, V]``: the distribution each node was drawn from; ``None``: every node is
        deterministic (one-hot ``q``). A one-hot row marks one deterministic node.
    target_probs : Tensor
        ``[T + B, V]`` warped target probabilities; row ``i``'s position ``0`` follows the root,
        position ``j + 1`` follows node ``j`` (a node is scored at ``parent[j] + 1``).
    generators : list of torch.Generator, optional
        One per row; row ``i`` draws ``n_i + 1`` float64 uniforms in one call: node ``j``'s test
        uses ``u[j]``, the final token ``u[n_i]``. ``None``: torch's default generator.
    check : bool
        Check token ids, the tree, and that probability rows are non-negative and sum to 1.

    Returns
    -------
    AcceptResult

    Examples
    --------
    >>> # one row, two deterministic root children: token 2 twice (a duplicate) and token 0
    >>> p = torch.tensor([[0.5, 0.0, 0.5], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [1.0, 0.0, 0.0]])
    >>> gens = [torch.Generator().manual_seed(0)]   # its uniforms: 0.97, 0.71, 0.46, 0.92
    >>> r = rejection_accept_tree(torch.tensor([2, 2, 0]), [0, 3], torch.tensor([-1, -1, -1]), None, p, gens)
    >>> r.paths(), r.emitted()  # node 0 rejected (0.97 > p(2)), so p = (1, 0, 0): node 1 rejected, node 2 accepted
    ([[2]], [[0, 0]])
    """
    op = "rejection_accept_tree"
    tok, lay, dp, tp = _check_sampling(op, draft_tokens, cu_draft, draft_probs, target_probs, check)
    par = check_parent(op, parent, lay, check)
    u = draw_uniforms(op, generators, lay)
    if par is None or lay.T == 0:
        return _chain_sample(tok, lay, dp, tp, u)

    B, T, dev = lay.B, lay.T, lay.device
    row = lay.rows()
    ar_t = torch.arange(T, device=dev)
    ppos = lay.cu_t[:-1][row] + row + par + 1  # flat target position of each node's parent
    px = tp[ppos, tok].double()  # p(x) at the parent's position, unmodified
    qx = dp[ar_t, tok].double() if dp is not None else torch.ones_like(px)
    psum = tp.sum(-1, dtype=torch.float64)
    # everything the walk reads, in one transfer
    tok_h, par_h, u_h, px_h, qx_h, psum_h = (x.tolist() for x in (tok, par, u, px, qx, psum))

    depth = [0] * T
    paths: list[list[int]] = []
    final_pos: list[int] = []
    zero_rows: list[int] = []  # (row, token) pairs to zero in the final distributions (one-hot rejections)
    zero_toks: list[int] = []
    vec_rows: dict[int, Tensor] = {}  # rows whose final distribution is an explicit residual (sampled q)
    for i in range(B):
        s, n = lay.cu[i], lay.cu[i + 1] - lay.cu[i]
        tb = s + i  # the row's first target position and first uniform
        kids: dict[int, list[int]] = {}
        for j in range(n):
            kids.setdefault(par_h[s + j], []).append(j)
            depth[s + j] = 1 + (depth[s + par_h[s + j]] if par_h[s + j] >= 0 else 0)
        cur, path = -1, []
        while True:
            pos = tb + cur + 1
            removed: dict[int, float] = {}  # one-hot rejections: token -> its p at this position
            vec: Tensor | None = None  # the residual, once a sampled child was rejected
            nxt = None
            for c in kids.get(cur, ()):
                t = s + c
                x, uc = tok_h[t], u_h[tb + c]
                if vec is not None:
                    ok = uc * qx_h[t] < float(vec[x])
                elif removed:
                    ok = x not in removed and uc * (psum_h[pos] - sum(removed.values())) < px_h[t]
                else:
                    ok = uc * qx_h[t] < px_h[t]
                if ok:
                    nxt = c
                    break
                if dp is None:  # one-hot q: the residual is p without x (kept unless that empties it)
                    if x not in removed and psum_h[pos] - sum(removed.values()) - px_h[t] > 0:
                        removed[x] = px_h[t]
                else:
                    r = ((vec if vec is not None else tp[pos].double()) - dp[t].double()).clamp(min=0)
                    mass = r.sum()
                    if float(mass) > 0:
                        vec = r / mass
            if nxt is None:
                final_pos.append(pos)
                if vec is not None:
                    vec_rows[i] = vec
                zero_rows += [i] * len(removed)
                zero_toks += list(removed)
                break
            path.append(nxt)
            cur = nxt
        paths.append(path)

    p = tp[torch.tensor(final_pos, device=dev)].double()
    r = p.clone()
    if zero_rows:
        r[torch.tensor(zero_rows, device=dev), torch.tensor(zero_toks, device=dev)] = 0.0
    if vec_rows:
        r[torch.tensor(list(vec_rows), device=dev)] = torch.stack(list(vec_rows.values()))
    r = torch.where(r.sum(1, keepdim=True) > 0, r, p)
    last_u = lay.cu_t[1:] + torch.arange(B, device=dev)  # u[n_i] of each row
    final = sample_inverse_cdf(r, u[last_u]).tolist()

    D = max(depth)
    tokens = [[-1] * (D + 1) for _ in range(B)]
    nodes = [[-1] * D for _ in range(B)]
    for i, path in enumerate(paths):
        for k, j in enumerate(path):
            tokens[i][k] = tok_h[lay.cu[i] + j]
            nodes[i][k] = j
        tokens[i][len(path)] = final[i]
    return AcceptResult(torch.tensor(tokens, dtype=torch.long, device=dev),
                        torch.tensor([len(p_) for p_ in paths], dtype=torch.long, device=dev),
                        torch.tensor(nodes, dtype=torch.long, device=dev).reshape(B, D))


# ======================================================================================
# Shared helpers
# ======================================================================================


def _check_sampling(op: str, draft_tokens, cu_draft, draft_probs, target_probs, check: bool):
    tok, lay = ragged(op, draft_tokens, cu_draft)
    tp = check_probs(op, "target_probs", target_probs, lay, lay.T + lay.B, None, check)
    V = tp.shape[1]
    dp = None if draft_probs is None else check_probs(op, "draft_probs", draft_probs, lay, lay.T, V, check)
    check_tokens(op, "draft_tokens", tok, lay, lay.T, V, check)
    return tok, lay, dp, tp


def _chain_index(lay: Ragged) -> tuple[Tensor, Tensor, Tensor]:
    """Per draft: its row, its row-local index ``j`` and its flat scoring position ``cu[i] + i + j``."""
    row = lay.rows()
    ar = torch.arange(lay.T, device=lay.device)
    return row, ar - lay.cu_t[:-1][row], ar + row


def _prefix_len(ok: Tensor, row: Tensor, local: Tensor, lay: Ragged) -> Tensor:
    """``[B]``: the length of each row's leading run of ``True`` in ``ok [T]``."""
    pad = torch.zeros(lay.B, lay.K, dtype=torch.long, device=lay.device)
    pad[row, local] = ok.long()
    return pad.cumprod(1).sum(1)


def _chain_result(tok: Tensor, row: Tensor, local: Tensor, n_acc: Tensor, final: Tensor, lay: Ragged) -> AcceptResult:
    B, K, dev = lay.B, lay.K, lay.device
    drafts = torch.full((B, K), -1, dtype=torch.long, device=dev)
    drafts[row, local] = tok
    ar_k = torch.arange(K, device=dev)
    keep = ar_k < n_acc[:, None]
    tokens = torch.full((B, K + 1), -1, dtype=torch.long, device=dev)
    tokens[:, :K] = torch.where(keep, drafts, -1)
    tokens.scatter_(1, n_acc[:, None], final[:, None])
    return AcceptResult(tokens, n_acc, torch.where(keep, ar_k.expand(B, K), -1))
