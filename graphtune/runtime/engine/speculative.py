"""Speculative decoding inside the engine: draft, verify in one target forward, accept losslessly.

One speculative step over the active rows:

1. **Draft.** The drafter proposes a small tree (usually a chain) per row, within a per-row budget
   (at most ``tokens``, never more than the row can still emit). Then **goodput** decides how many
   of those tokens to verify (SmartSpec): a verify forward over ``T`` tokens costs ``seconds(T)``
   (:class:`CostModel`: measured online from this call's own forwards, a staircase rather than a
   line on a CPU), a row's next draft token is accepted with its running acceptance rate
   ``alpha_i`` (so its ``k``-th token adds ``alpha_i^k`` expected tokens; one rate after a fully
   accepted draft and one after a rejection, as acceptance comes in bursts), the tokens are
   ordered best marginal gain first, and the prefix of that order with the most expected tokens
   per second is verified. On a CPU, where verifying a token can cost real compute, this keeps
   speculation to the rows and depths where it pays; a row that gets no draft tokens decodes one
   token as usual.
2. **Verify.** One forward of the target over every row's last accepted token followed by its
   draft tokens, written into the row's KV range right after its accepted keys. Attention: the
   shared-prefix folds as in decode, plus tree attention over the row's private keys and the draft
   tokens on each query's own path (:func:`~graphtune.runtime.engine.step.verify_plan`).
3. **Accept.** Greedy: the longest draft path agreeing with the target's argmax, then the target's
   own token. Sampling: Leviathan/Chen rejection sampling (chain) or SpecInfer's recursive
   rejection (tree) on the target's warped distribution (the same temperature/top-k/top-p as
   non-speculative sampling), so the output distribution is exactly the target's
   (:mod:`graphtune.codegen.spec_accept`).
4. **Keep the accepted K/V.** A chain's accepted tokens already sit right after the row's keys:
   the row's length just moves on, and rejected slots are overwritten later (no copy, no re-pad).
   A tree's accepted path is moved down to follow the row's keys (a copy of the accepted tokens'
   K/V only). Each row's positions are its own (``leaf.start + leaf.filled``), so rows accepting
   different numbers of tokens never desynchronise.

Exact: greedy tokens equal the non-speculative engine's (and HF's) up to floating-point
reduction order, which the tests check token for token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from graphtune import flags
from graphtune.codegen.spec_accept.accept import greedy_accept, rejection_accept_chain, rejection_accept_tree
from graphtune.runtime.engine.drafters import Draft, Drafter, DraftRequest
from graphtune.runtime.engine.kv_pool import KVPool
from graphtune.runtime.engine.sampling import Sampling, warp
from graphtune.runtime.engine.step import decode_plan, verify_plan

__all__ = ["SpecRowStats", "Speculator"]


@dataclass
class SpecRowStats:
    """One row's speculation counters (in :class:`~graphtune.runtime.engine.engine.EngineResult`)."""

    proposed: int = 0  # draft tokens sent to verification
    accepted: int = 0  # of those, kept
    steps: int = 0  # verification forwards this row took part in with a draft
    off_steps: int = 0  # steps the row got no draft tokens because they would not pay (goodput)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per verification step (accepted drafts + the target's own token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


@dataclass
class _RowState:
    hist: list[int]  # prompt + generated tokens (what the drafter reads; appended to in place)
    # decayed counts of accepted / tested draft tokens with a Beta(1, 1) prior, kept apart for
    # steps after a fully accepted draft ([1]) and after a rejection ([0]). Why two: acceptance is
    # bursty (a prompt-lookup draft inside a copied span is accepted whole, the first one after
    # the copy ends is not), and one rate averages the two regimes into drafts too long for the
    # second and too short for the first
    hits: list[float] = field(default_factory=lambda: [1.0, 1.0])
    tests: list[float] = field(default_factory=lambda: [2.0, 2.0])
    streak: int = 0  # 1: the row's last verified draft was accepted whole

    @property
    def alpha(self) -> float:
        """Running per-token acceptance rate of this row's drafts in its current regime."""
        return self.hits[self.streak] / self.tests[self.streak]

    def observe(self, accepted: int, proposed_depth: int) -> None:
        # tokens are tested until the first rejection: accepted successes, then one failure
        k = self.streak
        self.hits[k] = DECAY * self.hits[k] + accepted
        self.tests[k] = DECAY * self.tests[k] + accepted + (1 if accepted < proposed_depth else 0)
        self.streak = int(accepted >= proposed_depth)

    def relax(self) -> None:
        for k in (0, 1):
            self.hits[k] = RELAX * self.hits[k] + (1 - RELAX) * 1.0
            self.tests[k] = RELAX * self.tests[k] + (1 - RELAX) * 2.0


