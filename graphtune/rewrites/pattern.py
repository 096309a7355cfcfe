"""Rewrite rules as data: a small pattern engine over op kinds (see :mod:`.kinds`).

A pattern is a tree of :class:`Pat` (a node of some kind whose inputs match sub-patterns),
:class:`Any` (alternation), :class:`Maybe` (zero or more unary wrappers such as casts, eval
dropout or ``contiguous``) and ``Pat.var(name)`` leaves (anything; captured). A rule pairs a
pattern with a module-level callback and an optional ``extra_check``; a
:class:`PatternMatcher` is a list of rules, composed with ``+``::

    pm_fold = PatternMatcher([
        Rule(Pat("mul", Pat("mul", Pat.var("x"), Pat.var("a")), Pat.var("b")), fold_mul, extra_check=both_const),
    ])
    n = pm_fold.apply(gm)          # number of replacements

Matching backtracks through alternatives, so captures are always consistent. Every node a
pattern matches below the root must have exactly one (real) user: the whole matched tree then
dies when the root is replaced, and a value someone else still reads is never folded away.
Callbacks get a :class:`Match` (to insert nodes with fresh metadata) plus the captures as
keyword arguments and return the replacement node, or None to decline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch.fx as fx

from graphtune.ir.meta import fake_mode_of, set_val, val_of
from graphtune.rewrites.kinds import is_metadata_assert, is_metadata_read, is_metadata_use, view

__all__ = ["Pat", "Any", "Maybe", "Rule", "Match", "PatternMatcher", "real_users", "dead_code_elimination"]

Captures = dict


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its data (metadata assertions and ``.dtype``/``.device`` excluded)."""
    return [u for u in node.users if not is_metadata_use(u)]


class Pat:
    """A node of one of ``kinds`` whose first ``len(srcs)`` inputs match ``srcs`` in order.

    Parameters
    ----------
    kinds : str or tuple of str, or None
        Accepted kinds (:data:`graphtune.rewrites.kinds.KINDS`); None only for ``Pat.var``.
    *srcs : Pat
        Sub-patterns for the node's inputs (:attr:`OpView.inputs`).
    name : str, optional
        Capture the matched node under this name.
    commutative : bool
        For two-input kinds: also try the inputs swapped.
    """

    def __init__(self, kinds: str | tuple[str, ...] | None, *srcs: "Pat", name: str | None = None,
                 commutative: bool = False) -> None:
        self.kinds = (kinds,) if isinstance(kinds, str) else kinds
        self.srcs = srcs
        self.name = name
        self.commutative = commutative

    @classmethod
    def var(cls, name: str) -> "Pat":
        """A leaf matching any value (node or constant), captured as ``name``."""
        return cls(None, name=name)

    def root_kinds(self) -> frozenset[str] | None:
        """Kinds a root node must have for this pattern to match (None: any)."""
        return frozenset(self.kinds) if self.kinds is not None else None

    def match(self, x: object, caps: Captures, root: bool = False) -> Iterator[Captures]:
        if self.kinds is None:  # var leaf
            if self.name in caps and caps[self.name] is not x:
                return
            yield {**caps, self.name: x} if self.name else caps
            return
        v = view(x)
        if v is None or v.kind not in self.kinds or len(v.inputs) < len(self.srcs):
            return
        if not root and len(real_users(x)) != 1:
            return
        if self.name:
            caps = {**caps, self.name: x}
        orders = [v.inputs]
        if self.commutative and len(v.inputs) == 2:
            orders.append(v.inputs[::-1])
        for inputs in orders:
            yield from _match_seq(self.srcs, inputs, caps)

    def __repr__(self) -> str:
        if self.kinds is None:
            return f"var({self.name})"
        return f"Pat({'|'.join(self.kinds)}, {', '.join(map(repr, self.srcs))})"


def _match_seq(pats: Sequence[Pat], xs: Sequence[object], caps: Captures) -> Iterator[Captures]:
    if not pats:
        yield caps
        return
    for c in pats[0].match(xs[0], caps):
        yield from _match_seq(pats[1:], xs[1:], c)


class Any(Pat):
    """Alternation: whatever any of ``alts`` matches, tried in order."""

    def __init__(self, *alts: Pat) -> None:
        super().__init__(None)
        self.alts = alts

    def root_kinds(self) -> frozenset[str] | None:
        ks = [a.root_kinds() for a in self.alts]
        return None if any(k is None for k in ks) else frozenset().union(*ks)

    def match(self, x: object, caps: Captures, root: bool = False) -> Iterator[Captures]:
        for a in self.alts:
            yield from a.match(x, caps, root)

    def __repr__(self) -> str:
        return f"Any({', '.join(map(repr, self.alts))})"


class Maybe(Pat):
    """Zero or more single-input wrappers of ``kinds`` (e.g. casts, dropout), then ``inner``.

    The wrapper nodes, outermost first, are captured as a list under ``name``; an
    ``extra_check`` decides whether they are harmless (e.g. dropout in eval mode).
    """

    def __init__(self, kinds: str | tuple[str, ...], inner: Pat, name: str | None = None) -> None:
        super().__init__(kinds, name=name)
        self.inner = inner

    def root_kinds(self) -> frozenset[str] | None:
        inner = self.inner.root_kinds()
        return None if inner is None else frozenset(self.kinds) | inner

    def match(self, x: object, caps: Captures, root: bool = False, _wrappers: tuple = ()) -> Iterator[Captures]:
        # greedy: as many wrappers as possible first, like a regex `*`
        v = view(x)
        if v is not None and v.kind in self.kinds and v.inputs and (root or len(real_users(x)) == 1):
            yield from self.match(v.inputs[0], caps, False, (*_wrappers, x))
        yield from self.inner.match(x, {**caps, self.name: list(_wrappers)} if self.name else caps, root)

    def __repr__(self) -> str:
        return f"Maybe({'|'.join(self.kinds)}, {self.inner!r})"


