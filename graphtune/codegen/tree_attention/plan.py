"""Host plan of one tree-attention step: the ancestor mask and the CPU batching groups — pure host code.

A verification forward packs, for each of ``B`` rows, ``n_i`` query tokens: the row's last accepted
token (the tree root) followed by its draft tokens in tree order (a token's parent comes before
it; several roots make a forest). Their keys sit in the KV pool right after the row's
``ctx_len_i`` context keys, at slots ``kv_start_i + ctx_len_i + j``. Query ``j`` of row ``i``
sees every context key of the row and draft key ``m`` iff ``m`` is ``j`` or an ancestor of ``j``.

Everything that depends only on the tree, not on the layer, is computed here once per step by
:func:`plan_tree` and kept in a frozen :class:`TreePlan` that every layer's call reuses:

* ``mask``: the row-local visibility :func:`ancestor_mask` ``[T, max_n]`` (bool, CPU);
* ``groups``: rows the CPU path can batch into one flash call (equal ``ctx_len`` and ``n``,
  evenly spaced ``kv_start``, so their keys are one strided view of the pool);
* a memo (:meth:`TreePlan.memo`) where the implementations keep what they derive from the plan:
  the CPU path's additive masks, the Triton path's device tables. So a layer's call does no host
  work beyond a dictionary lookup.

The op entry points take ``plan=`` as an optional keyword. Without it they look the plan up with
:func:`plan_for`, a small cache keyed by the identity (and version counter) of the four index
tensors, so a caller that passes the same index tensors to every layer plans once either way.

Examples
--------
>>> import torch
>>> cu_q = torch.tensor([0, 3, 4]); parent = torch.tensor([-1, 0, 0, -1])  # a root with 2 children; a lone root
>>> plan = plan_tree(torch.tensor([0, 100]), torch.tensor([10, 0]), cu_q, parent)
>>> plan.mask.int().tolist()
[[1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 0, 0]]
>>> plan.max_n, plan.total, plan.kv_end
(3, 4, 101)
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from graphtune.errors import PlanError

__all__ = ["RowGroup", "TreePlan", "ancestor_mask", "plan_tree", "plan_for", "as_ints"]

_CACHE_SIZE = 8


def as_ints(x: Tensor | Sequence[int], what: str) -> tuple[int, ...]:
    """A 1-D integer tensor (any device: one sync) or a sequence of ints as a tuple of Python ints."""
    if isinstance(x, Tensor):
        if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise PlanError(f"tree attention: {what} must be a 1-D integer tensor, got {x.dtype} {tuple(x.shape)}")
        return tuple(int(v) for v in x.tolist())
    return tuple(int(v) for v in x)


def _check_tree(cu_q: tuple[int, ...], parent: tuple[int, ...]) -> None:
    if len(cu_q) < 2 or cu_q[0] != 0:
        raise PlanError(f"tree attention: cu_q must start at 0 and list B + 1 >= 2 offsets, got {cu_q[:8]}")
    for i in range(len(cu_q) - 1):
        if cu_q[i + 1] - cu_q[i] < 1:
            raise PlanError(f"tree attention: row {i} has {cu_q[i + 1] - cu_q[i]} query tokens (cu_q must "
                            f"increase: every row has at least its root)")
    if len(parent) != cu_q[-1]:
        raise PlanError(f"tree attention: parent has {len(parent)} entries, cu_q says T = {cu_q[-1]}")
    for i in range(len(cu_q) - 1):
        for j in range(cu_q[i + 1] - cu_q[i]):
            p = parent[cu_q[i] + j]
            if not -1 <= p < j:
                raise PlanError(f"tree attention: row {i} token {j} has parent {p}; a parent is a row-local "
                                f"index before the token (-1 <= parent < {j})")


def ancestor_mask(cu_q: Tensor | Sequence[int], parent: Tensor | Sequence[int]) -> Tensor:
    """Row-local visibility among draft tokens: ``mask[t, m]`` iff row-local token ``m`` is ``t`` or an ancestor of ``t``.

    Parameters
    ----------
    cu_q : Tensor or sequence of int
        ``[B + 1]`` offsets of each row's tokens in the packed order (``cu_q[0] = 0``, increasing).
    parent : Tensor or sequence of int
        ``[T]`` row-local parent of each token, ``-1`` for a root; ``parent[j] < j``.

    Returns
    -------
    Tensor
        bool ``[T, max_n]`` on the CPU (``max_n`` the largest row); columns ``>= n_i`` of row ``i``'s
        tokens are False. :class:`~graphtune.errors.PlanError` for a malformed tree.

    Examples
    --------
    >>> ancestor_mask([0, 4], [-1, 0, 1, 2]).int().tolist()  # a chain: lower triangular
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    cu, par = as_ints(cu_q, "cu_q"), as_ints(parent, "parent")
    _check_tree(cu, par)
    return _mask(cu, par)