SAMPLING_TOKEN_COST = 0.15  # b / a measured for SmolLM2 on one CPU thread (ENGINE_SPEC_TOKEN_COST)
DECAY = 0.7  # weight of a row's older steps in its acceptance rate
RELAX = 0.9  # per skipped step, how much of a row's history is kept while it is not drafted for


class CostModel:
    """Seconds of one forward over ``T`` packed tokens, from this call's recent forwards (decode and
    verify steps).

    :meth:`table` gives the median time measured at ``T`` where there is one, else the least-squares
    line ``a + b T`` (:meth:`coeffs`), made non-decreasing in ``T``. Why not the line alone: on a
    CPU the cost is a staircase, not a line. With tuned linears (:mod:`graphtune.codegen.linear`)
    a forward over 2..4 tokens costs what a 1-token decode step costs and the next token adds a
    step, so a line would charge the free tokens and under-charge the jump.

    ``fixed`` (``b / a``) replaces the measurement: sampling needs it, because how many draft
    tokens a row verifies decides how many random draws it consumes, so choices made from
    wall-clock times would make seeded sampling irreproducible (greedy output never depends on it).
    """

    def __init__(self, window: int = 48, fixed: float | None = None) -> None:
        self.obs: list[tuple[int, float]] = []
        self.window = window
        self.fixed = fixed

    def observe(self, tokens: int, seconds: float) -> None:
        self.obs = (self.obs + [(tokens, seconds)])[-self.window:]

    def coeffs(self) -> tuple[float, float] | None:
        if self.fixed is not None:
            return 1.0, self.fixed
        if not self.obs:
            return None
        xs = [t for t, _ in self.obs]
        ys = [s for _, s in self.obs]
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        if var == 0:  # one batch size seen so far: assume an extra token costs 1/8 of the step
            b = my / (mx + 8.0)
        else:
            b = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var)
        a = max(my - b * mx, 1e-6)
        return a, b

    def table(self, upto: int) -> list[float] | None:
        """``seconds(T)`` for ``T = 0..upto`` (None before the first observation)."""
        ab = self.coeffs()
        if ab is None:
            return None
        a, b = ab
        per: dict[int, list[float]] = {}
        if self.fixed is None:
            for t, sec in self.obs:
                per.setdefault(t, []).append(sec)
        out, top = [], 0.0
        for t in range(upto + 1):
            got = per.get(t)
            est = sorted(got)[len(got) // 2] if got else a + b * t
            top = max(top, est)
            out.append(top)
        return out


class Speculator:
    """Runs speculative steps for one engine call (per-call state: rows' histories and counters).

    Parameters
    ----------
    drafter : Drafter
    tokens : int
        Most draft tokens per row per step.
    runner, pool, sampling, generators
        The engine call's model runner, KV pool, sampling and per-row generators.
    """

    def __init__(self, drafter: Drafter, tokens: int, runner: Any, pool: KVPool, sampling: Sampling,
                 generators: list[torch.Generator] | None) -> None:
        self.drafter, self.tokens = drafter, tokens
        self.runner, self.pool, self.sampling, self.gens = runner, pool, sampling, generators
        self.rows: dict[int, _RowState] = {}
        self.stats: dict[int, SpecRowStats] = {}
        self.min_accept = flags.get("ENGINE_SPEC_MIN_ACCEPT")
        ratio = flags.get("ENGINE_SPEC_TOKEN_COST")
        if ratio < 0:  # sampling must not choose from wall-clock times (see CostModel)
            ratio = SAMPLING_TOKEN_COST if sampling.do_sample else None
        self.cost = CostModel(fixed=ratio)
        self.step_no = 0
        self.draft_s = 0.0
        self.depth_cost = 0.0  # seconds the drafter takes per draft level (0: free, e.g. n-gram)
        reset = getattr(drafter, "reset", None)
        if callable(reset):
            reset()

    def add_row(self, index: int, prompt: Sequence[int]) -> None:
        self.rows[index] = _RowState(list(prompt))
        self.stats[index] = SpecRowStats()

    def observe_decode(self, tokens: int, seconds: float) -> None:
        """A plain decode step's time (the engine reports it): feeds the cost model."""
        self.cost.observe(tokens, seconds)

    def budgets(self, rows: Sequence[Any], max_new: int) -> list[int]:
        """Draft tokens to ask the drafter for, per row. With a drafter whose drafting costs time
        (a model), goodput also charges each draft token its share of a draft forward."""
        out = []
        for row in rows:
            st = self.rows[row.index]
            left = max_new - len(row.out)  # tokens the row may still emit; the last one needs no draft
            if st.alpha < self.min_accept:  # not worth drafting at all
                self.stats[row.index].off_steps += 1
                st.relax()  # drifts back to the prior: the row is probed again some steps later
                out.append(0)
            else:
                out.append(max(0, min(self.tokens, left - 1)))
        if self.depth_cost > 0 and self.cost.fixed is None and any(out):
            out = self._goodput(rows, out, self.depth_cost / len(rows))
        return out

    def allot(self, active: Sequence[Any], drafts: list[Draft]) -> list[int]:
        """Draft tokens to verify per row: greedy on marginal expected tokens while goodput rises."""
        keep = self._goodput(active, [len(d) for d in drafts], 0.0)
        for i, (row, d) in enumerate(zip(active, drafts)):
            if len(d) and not keep[i]:
                self.stats[row.index].off_steps += 1
        return keep

    def _goodput(self, rows: Sequence[Any], lengths: list[int], extra: float) -> list[int]:
        # a forward over B + k tokens costs seconds(B + k) (+ ``extra`` seconds per draft token);
        # a row's j-th draft token adds alpha^j expected tokens. Order the tokens best gain first,
        # then keep the prefix of that order with the most expected tokens per second: a prefix,
        # not "add while the next one pays", because the cost is a staircase (CostModel)
        B = len(lengths)
        cost = self.cost.table(B + sum(lengths))
        if cost is None:  # no forward timed yet: take everything
            return list(lengths)
        alpha = [self.rows[row.index].alpha for row in rows]
        order: list[tuple[int, float]] = []
        taken = [0] * B
        while True:
            best, gain = -1, 0.0
            for i, n in enumerate(lengths):
                if taken[i] < n:
                    g = alpha[i] ** (taken[i] + 1)
                    if g > gain:
                        best, gain = i, g
            if best < 0:
                break
            taken[best] += 1
            order.append((best, gain))
        tokens, best_n, best_rate = float(B), 0, B / cost[B]
        for n, (_, gain) in enumerate(order, 1):
            tokens += gain
            rate = tokens / (cost[B + n] + extra * n)
            if rate > best_rate * (1 + 1e-9):
                best_n, best_rate = n, rate
        keep = [0] * B
        for i, _ in order[:best_n]:
            keep[i] += 1
        return keep

    def step(self, engine: Any, active: Sequence[Any], max_new: int) -> list[list[int]] | None:
        """One speculative step: the emitted tokens per active row, or None if no row got a draft
        (the caller then runs a plain decode step, which is cheaper)."""
        self.step_no += 1
        for row in active:
            st = self.rows[row.index]
            st.hist.extend(row.out[len(st.hist) - len(row.prompt):])  # tokens emitted since the last step
        budgets = self.budgets(active, max_new)
        if not any(budgets):
            return None
        t0 = time.perf_counter()
        request = DraftRequest([row.index for row in active], [self.rows[row.index].hist for row in active],
                               budgets, self._early_exit_hook(engine, active), self.sampling,
                               self.gens, self._tree_exit_hook(engine, active))
        drafts = [_clip(d, b) for d, b in zip(self.drafter.propose(request), budgets)]
        spent = time.perf_counter() - t0
        levels = max(budgets)
        if levels and spent / levels > 5e-4:  # a drafter that costs time per level (a model)
            per = spent / levels
            self.depth_cost = per if not self.depth_cost else 0.7 * self.depth_cost + 0.3 * per
        drafts = [_clip(d, k) for d, k in zip(drafts, self.allot(active, drafts))]
        self.draft_s += time.perf_counter() - t0
        if not any(len(d) for d in drafts):
            return None
        t0 = time.perf_counter()
        out = self._verify(engine, active, drafts)
        self.cost.observe(len(active) + sum(map(len, drafts)), time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------------ internals

    def _early_exit_hook(self, engine: Any, active: Sequence[Any]) -> Any:
        leaves = [row.leaf for row in active]
        depth = [0]

        def early_exit(tokens: list[int], layers: int) -> Tensor:
            # one token per row at draft depth d: written at leaf.filled + d (slots verification
            # rewrites with the same values for these layers), positions follow the row's
            d = depth[0]
            saved = [leaf.filled for leaf in leaves]
            for leaf in leaves:
                leaf.filled += d
            try:
                plan = decode_plan(leaves, self.runner.kv_heads, torch.get_num_threads())
                pos = torch.tensor([leaf.start + leaf.filled for leaf in leaves], dtype=torch.long)
            finally:
                for leaf, f in zip(leaves, saved):
                    leaf.filled = f
            n = layers or max(1, self.runner.num_layers // 4)
            ids = torch.tensor(tokens, dtype=torch.long)
            hidden = engine._forward(plan, self.pool, ids, pos, early_exit_layers=n)
            depth[0] += 1
            return self.runner.logits(hidden)

        return early_exit

    def _tree_forward(self, engine: Any, rows: Sequence[Any], trees: Sequence[tuple[list[int], list[int]]],
                      early_exit_layers: int | None = None) -> tuple[Tensor, list[list[int]]]:
        """One forward over each row's last emitted token (the root) and its draft tree
        ``(tokens, parents)``, written at the row's next slots (node j at leaf.filled + 1 + j):
        ``(logits [T, V] after each packed token, per-row depths with the root at 0)``. Verification
        and the dynamic tree's draft rounds run the same tokens at the same slots, so the early
        layers' K/V a draft round writes are what verification writes again."""
        leaves = [row.leaf for row in rows]
        # row-local verify sequence: 0 = the last emitted token (root), 1 + j = draft token j
        parents = [[-1] + [p + 1 for p in par] for _, par in trees]
        tokens = [[row.out[-1]] + list(toks) for row, (toks, _) in zip(rows, trees)]
        depth = [_depths(p) for p in parents]
        plan = verify_plan(leaves, parents)
        ids = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long)
        pos = torch.tensor([leaf.start + leaf.filled + dd for leaf, ds in zip(leaves, depth) for dd in ds],
                           dtype=torch.long)
        hidden = engine._forward(plan, self.pool, ids, pos, early_exit_layers=early_exit_layers)
        return self.runner.logits(hidden), depth

    def _tree_exit_hook(self, engine: Any, active: Sequence[Any]) -> Any:
        def tree_exit(trees: list[tuple[list[int], list[int]] | None], layers: int) -> list[Tensor | None]:
            # the rows' current draft trees through the first ``layers`` layers (DraftRequest.tree_exit)
            idx = [i for i, t in enumerate(trees) if t is not None]
            out: list[Tensor | None] = [None] * len(trees)
            if not idx:
                return out
            n = layers or max(1, self.runner.num_layers // 4)
            logits, _ = self._tree_forward(engine, [active[i] for i in idx], [trees[i] for i in idx], n)  # type: ignore[misc]
            at = 0
            for i in idx:
                size = 1 + len(trees[i][0])  # type: ignore[index]
                out[i] = logits[at:at + size]  # [1 + nodes, V]: after the root, then after each node
                at += size
            return out

        return tree_exit

    def _verify(self, engine: Any, active: Sequence[Any], drafts: list[Draft]) -> list[list[int]]:
        logits, depth = self._tree_forward(engine, active, [(d.tokens, d.parents) for d in drafts])  # type: ignore[misc]
        res = _accept(drafts, logits, self.sampling, self.gens, [row.index for row in active])
        out = []
        for i, (row, d) in enumerate(zip(active, drafts)):
            path, emitted = res[i]
            self._keep(row.leaf, path)
            st, stats = self.rows[row.index], self.stats[row.index]
            if len(d):
                stats.proposed += len(d)
                stats.accepted += len(path)
                stats.steps += 1
                st.observe(len(path), max(depth[i]))  # the draft's depth (verify depths count the root as 0)
            out.append(emitted)
        return out

    def _keep(self, leaf: Any, path: list[int]) -> None:
        """The root and the accepted draft tokens (row-local draft indices ``path``) become the
        row's next keys; everything else written by verification is left to be overwritten."""
        base = leaf.slot + leaf.filled + 1  # draft token j was written at base + j
        src = [base + j for j in path]
        dst = list(range(base, base + len(path)))
        if src != dst:  # a tree path that is not the leading chain: move its K/V down
            data = self.pool.data  # [L, 2, Hkv, slots, D]
            data[:, :, :, dst] = data[:, :, :, src]
        leaf.filled += 1 + len(path)


def _accept(drafts: list[Draft], logits: Tensor, sampling: Sampling, gens: list[torch.Generator] | None,
            rows: list[int]) -> list[tuple[list[int], list[int]]]:
    """(accepted draft nodes, emitted tokens) per row. ``logits [T + B, V]``: the target's after
    each verify token (row ``i``'s root, then its draft tokens), the spec_accept ops' layout."""
    cu = [0]
    for d in drafts:
        cu.append(cu[-1] + len(d))
    tok = torch.tensor([t for d in drafts for t in d.tokens], dtype=torch.long)
    chain = all(d.is_chain for d in drafts)
    parent = None if chain else torch.tensor([p for d in drafts for p in d.parents], dtype=torch.long)  # type: ignore[union-attr]
    if not sampling.do_sample:
        res = greedy_accept(tok, cu, logits.argmax(-1), parent, check=False)
    else:
        p = warp(logits, sampling).softmax(-1)  # the same warping as non-speculative sampling
        q = None
        if any(d.probs is not None for d in drafts):
            # drafts without probabilities are deterministic: one-hot rows
            q = torch.zeros(cu[-1], p.shape[-1], dtype=p.dtype)
            for d, a in zip(drafts, cu):
                if len(d):
                    if d.probs is not None:
                        q[a:a + len(d)] = d.probs.to(p.dtype)
                    else:
                        q[torch.arange(a, a + len(d)), torch.tensor(d.tokens)] = 1.0
        g = [gens[r] for r in rows] if gens is not None else None
        if chain:
            res = rejection_accept_chain(tok, cu, q, p, g, check=False)
        else:
            res = rejection_accept_tree(tok, cu, parent, q, p, g, check=False)
    return list(zip(res.paths(), res.emitted()))


def _depths(parents: Sequence[int]) -> list[int]:
    d: list[int] = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


def _clip(d: Draft, budget: int) -> Draft:
    """At most ``budget`` tokens (a prefix of the tree order keeps every kept token's parent)."""
    if len(d) <= budget:
        return d
    return Draft(d.tokens[:budget], d.parents[:budget], None if d.probs is None else d.probs[:budget])  # type: ignore[index]
