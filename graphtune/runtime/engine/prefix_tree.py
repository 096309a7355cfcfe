"""The prompt prefix tree of an offline batch (BatchLLM-style): shared prefixes stored and prefilled once.

Rows whose prompts start with the same tokens share a tree node: its KV is computed once and
stored once, and at decode every sharing row's query attends to it in one batched product (the
shared-prefix decomposition). Sharing is multi-level: a system prompt shared by all rows, then a
few-shot block shared by some of them, then each row's own question.

A node shorter than ``min_shared`` tokens is not worth a partial attention and an LSE merge per
layer: its tokens are pushed down into its children (stored once per child). Every row ends in a
private *leaf* (its unshared prompt tail plus every token it generates).

Host-only code: token ids in, a tree of token spans out.

Examples
--------
>>> tree = build_prefix_tree([[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 7]], min_shared=1)
>>> [(n.tokens, n.rows) for n in tree.shared]
[([1, 2, 3], [0, 1, 2]), ([4], [0, 2])]
>>> [leaf.tokens for leaf in tree.leaves]
[[5], [9], [7]]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from graphtune.errors import PlanError

__all__ = ["Node", "PrefixTree", "build_prefix_tree"]


@dataclass(eq=False)
class Node:
    """A span of tokens whose KV is stored once, for every row in ``rows``.

    ``start`` is the position of the first token (the length of the path above it); a row's KV
    is the concatenation of its chain of nodes, root first, then its leaf.
    """

    tokens: list[int]
    start: int
    rows: list[int]
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    leaf: bool = False
    # runtime state (the engine's): where the KV lives and how much of it is computed
    slot: int = -1  # first slot in the KV pool, -1: not resident
    capacity: int = 0  # slots reserved
    filled: int = 0  # tokens whose K/V are written
    id: int = -1

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def chain(self) -> list["Node"]:
        """This node and its ancestors, root first."""
        out: list[Node] = []
        n: Node | None = self
        while n is not None:
            out.append(n)
            n = n.parent
        return out[::-1]


@dataclass
class PrefixTree:
    """Shared nodes (pre-order: parents before children) and one private leaf per row."""

    shared: list[Node]
    leaves: list[Node]

    def shared_tokens(self) -> int:
        return sum(len(n.tokens) for n in self.shared)

    def prompt_tokens(self) -> int:
        """Prompt tokens stored (shared once, tails once per row)."""
        return self.shared_tokens() + sum(len(leaf.tokens) for leaf in self.leaves)

    def describe(self, max_lines: int = 12) -> str:
        """An indented view of the tree (for explain)."""
        lines: list[str] = []

        def walk(n: Node, depth: int) -> None:
            if len(lines) < max_lines:
                lines.append(f"{'  ' * depth}[{n.start}, {n.end}) {len(n.tokens)} tokens, rows {_rows_text(n.rows)}")
            for c in n.children:
                if not c.leaf:
                    walk(c, depth + 1)

        for n in self.shared:
            if n.parent is None:
                walk(n, 0)
        if len(lines) >= max_lines:
            lines.append("...")
        tails = [len(leaf.tokens) for leaf in self.leaves]
        lines.append(f"private tails: {len(tails)} rows, {sum(tails)} tokens (max {max(tails, default=0)})")
        return "\n".join(lines)


def _rows_text(rows: Sequence[int]) -> str:
    if len(rows) > 6:
        return f"{rows[0]}..{rows[-1]} ({len(rows)})"
    return ",".join(map(str, rows))


class _Trie:
    __slots__ = ("children", "rows", "tokens")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.children: dict[int, _Trie] = {}
        self.rows: list[int] = []


def build_prefix_tree(prompts: Sequence[Sequence[int]], min_shared: int = 16) -> PrefixTree:
    """The prefix tree of ``prompts`` (token id lists, one per row).

    Parameters
    ----------
    prompts : sequence of sequences of int
        One token list per row; each must be non-empty.
    min_shared : int
        Shortest span worth sharing. Shorter shared spans are folded into the nodes below them.

    Returns
    -------
    PrefixTree
        ``shared`` nodes (each with >= 2 rows and >= ``min_shared`` tokens) in pre-order and one
        leaf per row in row order (possibly empty: a prompt that is entirely shared).
    """
    if min_shared < 1:
        raise PlanError(f"prefix tree: min_shared must be >= 1, got {min_shared}")
    root = _Trie([])
    for r, p in enumerate(prompts):
        toks = [int(t) for t in p]
        if not toks:
            raise PlanError(f"prefix tree: prompt {r} is empty")
        _insert(root, toks, r)
    shared: list[Node] = []
    leaves: list[Node | None] = [None] * len(prompts)

    def emit(t: _Trie, parent: Node | None, carry: list[int], start: int) -> None:
        toks = carry + t.tokens
        rows = sorted(_rows_below(t))
        keep = len(rows) >= 2 and len(toks) >= min_shared and t is not root
        if keep:
            node = Node(toks, start, rows, parent)
            if parent is not None:
                parent.children.append(node)
            shared.append(node)
            parent, carry, start = node, [], start + len(toks)
        else:
            carry = toks
        for r in t.rows:  # rows whose prompt ends here: their leaf starts with what is not shared
            leaf = Node(list(carry), start, [r], parent, leaf=True)
            if parent is not None:
                parent.children.append(leaf)
            leaves[r] = leaf
        for c in t.children.values():
            emit(c, parent, carry, start)

    emit(root, None, [], 0)
    assert all(leaf is not None for leaf in leaves)
    return PrefixTree(shared, leaves)  # type: ignore[arg-type]


def _insert(root: _Trie, toks: list[int], row: int) -> None:
    # radix-trie insert: edges hold token spans, split where prompts diverge
    node, i = root, 0
    while True:
        if i == len(toks):
            node.rows.append(row)
            return
        child = node.children.get(toks[i])
        if child is None:
            leaf = _Trie(toks[i:])
            leaf.rows.append(row)
            node.children[toks[i]] = leaf
            return
        n = 0
        span = child.tokens
        while n < len(span) and i + n < len(toks) and span[n] == toks[i + n]:
            n += 1
        if n < len(span):  # split the edge at n
            head = _Trie(span[:n])
            child.tokens = span[n:]
            head.children[child.tokens[0]] = child
            node.children[toks[i]] = head
            child = head
        node, i = child, i + n


def _rows_below(t: _Trie) -> list[int]:
    out, stack = [], [t]
    while stack:
        x = stack.pop()
        out.extend(x.rows)
        stack.extend(x.children.values())
    return out
