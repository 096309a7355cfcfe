"""The spec_accept ops' shared pieces: the ragged draft layout, input checks, the random draws and the result type.

Layout (every op of the family)
-------------------------------
A batch of ``B`` rows; row ``i`` has ``n_i >= 0`` draft tokens, flattened row after row into
``draft_tokens [T]`` (``T = sum n_i``) with offsets ``cu_draft [B + 1]`` (``cu_draft[0] = 0``,
``cu_draft[i + 1] - cu_draft[i] = n_i``; vLLM's ``cu_num_draft_tokens`` with a leading 0). A
draft node is named by its *row-local* index ``j`` (``0 <= j < n_i``), flat index
``cu_draft[i] + j``.

``parent [T]`` (row-local, ``-1`` = a child of the root, i.e. of the last accepted token) gives
the tree; parents come before their children (``parent[j] < j``). A chain is ``-1, 0, 1, ...``,
which is what ``parent=None`` means.

Target positions: the target model runs once on ``[root, d_0, ..., d_{n_i - 1}]``, so row ``i``
has ``n_i + 1`` target positions, flattened the same way with offsets ``cu_draft[i] + i``.
Row-local position ``0`` holds the target's prediction after the root (it scores the first draft
level), position ``j + 1`` its prediction after draft node ``j`` (it scores ``j``'s children, or
gives the bonus token when ``j`` is the last accepted node). A node is scored at its parent's
position: ``parent[j] + 1``.

Randomness
----------
Row ``i`` consumes exactly ``n_i + 1`` uniforms from its own generator, in one call
``torch.rand(n_i + 1, generator=generators[i], dtype=torch.float64)`` (on the generator's
device), whatever the outcome, rows in order: ``u[j]`` decides draft node ``j`` (used only if
``j`` is tested) and ``u[n_i]`` picks the final token by inverse CDF. A row's outcome therefore
depends only on its own inputs and generator, not on the batch it is in. With ``generators=None``
the same layout is drawn in one call from torch's default CPU generator (reproducible under
``torch.manual_seed``, but then rows are not independent of the batch composition).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from graphtune.errors import DTypeError, OptionError, ShapeError

__all__ = ["AcceptResult", "Ragged", "ragged", "check_parent", "check_probs", "check_tokens", "check_generators",
           "draw_uniforms", "sample_inverse_cdf", "PROB_SUM_TOL"]

# how far from 1 a probability row's sum may be (fp16/bf16 softmax outputs included)
PROB_SUM_TOL = 1e-2


@dataclass(frozen=True, eq=False)
class AcceptResult:
    """What each row of a verification step emits and keeps.

    Attributes
    ----------
    tokens : Tensor
        ``[B, D + 1]`` int64: row ``i`` emits ``tokens[i, :num_accepted[i] + 1]`` (the accepted
        draft tokens, then the target's token after them: the correction or the bonus token);
        the rest is ``-1``. ``D`` is the deepest draft of the batch (``max n_i`` for chains).
    num_accepted : Tensor
        ``[B]`` int64, the number of accepted draft tokens (``0 .. depth``).
    accepted_nodes : Tensor
        ``[B, D]`` int64: the row-local indices of the accepted draft nodes, root to leaf, then
        ``-1`` (the K/V entries the engine keeps; flat index ``cu_draft[i] + node``).

    Examples
    --------
    >>> r = AcceptResult(torch.tensor([[5, 7, -1]]), torch.tensor([1]), torch.tensor([[0, -1]]))
    >>> r.emitted(), r.paths(), r.num_emitted.tolist()
    ([[5, 7]], [[0]], [2])
    """

    tokens: Tensor
    num_accepted: Tensor
    accepted_nodes: Tensor

    @property
    def num_emitted(self) -> Tensor:
        """``[B]``: ``num_accepted + 1`` (every row emits at least the target's token)."""
        return self.num_accepted + 1

    def emitted(self) -> list[list[int]]:
        """The emitted tokens of each row, as lists."""
        n = self.num_accepted.tolist()
        return [row[:k + 1] for row, k in zip(self.tokens.tolist(), n)]

    def paths(self) -> list[list[int]]:
        """The accepted draft nodes (row-local indices) of each row, as lists."""
        n = self.num_accepted.tolist()
        return [row[:k] for row, k in zip(self.accepted_nodes.tolist(), n)]


@dataclass(frozen=True)
class Ragged:
    """A checked ragged layout: ``B`` rows, ``T`` draft tokens, host offsets ``cu`` and their tensor ``cu_t``."""

    B: int
    T: int
    K: int  # max n_i
    cu: tuple[int, ...]
    cu_t: Tensor  # [B + 1] int64 on ``device``
    device: torch.device

    def lens(self) -> list[int]:
        return [self.cu[i + 1] - self.cu[i] for i in range(self.B)]

    def rows(self) -> Tensor:
        """``[T]`` the row of every draft node."""
        # node t is in the row whose end is the first one past t (empty rows end where they start)
        return torch.searchsorted(self.cu_t[1:], torch.arange(self.T, device=self.device), right=True)


def _int_vec(op: str, name: str, t: object, n: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise ShapeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DTypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = f"[{n}]" if n is not None else "1-D"
        raise ShapeError(f"{op}: {name} has shape {tuple(t.shape)}; expected {want}")
    return t.long()


def ragged(op: str, draft_tokens: Tensor, cu_draft: Tensor | Sequence[int]) -> tuple[Tensor, Ragged]:
    """Check ``draft_tokens [T]`` and ``cu_draft [B + 1]``; return the int64 tokens and the layout."""
    tok = _int_vec(op, "draft_tokens", draft_tokens)
    if not isinstance(cu_draft, Tensor):
        try:
            cu_draft = torch.tensor(list(cu_draft), dtype=torch.long)
        except (TypeError, ValueError):
            raise ShapeError(f"{op}: cu_draft must be a tensor or a sequence of ints") from None
    cu_t = _int_vec(op, "cu_draft", cu_draft)
    cu = tuple(int(c) for c in cu_t.tolist())
    T = tok.shape[0]
    if not cu or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ShapeError(f"{op}: cu_draft must start at 0, never decrease and end at len(draft_tokens) = {T}; "
                         f"got {list(cu)[:8]}{'...' if len(cu) > 8 else ''}")
    B = len(cu) - 1
    K = max((cu[i + 1] - cu[i] for i in range(B)), default=0)
    return tok, Ragged(B, T, K, cu, cu_t.to(tok.device), tok.device)


def _same_device(op: str, name: str, t: Tensor, lay: Ragged) -> None:
    if t.device != lay.device:
        raise ShapeError(f"{op}: {name} is on {t.device} but draft_tokens on {lay.device}")


def check_tokens(op: str, name: str, t: Tensor, lay: Ragged, n: int, vocab: int | None, check: bool) -> Tensor:
    """An integer vector of ``n`` token ids on the layout's device (values in ``[0, vocab)`` if ``check``)."""
    t = _int_vec(op, name, t, n)
    _same_device(op, name, t, lay)
    if check and n:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ShapeError(f"{op}: {name} holds token ids in [{lo}, {hi}], outside the vocabulary "
                             f"[0, {vocab if vocab is not None else 'inf'})")
    return t


def check_probs(op: str, name: str, p: Tensor, lay: Ragged, rows: int, vocab: int | None, check: bool) -> Tensor:
    """A ``[rows, V]`` floating probability matrix on the layout's device (rows sum to 1 if ``check``)."""
    if not isinstance(p, Tensor):
        raise ShapeError(f"{op}: {name} must be a tensor, got {type(p).__name__}")
    if not p.dtype.is_floating_point:
        raise DTypeError(f"{op}: {name} must be floating-point probabilities, got {p.dtype}")
    if p.dim() != 2 or p.shape[0] != rows or (vocab is not None and p.shape[1] != vocab) or p.shape[1] == 0:
        want = f"[{rows}, {vocab if vocab is not None else 'V >= 1'}]"
        raise ShapeError(f"{op}: {name} has shape {tuple(p.shape)}; expected {want}")
    _same_device(op, name, p, lay)
    if check and rows:
        if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
            raise ShapeError(f"{op}: {name} has negative or non-finite entries (pass probabilities, not logits)")
        s = p.sum(-1, dtype=torch.float64)
        bad = (s - 1).abs() > PROB_SUM_TOL
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ShapeError(f"{op}: row {r} of {name} sums to {float(s[r]):.6g}, not 1 (pass softmax probabilities)")
    return p


def check_parent(op: str, parent: Tensor | None, lay: Ragged, check: bool) -> Tensor | None:
    """Row-local parents ``[T]`` (int64, ``-1 <= parent[j] < j``), or ``None`` for chains."""
    if parent is None:
        return None
    par = _int_vec(op, "parent", parent, lay.T)
    _same_device(op, "parent", par, lay)
    if check and lay.T:
        local = torch.arange(lay.T, device=lay.device) - lay.cu_t[:-1][lay.rows()]
        bad = (par < -1) | (par >= local)
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ShapeError(f"{op}: parent[{t}] = {int(par[t])} but draft node {t} is node {int(local[t])} of its row; "
                             f"a parent is -1 (the root) or an earlier node of the same row")
    return par


def check_generators(op: str, generators: object, lay: Ragged) -> list[torch.Generator] | None:
    if generators is None:
        return None
    if isinstance(generators, torch.Generator) or not isinstance(generators, (list, tuple)):
        raise OptionError(f"{op}: generators must be None or a list of one torch.Generator per row, "
                          f"got {type(generators).__name__}")
    if len(generators) != lay.B:
        raise OptionError(f"{op}: {len(generators)} generators for {lay.B} rows; pass one per row")
    for i, g in enumerate(generators):
        if not isinstance(g, torch.Generator):
            raise OptionError(f"{op}: generators[{i}] is a {type(g).__name__}, not a torch.Generator")
    return list(generators)


def draw_uniforms(op: str, generators: object, lay: Ragged) -> Tensor:
    """``[T + B]`` float64 uniforms on the layout's device: row ``i``'s ``n_i + 1`` at ``cu[i] + i``.

    Row ``i`` draws them in one ``torch.rand(n_i + 1, generator=generators[i], dtype=torch.float64)``
    call, rows in order (see the module docstring).

    Examples
    --------
    >>> _, lay = ragged("demo", torch.tensor([3, 4, 5]), [0, 2, 3])
    >>> u = draw_uniforms("demo", [torch.Generator().manual_seed(s) for s in (1, 2)], lay)
    >>> torch.equal(u[3:5], torch.rand(2, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    True
    """
    gens = check_generators(op, generators, lay)
    if gens is None:
        u = torch.rand(lay.T + lay.B, dtype=torch.float64)
    else:
        parts = [torch.rand(n + 1, generator=g, dtype=torch.float64, device=g.device) for n, g in zip(lay.lens(), gens)]
        u = torch.cat([x.to(lay.device) for x in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    return u.to(lay.device)


def sample_inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """One token per row of ``weights [B, V]`` (non-negative, unnormalised), by inverse CDF with ``u [B]`` in ``[0, 1)``.

    Token ``y`` is the first with ``cumsum(weights)[y] > u * sum(weights)``: drawn with
    probability ``weights[y] / sum(weights)``, never a zero-weight token (rows must have positive mass).

    Examples
    --------
    >>> w = torch.tensor([[0.0, 1.0, 0.0, 3.0]], dtype=torch.float64)
    >>> sample_inverse_cdf(w, torch.tensor([0.0])).tolist(), sample_inverse_cdf(w, torch.tensor([0.3])).tolist()
    ([1], [3])
    """
    c = weights.cumsum(-1)
    target = (u.to(c.dtype) * c[:, -1]).unsqueeze(1)
    return torch.searchsorted(c, target, right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)