def _mask(cu: tuple[int, ...], par: tuple[int, ...]) -> Tensor:
    # one pass in tree order: a token sees what its parent sees, and itself (parent[j] < j); each
    # token's visibility is a Python int bit set, unpacked to bool 32 columns at a time
    T = cu[-1]
    max_n = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    vis: list[int] = []
    for i in range(len(cu) - 1):
        base = cu[i]
        for j in range(cu[i + 1] - base):
            p = par[base + j]
            vis.append((vis[base + p] if p >= 0 else 0) | (1 << j))
    cols = []
    shifts = torch.arange(32)
    for w in range(-(-max_n // 32)):
        word = torch.tensor([(x >> (32 * w)) & 0xFFFFFFFF for x in vis], dtype=torch.int64)  # [T]
        cols.append(((word[:, None] >> shifts) & 1).bool())
    return torch.cat(cols, 1)[:, :max_n].reshape(T, max_n)


@dataclass(frozen=True)
class RowGroup:
    """Rows whose keys are one strided view of the pool: equal ``ctx`` and ``n``, ``kv_start = kv0 + r * step``.

    ``tokens``: the rows' global query tokens, row after row (``len = len(rows) * n``); ``t0 >= 0``
    when they are the contiguous range ``[t0, t0 + len)`` (then no gather), else -1.
    ``shared_tree``: every row has the same parent pattern (one draft mask serves all of them).
    """

    rows: tuple[int, ...]
    ctx: int
    n: int
    kv0: int
    step: int
    tokens: tuple[int, ...]
    t0: int
    shared_tree: bool


@dataclass(frozen=True, eq=False)
class TreePlan:
    """What every layer of one verification step shares; build with :func:`plan_tree`.

    Attributes
    ----------
    kv_start, ctx_len, cu_q, parent : tuple of int
        The step's index arguments as Python ints.
    mask : Tensor
        :func:`ancestor_mask`, bool ``[T, max_n]`` on the CPU.
    groups : tuple of RowGroup
        The rows partitioned into batchable groups (the CPU path's ``BATCH >= 1`` modes); a row
        that batches with no other is a group of one.
    batch, total, max_n, kv_end : int
        ``B``, ``T``, the largest row's token count, one past the last pool slot read.
    """

    kv_start: tuple[int, ...]
    ctx_len: tuple[int, ...]
    cu_q: tuple[int, ...]
    parent: tuple[int, ...]
    mask: Tensor
    groups: tuple[RowGroup, ...]
    kv_end: int
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: Any = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    @property
    def batch(self) -> int:
        return len(self.kv_start)

    @property
    def total(self) -> int:
        return self.cu_q[-1]

    @property
    def max_n(self) -> int:
        return int(self.mask.shape[1])

    def n(self, row: int) -> int:
        """Query tokens of ``row``."""
        return self.cu_q[row + 1] - self.cu_q[row]

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per plan and key (implementations keep their derived tensors here)."""
        hit = self._memo.get(key)
        if hit is None:
            with self._lock:
                hit = self._memo.get(key)
                if hit is None:
                    hit = self._memo[key] = build()
        return hit


def _groups(kv_start: tuple[int, ...], ctx_len: tuple[int, ...], cu: tuple[int, ...],
            par: tuple[int, ...]) -> tuple[RowGroup, ...]:
    # rows with equal (ctx, n), in row order, cut into maximal runs of evenly spaced kv_start
    buckets: dict[tuple[int, int], list[int]] = {}
    for i in range(len(kv_start)):
        buckets.setdefault((ctx_len[i], cu[i + 1] - cu[i]), []).append(i)
    groups = []
    for (ctx, n), rows in buckets.items():
        run: list[int] = []
        for i in rows:
            if run and not _extends(run, i, kv_start):
                groups.append(_group(run, ctx, n, kv_start, cu, par))
                run = []
            run.append(i)
        groups.append(_group(run, ctx, n, kv_start, cu, par))
    groups.sort(key=lambda g: g.rows[0])
    return tuple(groups)


def _extends(run: list[int], i: int, kv_start: tuple[int, ...]) -> bool:
    d = kv_start[i] - kv_start[run[-1]]
    return d > 0 and (len(run) == 1 or d == kv_start[run[1]] - kv_start[run[0]])


def _group(rows: list[int], ctx: int, n: int, kv_start: tuple[int, ...], cu: tuple[int, ...],
           par: tuple[int, ...]) -> RowGroup:
    tokens = tuple(t for i in rows for t in range(cu[i], cu[i] + n))
    t0 = tokens[0] if tokens == tuple(range(tokens[0], tokens[0] + len(tokens))) else -1
    shapes = {par[cu[i]:cu[i] + n] for i in rows}
    step = kv_start[rows[1]] - kv_start[rows[0]] if len(rows) > 1 else 0
    return RowGroup(tuple(rows), ctx, n, kv_start[rows[0]], step, tokens, t0, len(shapes) == 1)


def plan_tree(kv_start: Tensor | Sequence[int], ctx_len: Tensor | Sequence[int], cu_q: Tensor | Sequence[int],
              parent: Tensor | Sequence[int]) -> TreePlan:
    """Plan one verification step (once; every layer's call reuses the plan).

    Parameters
    ----------
    kv_start, ctx_len : Tensor or sequence of int
        ``[B]``: first pool slot of each row's keys and its number of context keys (``>= 0``).
    cu_q : Tensor or sequence of int
        ``[B + 1]`` query offsets; row ``i`` has ``n_i = cu_q[i+1] - cu_q[i] >= 1`` tokens.
    parent : Tensor or sequence of int
        ``[T]`` row-local parents (``-1`` for a root, ``parent[j] < j``).

    Returns
    -------
    TreePlan
        Tensors are read once to the host (one sync each for device tensors).

    Examples
    --------
    >>> plan = plan_tree([0, 64, 128], [20, 20, 20], [0, 4, 8, 12], [-1, 0, 1, 2] * 3)  # 3 chain rows
    >>> [(g.rows, g.step, g.shared_tree) for g in plan.groups]
    [((0, 1, 2), 64, True)]
    """
    starts, ctxs = as_ints(kv_start, "kv_start"), as_ints(ctx_len, "ctx_len")
    cu, par = as_ints(cu_q, "cu_q"), as_ints(parent, "parent")
    _check_tree(cu, par)
    if len(starts) != len(cu) - 1 or len(ctxs) != len(starts):
        raise PlanError(f"tree attention: kv_start ({len(starts)}), ctx_len ({len(ctxs)}) and cu_q ({len(cu)} = B + 1) "
                        f"disagree on the batch")
    if any(s < 0 for s in starts) or any(c < 0 for c in ctxs):
        raise PlanError("tree attention: kv_start and ctx_len must be >= 0")
    kv_end = max(s + c + cu[i + 1] - cu[i] for i, (s, c) in enumerate(zip(starts, ctxs)))
    return TreePlan(starts, ctxs, cu, par, _mask(cu, par), _groups(starts, ctxs, cu, par), kv_end)


_plans: OrderedDict = OrderedDict()
_plans_lock = threading.Lock()


def _ident(x: Any) -> Any:
    if isinstance(x, Tensor):
        return ("t", id(x), x._version, x.data_ptr(), tuple(x.shape))
    return ("s", tuple(int(v) for v in x))


def plan_for(kv_start: Tensor | Sequence[int], ctx_len: Tensor | Sequence[int], cu_q: Tensor | Sequence[int],
             parent: Tensor | Sequence[int]) -> TreePlan:
    """:func:`plan_tree`, cached by the identity of the index tensors (unmodified: same version counter).

    The cache holds the last few plans and references to their tensors (so an id is never reused
    while its entry lives). Sequences of ints are keyed by value.

    >>> cu, par = torch.tensor([0, 2]), torch.tensor([-1, 0])
    >>> p = plan_for(torch.tensor([0]), torch.tensor([5]), cu, par)
    >>> s, c = torch.tensor([0]), torch.tensor([5])
    >>> plan_for(s, c, cu, par) is plan_for(s, c, cu, par)
    True
    """
    args = (kv_start, ctx_len, cu_q, parent)
    key = tuple(_ident(a) for a in args)
    hit = _plans.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], args) if isinstance(a, Tensor)):
        return hit[1]
    plan = plan_tree(*args)
    with _plans_lock:
        _plans[key] = (args, plan)
        while len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    return plan
