"""greedy_accept: exact tables for chains and trees (ragged rows, all-accepted bonus, first-token rejection,
forests, duplicate siblings), and the vectorized op against its loop reference on random batches."""
import pytest
import torch

from graphtune.codegen.spec_accept.accept import greedy_accept
from graphtune.codegen.spec_accept.reference import greedy_accept_ref

from spec_accept_cases import random_batch

T_ = torch.tensor


def _both(*args):
    fast, ref = greedy_accept(*args), greedy_accept_ref(*args)
    assert torch.equal(fast.tokens, ref.tokens) and torch.equal(fast.accepted_nodes, ref.accepted_nodes)
    assert torch.equal(fast.num_accepted, ref.num_accepted)
    return fast


def test_chain_table_ragged_rows():
    drafts = T_([5, 6, 7, 3, 4, 8, 9, 1, 2])
    cu = T_([0, 3, 5, 5, 9])
    argmax = T_([5, 6, 7, 9,  # row 0: all three accepted, bonus 9
                 1, 4, 8,  # row 1: the first draft is rejected (a later match does not count)
                 2,  # row 2: no drafts, the target's token
                 8, 9, 0, 2, 5])  # row 3: two accepted, then the correction 0
    r = _both(drafts, cu, argmax)
    assert r.tokens.tolist() == [[5, 6, 7, 9, -1], [1, -1, -1, -1, -1], [2, -1, -1, -1, -1], [8, 9, 0, -1, -1]]
    assert r.num_accepted.tolist() == [3, 0, 0, 2]
    assert r.accepted_nodes.tolist() == [[0, 1, 2, -1], [-1] * 4, [-1] * 4, [0, 1, -1, -1]]
    assert r.emitted() == [[5, 6, 7, 9], [1], [2], [8, 9, 0]] and r.num_emitted.tolist() == [4, 1, 1, 3]
    # a chain spelled out as parents is the same
    par = T_([-1, 0, 1, -1, 0, -1, 0, 1, 2])
    assert torch.equal(_both(drafts, cu, argmax, par).tokens, r.tokens)


def test_tree_table_forests_duplicates_and_ancestors():
    drafts = T_([10, 11, 12, 13, 14,  # A: 0 and 1 under the root, 2 under 0, 3 under 1, 4 under 3
                 5, 5, 6,  # B: duplicate root children 5, 5; node 2 under the second
                 5, 5,  # C: duplicate root children, equally deep: the smaller index wins
                 3, 4])  # D: root child rejected; its child matches its own position but is not reachable
    parent = T_([-1, -1, 0, 1, 3, -1, -1, 1, -1, -1, -1, 0])
    cu = T_([0, 5, 8, 10, 12, 12])  # E: no drafts
    argmax = T_([11, 12, 13, 7, 14, 99,  # A: 11 (node 1) -> 13 (node 3) -> 14 (node 4) -> bonus 99
                 5, 0, 6, 42,  # B: 5 matches nodes 0 and 1; node 2 (under 1) matches 6: path 1, 2; bonus 42
                 5, 1, 2,  # C
                 9, 4, 0,  # D
                 7])  # E
    r = _both(drafts, cu, argmax, parent)
    assert r.emitted() == [[11, 13, 14, 99], [5, 6, 42], [5, 1], [9], [7]]
    assert r.paths() == [[1, 3, 4], [1, 2], [0], [], []]
    assert r.tokens.shape == (5, 4) and r.accepted_nodes.shape == (5, 3)  # width: the deepest tree (3)
    assert r.tokens[1].tolist() == [5, 6, 42, -1]


def test_empty_batch_and_no_drafts():
    r = _both(T_([], dtype=torch.long), T_([0]), T_([], dtype=torch.long))
    assert r.tokens.shape == (0, 1) and r.accepted_nodes.shape == (0, 0)
    r = _both(T_([], dtype=torch.long), T_([0, 0, 0]), T_([4, 2]), T_([], dtype=torch.long))
    assert r.emitted() == [[4], [2]] and r.tokens.shape == (2, 1)


@pytest.mark.parametrize("tree", [False, True])
def test_greedy_matches_its_reference_on_random_batches(tree):
    for seed in range(40):
        tok, cu, par, _, tp = random_batch(seed, B=5, V=4, max_n=7, tree=tree, sampled=False, argmax_bias=0.8)
        am = tp.argmax(-1)
        r = _both(tok, cu, am, par if tree else None)
        # every accepted path is a root-to-node path of the row's tree
        for i, path in enumerate(r.paths()):
            prev = -1
            for j in path:
                assert int(par[int(cu[i]) + j]) == prev
                prev = j
