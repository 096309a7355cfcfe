"""Drafters for speculative decoding: who proposes the tokens the target model verifies.

A drafter proposes, per active row, a small tree (a chain is the common case) of candidate next
tokens; the engine scores all of them with the target model in one forward (tree attention) and
keeps exactly the tokens the target would have produced (:mod:`graphtune.codegen.spec_accept`).
A bad draft costs time, never correctness.

* :class:`NGramDrafter` (``speculative="ngram"``): prompt lookup. The row's last ``n`` tokens are
  looked up in its own context (prompt and generated tokens); the tokens that followed the most
  recent earlier occurrences are the draft. With ``branches > 1`` several distinct continuations
  (from different occurrences) form a tree. No model, so the draft has no probabilities: the
  acceptance ops treat it as one-hot (exact for greedy and for sampling).
* :class:`LayerSkipDrafter` (``speculative="layerskip"``): self-speculation. The target's first
  ``layers`` decoder layers, then its own final norm and LM head (LayerSkip-style early exit). Its
  K/V for those layers are the target's own K/V for the same tokens, so the draft forwards write
  into the engine's cache slots that verification then overwrites with identical values: no second
  cache. Its draft distribution ``q`` comes with the tokens (sampling stays lossless).

The :class:`Drafter` protocol: ``propose(request) -> list[Draft]`` with a :class:`DraftRequest`
(the rows' token histories, a token budget per row, and the engine hooks model drafters need).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from graphtune.errors import OptionError

__all__ = ["Draft", "DraftRequest", "Drafter", "NGramDrafter", "LayerSkipDrafter", "DynamicTreeDrafter", "make_drafter",
           "describe_drafter"]


@dataclass
class Draft:
    """One row's proposal: ``tokens[j]`` hangs below ``parents[j]`` (row-local, ``-1``: below the
    row's last accepted token). A chain has ``parents == [-1, 0, 1, ...]``. ``probs`` ``[n, V]``
    is the draft distribution each token was drawn from (None: deterministic, treated as one-hot)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] | None = None  # None: a chain
    probs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.parents is None:
            self.parents = list(range(-1, len(self.tokens) - 1))
        if len(self.parents) != len(self.tokens):
            raise OptionError(f"Draft: {len(self.tokens)} tokens but {len(self.parents)} parents")
        for j, p in enumerate(self.parents):
            if not -1 <= p < j:
                raise OptionError(f"Draft: token {j}'s parent {p} must come before it (or be -1)")
        if self.probs is not None and self.probs.shape[0] != len(self.tokens):
            raise OptionError(f"Draft: probs has {self.probs.shape[0]} rows for {len(self.tokens)} tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.tokens) - 1))


@dataclass
class DraftRequest:
    """What a drafter sees at one speculative step.

    Attributes
    ----------
    rows : list of int
        Engine row ids of the active rows (stable across steps: drafters may keep per-row state).
    histories : list of list of int
        Each row's prompt followed by its generated tokens (the last one not yet in the KV cache).
    budgets : list of int
        Most draft tokens per row for this step (0: do not draft for this row).
    early_exit : callable or None
        ``early_exit(step_tokens, layers) -> logits [B, V]``: run one token per row (at the next
        draft depth) through the target's first ``layers`` decoder layers, then its final norm
        and LM head. Each call moves the rows one position on; the engine rewinds after the step.
    sampling : object
        The engine's :class:`~graphtune.runtime.engine.sampling.Sampling` (drafters that sample use
        its warpers so ``q`` matches the target's warping).
    generators : list of torch.Generator or None
        Per-row generators (sampling); drafters draw from them for reproducibility.
    tree_exit : callable or None
        ``tree_exit(trees, layers) -> list of logits``: per row a draft tree ``(tokens, parents)``
        so far (None: skip the row) run through the target's first ``layers`` layers with tree
        attention; row ``i`` gets ``[1 + len(tokens), V]`` logits (after its last accepted token,
        then after each node). The K/V it writes are those verification writes for the same nodes.
    """

    rows: list[int]
    histories: list[list[int]]
    budgets: list[int]
    early_exit: Callable[[list[int], int], Tensor] | None = None
    sampling: Any = None
    generators: list[torch.Generator] | None = None
    tree_exit: Callable[[list, int], list] | None = None


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft tokens per row (see the module docstring)."""

    name: str

    def propose(self, request: DraftRequest) -> list[Draft]:
        ...


class NGramDrafter:
    """Prompt lookup: continue the row's last n-gram as it continued before in the row's own context.

    Parameters
    ----------
    max_ngram, min_ngram : int
        Longest and shortest suffix looked up (longest first; the first size that matches wins).
    branches : int
        Distinct continuations proposed (from the most recent occurrences first); more than 1 makes
        a tree whose shared leading tokens are merged.

    Examples
    --------
    >>> d = NGramDrafter(max_ngram=2)
    >>> req = DraftRequest(rows=[0], histories=[[5, 6, 7, 8, 9, 5, 6]], budgets=[3])
    >>> d.propose(req)[0].tokens
    [7, 8, 9]
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, branches: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise OptionError(f"NGramDrafter: need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        if branches < 1:
            raise OptionError(f"NGramDrafter: branches must be >= 1, got {branches}")
        self.max_ngram, self.min_ngram, self.branches = max_ngram, min_ngram, branches
        # per history list (the engine appends to one list per row): (that list, tokens indexed,
        # n -> n-gram -> end positions, most recent last). Keyed by the list's identity, so rows of
        # concurrent calls never share an index; reset() drops them all.
        self._index: dict[int, tuple[list[int], list[int], dict[int, dict[tuple, list[int]]]]] = {}

    def reset(self) -> None:
        """Forget every row's index (the engine calls it at the start of each generate call)."""
        self._index.clear()

    def _indexed(self, hist: list[int]) -> dict[int, dict[tuple, list[int]]]:
        entry = self._index.get(id(hist))
        if entry is None or entry[0] is not hist or entry[1][0] > len(hist):
            entry = (hist, [0], {n: {} for n in range(self.min_ngram, self.max_ngram + 1)})
            self._index[id(hist)] = entry
        _, done, idx = entry
        # index every n-gram ending before the last token (the suffix itself is the query);
        # appended tokens only: O(new tokens x n-gram sizes) per step
        for end in range(max(done[0], 1), len(hist)):
            for n, table in idx.items():
                if end >= n:
                    table.setdefault(tuple(hist[end - n:end]), []).append(end)
        done[0] = max(done[0], len(hist))
        return idx

    def propose(self, request: DraftRequest) -> list[Draft]:
        out = []
        for row, hist, budget in zip(request.rows, request.histories, request.budgets):
            out.append(self._propose_row(row, hist, budget) if budget > 0 else Draft())
        return out

    def _propose_row(self, row: int, hist: list[int], budget: int) -> Draft:
        idx = self._indexed(hist)
        conts: list[list[int]] = []
        per_branch = budget if self.branches == 1 else max(1, budget // self.branches)
        for n in range(min(self.max_ngram, len(hist) - 1), self.min_ngram - 1, -1):
            ends = idx[n].get(tuple(hist[len(hist) - n:]))
            if not ends:
                continue
            for end in reversed(ends):  # most recent occurrence first
                cont = hist[end:end + per_branch]
                if cont and cont not in conts:
                    conts.append(cont)
                if len(conts) >= self.branches:
                    break
            if conts:
                break
        return _trie(conts, budget)


def _trie(conts: Sequence[Sequence[int]], budget: int) -> Draft:
    """Merge continuations into one tree (shared leading tokens once), at most ``budget`` nodes."""
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}
    for cont in conts:
        at = -1
        for t in cont:
            nxt = children.get((at, t))
            if nxt is None:
                if len(tokens) >= budget:
                    break
                nxt = len(tokens)
                tokens.append(int(t))
                parents.append(at)
                children[(at, t)] = nxt
            at = nxt
    return Draft(tokens, parents)


class LayerSkipDrafter:
    """Self-speculative drafting: the target's first ``layers`` layers + its final norm and LM head.

    Parameters
    ----------
    layers : int or None
        Decoder layers the draft runs (default: a quarter of the model's, at least 1).
    tokens : int
        Draft tokens per step (a chain).

    Draft tokens are the early-exit argmax (greedy) or drawn from the early-exit distribution,
    warped like the target's (sampling); ``q`` is returned with them, so acceptance stays exact.
    """

    name = "layerskip"

    def __init__(self, layers: int | None = None, tokens: int = 4) -> None:
        if layers is not None and layers < 1:
            raise OptionError(f"LayerSkipDrafter: layers must be >= 1, got {layers}")
        if tokens < 1:
            raise OptionError(f"LayerSkipDrafter: tokens must be >= 1, got {tokens}")
        self.layers, self.tokens = layers, tokens

    def propose(self, request: DraftRequest) -> list[Draft]:
        if request.early_exit is None:
            raise OptionError("LayerSkipDrafter needs the engine's early-exit hook (run it inside graphtune.Engine)")
        from graphtune.runtime.engine.sampling import warp

        n = len(request.rows)
        steps = min(self.tokens, max(request.budgets, default=0))
        toks: list[list[int]] = [[] for _ in range(n)]
        probs: list[list[Tensor]] = [[] for _ in range(n)]
        last = [h[-1] for h in request.histories]
        s = request.sampling
        for _ in range(steps):
            logits = request.early_exit(last, self.layers or 0)  # [n, V]
            if s is not None and s.do_sample:
                p = warp(logits, s).softmax(-1)
                nxt = [int(torch.multinomial(p[i], 1, generator=request.generators[r]).item())  # type: ignore[index]
                       for i, r in enumerate(request.rows)]
            else:
                p = None
                nxt = logits.argmax(-1).tolist()
            for i in range(n):
                if len(toks[i]) < request.budgets[i]:
                    toks[i].append(nxt[i])
                    if p is not None:
                        probs[i].append(p[i])
            last = nxt
        return [Draft(t, None, torch.stack(q) if q else None) for t, q in zip(toks, probs)]


class DynamicTreeDrafter:
    """Dynamic draft trees (DySpec-style) from the self-speculative draft: grow each row's tree where
    the draft is most confident, up to a token budget per step.

    Parameters
    ----------
    layers : int or None
        Decoder layers of the draft (the target's first ``layers`` + its final norm and LM head;
        default a quarter of the model's).
    tokens : int
        Most tree nodes per row per step (the engine's goodput may verify fewer).
    top_k : int
        Children considered per expanded node.
    width : int
        Nodes added per row per expansion round (one draft forward per round).

    Each round runs every row's tree so far through the draft (``DraftRequest.tree_exit``: tree
    attention, the K/V slots verification uses), turns the newest nodes' draft distributions
    into candidate children scored by path probability (the product of draft probabilities from
    the root), and adds the ``width`` best candidates of the row. Greedy: children are the draft's
    top-k tokens. Sampling: children are drawn with replacement from the warped draft distribution
    and carry it as ``q``, so the tree op's recursive rejection stays lossless. A high-probability
    path grows deep, an uncertain position grows wide. The paper's draft is a separate small model:
    SmolLM2 has none here, and the draft is the target's early exit (the issue's substitute).

    Examples
    --------
    >>> import graphtune
    >>> from graphtune.models import build_model
    >>> eng = graphtune.Engine(build_model("llama"), speculative=DynamicTreeDrafter(layers=1, tokens=6))
    >>> res = eng.generate([[1, 5, 6, 7, 5, 6]], max_new_tokens=6)
    >>> len(res.sequences[0])
    6
    """

    name = "dytree"

    def __init__(self, layers: int | None = None, tokens: int = 8, top_k: int = 4, width: int = 2) -> None:
        if layers is not None and layers < 1:
            raise OptionError(f"DynamicTreeDrafter: layers must be >= 1, got {layers}")
        for what, v in (("tokens", tokens), ("top_k", top_k), ("width", width)):
            if v < 1:
                raise OptionError(f"DynamicTreeDrafter: {what} must be >= 1, got {v}")
        self.layers, self.tokens, self.top_k, self.width = layers, tokens, top_k, width

    def propose(self, request: DraftRequest) -> list[Draft]:
        if request.tree_exit is None:
            raise OptionError("DynamicTreeDrafter needs the engine's tree-exit hook (run it inside graphtune.Engine)")
        from graphtune.runtime.engine.sampling import warp

        n = len(request.rows)
        s = request.sampling
        sample = s is not None and s.do_sample
        want = [min(self.tokens, b) for b in request.budgets]
        toks: list[list[int]] = [[] for _ in range(n)]
        pars: list[list[int]] = [[] for _ in range(n)]
        qs: list[list[Tensor]] = [[] for _ in range(n)]
        score: list[list[float]] = [[] for _ in range(n)]  # log path probability of each node
        # greedy: candidate children (score, token, parent) of the nodes seen so far
        cands: list[list[tuple[float, int, int]]] = [[] for _ in range(n)]
        fresh: list[list[int]] = [[-1] if want[i] > 0 else [] for i in range(n)]  # nodes whose q is not read yet
        unexpanded: list[list[int]] = [[-1] if want[i] > 0 else [] for i in range(n)]  # sampling
        while any(fresh):
            logits = request.tree_exit([(toks[i], pars[i]) if fresh[i] else None for i in range(n)],
                                       self.layers or 0)
            for i in range(n):
                if not fresh[i]:
                    continue
                lg = logits[i]  # [1 + nodes, V]: after the root, then after each node
                q = (warp(lg, s) if sample else lg).float().softmax(-1)
                if sample:
                    self._expand_sampled(request, i, q, toks[i], pars[i], qs[i], score[i], unexpanded[i],
                                         fresh[i], want[i])
                else:
                    self._grow_greedy(q, toks[i], pars[i], score[i], cands[i], fresh[i], want[i])
        return [Draft(t, p, torch.stack(q) if q else None) for t, p, q in zip(toks, pars, qs)]

    def _grow_greedy(self, q: Tensor, toks: list[int], pars: list[int], score: list[float],
                     cands: list[tuple[float, int, int]], fresh: list[int], want: int) -> None:
        # children of the newly read nodes join the candidates; the best by path probability are
        # added, whichever node they hang below (DySpec's greedy expansion)
        for e in fresh:
            qe = q[e + 1]
            base = score[e] if e >= 0 else 0.0
            for t in torch.topk(qe, min(self.top_k, qe.numel())).indices.tolist():
                pq = float(qe[t])
                if pq > 0:
                    cands.append((base + math.log(pq), int(t), e))
        fresh.clear()
        cands.sort(key=lambda c: -c[0])
        room = min(self.width, want - len(toks))
        for sc, t, e in cands[:room]:
            fresh.append(len(toks))
            toks.append(t)
            pars.append(e)
            score.append(sc)
        del cands[:room]
        if len(toks) >= want:  # full: the new nodes' children are not needed
            fresh.clear()

    def _expand_sampled(self, request: DraftRequest, i: int, q: Tensor, toks: list[int], pars: list[int],
                        qs: list[Tensor], score: list[float], unexpanded: list[int], fresh: list[int],
                        want: int) -> None:
        # Lossless tree verification needs each node's children to be independent draws from its
        # q: so a node is expanded once, with all of its children, their number fixed before they
        # are drawn. Which nodes to expand (the likeliest paths) may depend on anything drawn
        # before; which drawn children to keep may not (keeping the likelier of two draws would
        # tilt them away from q).
        fresh.clear()
        unexpanded.sort(key=lambda e: -(score[e] if e >= 0 else 0.0))
        g = request.generators[request.rows[i]] if request.generators else None
        for e in unexpanded[:self.width]:
            room = want - len(toks)
            if room <= 0:
                break
            qe = q[e + 1]
            base = score[e] if e >= 0 else 0.0
            for t in torch.multinomial(qe, min(self.top_k, room), replacement=True, generator=g).tolist():
                fresh.append(len(toks))
                toks.append(int(t))
                pars.append(e)
                qs.append(qe)
                score.append(base + math.log(float(qe[t])))
        done = set(unexpanded[:self.width])
        unexpanded[:] = [e for e in unexpanded if e not in done] + list(fresh)
        if len(toks) >= want:
            fresh.clear()


def describe_drafter(d: Drafter) -> str:
    """One line naming a drafter and its settings (``explain``)."""
    if isinstance(d, NGramDrafter):
        return (f"ngram (prompt lookup, n-grams {d.max_ngram}..{d.min_ngram}"
                + (f", {d.branches} branches" if d.branches > 1 else "") + ")")
    if isinstance(d, LayerSkipDrafter):
        return f"layerskip (early exit after {d.layers or 'a quarter of the'} layers, {d.tokens} tokens)"
    if isinstance(d, DynamicTreeDrafter):
        return (f"dytree (dynamic tree from the early exit after {d.layers or 'a quarter of the'} layers, "
                f"{d.tokens} nodes, top-{d.top_k}, {d.width} per round)")
    return getattr(d, "name", type(d).__name__)


def make_drafter(spec: Any) -> Drafter | None:
    """A drafter from a user's ``speculative=`` value: None/False, a Drafter, "ngram" or "layerskip"."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, str):
        if spec == "ngram":
            return NGramDrafter()
        if spec == "layerskip":
            return LayerSkipDrafter()
        if spec == "dytree":
            return DynamicTreeDrafter()
        raise OptionError(f"speculative={spec!r}: expected 'ngram', 'layerskip', 'dytree' or a Drafter")
    if isinstance(spec, Drafter):
        return spec
    raise OptionError(f"speculative: expected 'ngram', 'layerskip', 'dytree' or a Drafter, got {type(spec).__name__}")
