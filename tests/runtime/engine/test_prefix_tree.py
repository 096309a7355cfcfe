"""Property tests of the engine's prompt prefix tree (graphtune.runtime.engine.prefix_tree)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphtune.errors import PlanError
from graphtune.runtime.engine.prefix_tree import build_prefix_tree

# a tiny alphabet and short prompts: many shared prefixes, prefixes of other prompts, identical prompts
_prompt = st.lists(st.integers(0, 3), min_size=1, max_size=14)
_prompts = st.lists(_prompt, min_size=1, max_size=9)
_SETTINGS = settings(max_examples=300, derandomize=True, deadline=None, database=None)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_tree(prompts: list[list[int]], min_shared: int) -> None:
    tree = build_prefix_tree(prompts, min_shared=min_shared)
    assert len(tree.leaves) == len(prompts)
    shared_ids = {id(n) for n in tree.shared}
    for r, (prompt, leaf) in enumerate(zip(prompts, tree.leaves)):
        assert leaf.leaf and leaf.rows == [r]
        chain = leaf.chain()
        assert chain[-1] is leaf
        # the chain's tokens, root first, are exactly the prompt
        assert [t for n in chain for t in n.tokens] == prompt
        # every node starts where its parent ends; the root starts at 0
        assert chain[0].parent is None and chain[0].start == 0
        for parent, child in zip(chain, chain[1:]):
            assert child.parent is parent and child.start == parent.end
            assert child in parent.children
        # every node above the leaf is a shared node of the tree, and lists this row
        for n in chain[:-1]:
            assert id(n) in shared_ids and r in n.rows
    for n in tree.shared:
        assert not n.leaf
        assert len(n.rows) >= 2 and len(n.tokens) >= min_shared
        assert n.rows == sorted(set(n.rows))
        # a node's rows are exactly the rows whose chain goes through it
        assert n.rows == [r for r, leaf in enumerate(tree.leaves) if any(a is n for a in leaf.chain()[:-1])]
        if n.parent is not None:
            assert set(n.rows) <= set(n.parent.rows)
            assert id(n.parent) in shared_ids
        for c in n.children:
            assert c.parent is n and set(c.rows) <= set(n.rows)
    # pre-order: every parent precedes its children and each subtree is one contiguous run
    pos = {id(n): i for i, n in enumerate(tree.shared)}
    assert len(pos) == len(tree.shared)
    for i, n in enumerate(tree.shared):
        sub = [m for m in tree.shared if any(a is n for a in m.chain())]
        idx = sorted(pos[id(m)] for m in sub)
        assert idx == list(range(i, i + len(sub))), "tree.shared is not in pre-order"
    # sharing is as deep as min_shared allows: two rows with a common prefix of L tokens share nodes
    # ending at e with L - e < min_shared (a shorter unshared common run is not worth its own node)
    for a in range(len(prompts)):
        for b in range(a + 1, len(prompts)):
            L = _common_prefix(prompts[a], prompts[b])
            ca = tree.leaves[a].chain()[:-1]
            cb = tree.leaves[b].chain()[:-1]
            common = [n for n in ca if any(n is m for m in cb)]
            e = common[-1].end if common else 0
            assert e <= L and L - e < min_shared, (prompts[a], prompts[b], L, e)
    assert tree.prompt_tokens() == tree.shared_tokens() + sum(len(leaf.tokens) for leaf in tree.leaves)
    assert tree.prompt_tokens() <= sum(map(len, prompts))
    tree.describe()  # renders without error


@_SETTINGS
@given(_prompts, st.integers(1, 6))
def test_prefix_tree_chains_rebuild_prompts_and_sharing_invariants_hold(prompts, min_shared):
    _check_tree(prompts, min_shared)


@_SETTINGS
@given(_prompt, st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=6), min_size=2, max_size=6),
       st.integers(1, 4))
def test_prefix_tree_invariants_with_a_long_common_prefix(prefix, tails, min_shared):
    # every row starts with the same prefix (a system prompt); tails may be empty (identical prompts)
    _check_tree([prefix + t for t in tails], min_shared)


def test_prefix_tree_multi_level_example():
    sys_p, shot = list(range(100, 120)), list(range(200, 210))
    prompts = [sys_p + shot + [1, 2], sys_p + shot + [3], sys_p + [4, 5, 6], sys_p + shot + [1, 2], [9, 9]]
    tree = build_prefix_tree(prompts, min_shared=4)
    # [1, 2] is shorter than min_shared: folded into the leaves of rows 0 and 3 (identical prompts)
    assert [(n.tokens, n.rows) for n in tree.shared] == [(sys_p, [0, 1, 2, 3]), (shot, [0, 1, 3])]
    assert [leaf.tokens for leaf in tree.leaves] == [[1, 2], [3], [4, 5, 6], [1, 2], [9, 9]]
    assert tree.leaves[4].parent is None and tree.leaves[4].start == 0
    _check_tree(prompts, 4)
    # with min_shared=2 the identical rows 0 and 3 share all of their prompt: empty leaves
    tree = build_prefix_tree(prompts, min_shared=2)
    assert tree.leaves[0].tokens == [] and tree.leaves[3].tokens == []
    assert tree.leaves[0].parent is tree.leaves[3].parent and tree.leaves[0].parent.tokens == [1, 2]


def test_prefix_tree_docstring_example():
    tree = build_prefix_tree([[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 7]], min_shared=1)
    assert [(n.tokens, n.rows) for n in tree.shared] == [([1, 2, 3], [0, 1, 2]), ([4], [0, 2])]
    assert [leaf.tokens for leaf in tree.leaves] == [[5], [9], [7]]


@pytest.mark.parametrize("prompts,min_shared", [
    ([[1, 2], []], 1),
    ([[]], 4),
    ([[1, 2, 3]], 0),
    ([[1, 2, 3], [1, 2, 4]], -3),
])
def test_prefix_tree_rejects_empty_prompts_and_min_shared_below_one(prompts, min_shared):
    with pytest.raises(PlanError):
        build_prefix_tree(prompts, min_shared=min_shared)