@dataclass
class Match:
    """A successful match handed to callbacks: the graph, the root node and the pass context."""

    gm: fx.GraphModule
    root: fx.Node
    ctx: object = None
    mode: object = None
    inserted: list[fx.Node] = field(default_factory=list)

    def call(self, target: Callable, *args: object, **kwargs: object) -> fx.Node:
        """Insert ``target(*args, **kwargs)`` before the root, with metadata and provenance."""
        with self.gm.graph.inserting_before(self.root):
            node = self.gm.graph.call_function(target, args, kwargs)
        # provenance only: source_fn_stack would claim the new node is the replaced torch function
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.root.meta:
                node.meta[key] = self.root.meta[key]
        set_val(node, self.mode)
        self.inserted.append(node)
        return node


@dataclass
class Rule:
    """``pattern`` → ``fn(match, **captures) -> Node | None``, if ``extra_check(match, **captures)``."""

    pattern: Pat
    fn: Callable[..., fx.Node | None]
    extra_check: Callable[..., bool] | None = None


class PatternMatcher:
    """An ordered list of rules; ``pm_a + pm_b`` tries ``pm_a``'s rules first.

    Examples
    --------
    >>> import torch, torch.fx as fx, operator
    >>> from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    >>> def drop_mul(m, x, one):  # x * 1  ->  x
    ...     return x
    >>> def is_one(m, x, one):
    ...     return one == 1
    >>> pm = PatternMatcher([Rule(Pat("mul", Pat.var("x"), Pat.var("one"), commutative=True), drop_mul,
    ...                           extra_check=is_one)])
    >>> gm = fx.symbolic_trace(lambda a: torch.relu(a * 1))
    >>> FakeTensorProp(gm).propagate(torch.randn(3))  # doctest: +ELLIPSIS
    FakeTensor(...)
    >>> pm.apply(gm)
    1
    """

    def __init__(self, rules: Sequence[Rule | tuple]) -> None:
        self.rules = [r if isinstance(r, Rule) else Rule(*r) for r in rules]
        self._by_kind: dict[str, list[Rule]] = {}
        for r in self.rules:
            kinds = r.pattern.root_kinds()
            if kinds is None:
                raise ValueError(f"pattern {r.pattern!r} can match any node at its root; give it a kind")
            for k in kinds:
                self._by_kind.setdefault(k, []).append(r)

    def __add__(self, other: "PatternMatcher") -> "PatternMatcher":
        return PatternMatcher(self.rules + other.rules)

    def apply(self, gm: fx.GraphModule, ctx: object = None) -> int:
        """Rewrite every match in ``gm`` (one graph walk, in order); returns the number of replacements."""
        mode = fake_mode_of(gm)
        replaced: list[fx.Node] = []
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False) or not node.users:
                continue  # erased, or dead after an earlier replacement
            v = view(node)
            if v is None:
                continue
            for rule in self._by_kind.get(v.kind, ()):
                new = _try_rule(gm, rule, node, ctx, mode)
                if new is not None:
                    node.replace_all_uses_with(new)
                    replaced.append(node)
                    break
        if replaced:
            dead_code_elimination(gm, replaced)
            gm.recompile()
        return len(replaced)


def _try_rule(gm: fx.GraphModule, rule: Rule, node: fx.Node, ctx: object, mode: object) -> fx.Node | None:
    for caps in rule.pattern.match(node, {}, root=True):
        m = Match(gm, node, ctx, mode)
        if rule.extra_check is not None and not rule.extra_check(m, **caps):
            continue
        new = rule.fn(m, **caps)
        if new is not None:
            return new
        for n in reversed(m.inserted):  # declined: drop what it inserted
            if not n.users:
                gm.graph.erase_node(n)
    return None


def _seeded_random(n: fx.Node) -> bool:
    # A dead random op (dropout, SDPA's dropout_p) only advances the RNG; in a matched region it
    # is eval-mode dropout anyway, so it goes with the rest.
    return n.op == "call_function" and getattr(n.target, "_nondeterministic_seeded", False)


def dead_code_elimination(gm: fx.GraphModule, roots: Sequence[fx.Node] | None = None) -> int:
    """Erase nodes made dead by replacing ``roots`` (default: every dead node); returns how many.

    Export's metadata assertions on a dead value die with it, ``x.dtype``/``x.device`` reads
    become constants; other impure nodes (and unrelated
    nodes such as export's ``_guards_fn``) are never touched when ``roots`` is given.
    """
    work = list(roots) if roots is not None else list(gm.graph.nodes)
    erased = 0
    while work:
        n = work.pop()
        if getattr(n, "_erased", False) or n.op in ("placeholder", "output") or real_users(n):
            continue
        if n.is_impure() and not (is_metadata_assert(n) or _seeded_random(n)):
            continue
        for u in list(n.users):  # only metadata uses are left
            if is_metadata_read(u):  # x.dtype -> the constant it always is
                const = getattr(val_of(n), u.args[1])
                for uu in list(u.users):
                    uu.args = fx.node.map_arg(uu.args, lambda a: const if a is u else a)
                    uu.kwargs = fx.node.map_arg(uu.kwargs, lambda a: const if a is u else a)
            gm.graph.erase_node(u)
        work.extend(n.all_input_nodes)
        gm.graph.erase_node(n)
        erased += 1
    return erased
