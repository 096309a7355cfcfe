"""rejection_accept_chain / rejection_accept_tree: the fast ops equal their loop references draw for draw, the
generators are consumed as documented (seeded determinism, rows independent of their batch), tokens of target
probability 0 are never emitted, and bad inputs raise graphtune's errors naming what is wrong."""
import pytest
import torch

from graphtune.codegen.spec_accept.accept import greedy_accept, rejection_accept_chain, rejection_accept_tree
from graphtune.codegen.spec_accept.reference import rejection_accept_chain_ref, rejection_accept_tree_ref
from graphtune.errors import DTypeError, OptionError, ShapeError

from spec_accept_cases import gens, random_batch

T_ = torch.tensor


def _same(a, b):
    assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
    assert torch.equal(a.accepted_nodes, b.accepted_nodes) and torch.equal(a.num_accepted, b.num_accepted)


def _check_support(r, tok, cu, par, tp):
    """Emitted tokens have target probability > 0 at their position; accepted paths follow the tree."""
    for i, (path, em) in enumerate(zip(r.paths(), r.emitted())):
        s, prev = int(cu[i]), -1
        for j, x in zip(path, em):
            assert int(par[s + j]) == prev and int(tok[s + j]) == x
            prev = j
        assert float(tp[s + i + prev + 1, em[-1]]) > 0


@pytest.mark.parametrize("sampled", [False, True], ids=["one_hot_q", "sampled_q"])
def test_chain_matches_reference_and_tree_with_chain_parents(sampled):
    for seed in range(20):
        tok, cu, par, dp, tp = random_batch(seed, B=4, V=5, max_n=5, tree=False, sampled=sampled)
        seeds = [seed * 100 + i for i in range(4)]
        r = rejection_accept_chain(tok, cu, dp, tp, gens(seeds))
        _same(r, rejection_accept_chain_ref(tok, cu, dp, tp, gens(seeds)))
        _same(r, rejection_accept_tree_ref(tok, cu, par, dp, tp, gens(seeds)))
        _same(r, rejection_accept_tree(tok, cu, par, dp, tp, gens(seeds)))  # the tree walk
        _same(r, rejection_accept_tree(tok, cu, None, dp, tp, gens(seeds)))  # parent=None: the chain path
        _check_support(r, tok, cu, par, tp)


@pytest.mark.parametrize("sampled", [False, True], ids=["one_hot_q", "sampled_q"])
def test_tree_matches_reference_on_random_forests(sampled):
    for seed in range(30):
        tok, cu, par, dp, tp = random_batch(seed, B=4, V=4, max_n=8, tree=True, sampled=sampled,
                                            argmax_bias=0.5)
        if dp is not None and seed % 3 == 0:  # some deterministic nodes among sampled ones: one-hot rows
            det = torch.arange(tok.shape[0]) % 2 == 0
            dp = torch.where(det[:, None], torch.nn.functional.one_hot(tok, 4).float(), dp)
        seeds = [seed * 100 + i for i in range(4)]
        r = rejection_accept_tree(tok, cu, par, dp, tp, gens(seeds))
        _same(r, rejection_accept_tree_ref(tok, cu, par, dp, tp, gens(seeds)))
        _check_support(r, tok, cu, par, tp)


def test_certain_outcomes():
    # target one-hot on the draft: always accepted; draft of target probability 0: never
    tp = T_([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    for s in range(20):
        r = rejection_accept_chain(T_([1, 2]), [0, 2], None, tp, gens([s]))
        assert r.emitted()[0][:2] == [1, 2] and r.emitted()[0][2] in (0, 1)
        r = rejection_accept_chain(T_([0, 2]), [0, 2], None, tp, gens([s]))
        assert r.emitted() == [[1]]  # residual of a one-hot target is the target
        # duplicate deterministic siblings: once 2 is rejected (p(2) = 0.3 here) its duplicate is rejected surely
        tree_p = T_([[0.2, 0.5, 0.3], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
        r = rejection_accept_tree(T_([2, 2, 2]), [0, 3], T_([-1, -1, -1]), None, tree_p, gens([s]))
        assert r.paths()[0] in ([0], []), r.paths()
        if not r.paths()[0]:
            assert r.emitted()[0][0] in (0, 1)


def test_seeded_determinism_and_batch_independence():
    tok, cu, par, dp, tp = random_batch(7, B=6, V=6, max_n=6, tree=True, sampled=True)
    seeds = list(range(100, 106))
    for op, args in ((rejection_accept_chain, (tok, cu, dp, tp)), (rejection_accept_tree, (tok, cu, par, dp, tp))):
        first = op(*args, gens(seeds))
        for _ in range(20):
            _same(op(*args, gens(seeds)), first)
        other = [op(*args, gens([s + 1000 for s in seeds])).tokens for _ in range(3)]
        assert any(not torch.equal(o, first.tokens) for o in other)
    # row i alone, with its own generator, gives what it gives inside the batch
    full = rejection_accept_tree(tok, cu, par, dp, tp, gens(seeds))
    for i in range(6):
        s, e = int(cu[i]), int(cu[i + 1])
        alone = rejection_accept_tree(tok[s:e], [0, e - s], par[s:e], dp[s:e], tp[s + i:e + i + 1], gens([seeds[i]]))
        assert alone.emitted()[0] == full.emitted()[i] and alone.paths()[0] == full.paths()[i]


def test_each_row_draws_n_plus_one_uniforms_in_one_call():
    tok, cu, par, dp, tp = random_batch(3, B=3, V=5, max_n=4, tree=True, sampled=True)
    for op, args in ((rejection_accept_chain, (tok, cu, dp, tp)), (rejection_accept_tree, (tok, cu, par, dp, tp))):
        gs = gens([1, 2, 3])
        op(*args, gs)
        for i, g in enumerate(gs):
            n = int(cu[i + 1] - cu[i])
            fresh = torch.Generator().manual_seed(i + 1)
            torch.rand(n + 1, generator=fresh, dtype=torch.float64)
            assert torch.equal(g.get_state(), fresh.get_state())


def test_default_generator_is_reproducible_under_manual_seed():
    tok, cu, par, dp, tp = random_batch(5, B=3, V=5, max_n=4, tree=True, sampled=False)
    torch.manual_seed(123)
    a = rejection_accept_tree(tok, cu, par, dp, tp)
    torch.manual_seed(123)
    _same(a, rejection_accept_tree(tok, cu, par, dp, tp))
    torch.manual_seed(123)
    _same(a, rejection_accept_tree_ref(tok, cu, par, dp, tp))


def test_empty_batches_and_rows_without_drafts():
    empty = T_([], dtype=torch.long)
    for op, extra in ((rejection_accept_chain, ()), (rejection_accept_tree, (empty,))):
        args = (empty, [0], *extra, None, torch.zeros(0, 4))
        r = op(*args, [])
        assert r.tokens.shape == (0, 1) and r.num_accepted.shape == (0,)
        tp = T_([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        r = op(empty, [0, 0, 0], *extra, None, tp, gens([0, 1]))
        assert r.emitted() == [[1], [2]] and r.accepted_nodes.shape == (2, 0)


def test_bad_inputs_raise_errors_naming_the_problem():
    tok, cu = T_([1, 2]), T_([0, 2])
    tp = torch.full((3, 4), 0.25)
    g = gens([0])
    chain = rejection_accept_chain
    tree = rejection_accept_tree
    cases = [
        (ShapeError, "cu_draft", lambda: chain(tok, T_([0, 3]), None, tp, g)),
        (ShapeError, "cu_draft", lambda: chain(tok, T_([1, 2]), None, tp, g)),
        (ShapeError, "cu_draft", lambda: chain(T_([1, 2, 3]), T_([0, 2, 1, 3]), None, torch.full((6, 4), 0.25))),
        (DTypeError, "draft_tokens", lambda: chain(tok.float(), cu, None, tp, g)),
        (ShapeError, "draft_tokens", lambda: chain(tok[None], cu, None, tp, g)),
        (DTypeError, "cu_draft", lambda: chain(tok, cu.float(), None, tp, g)),
        (ShapeError, "target_probs", lambda: chain(tok, cu, None, tp[:2], g)),
        (DTypeError, "target_probs", lambda: chain(tok, cu, None, tp.long(), g)),
        (ShapeError, "target_probs", lambda: chain(tok, cu, None, tp * 2, g)),  # rows sum to 2
        (ShapeError, "target_probs", lambda: chain(tok, cu, None, tp.log(), g)),  # logits, not probabilities
        (ShapeError, "target_probs", lambda: chain(tok, cu, None, tp.to("meta"), g)),  # another device
        (ShapeError, "draft_probs", lambda: chain(tok, cu, torch.full((2, 5), 0.2), tp, g)),  # V differs
        (ShapeError, "draft_probs", lambda: chain(tok, cu, torch.full((1, 4), 0.25), tp, g)),
        (ShapeError, "draft_tokens", lambda: chain(T_([1, 4]), cu, None, tp, g)),  # token 4 >= V
        (ShapeError, "draft_tokens", lambda: chain(T_([-1, 0]), cu, None, tp, g)),
        (OptionError, "generators", lambda: chain(tok, cu, None, tp, gens([0, 1]))),
        (OptionError, "generators", lambda: chain(tok, cu, None, tp, g[0])),
        (OptionError, r"generators\[0\]", lambda: chain(tok, cu, None, tp, [0])),
        (ShapeError, "parent", lambda: tree(tok, cu, T_([-1, 1]), None, tp, g)),  # its own parent
        (ShapeError, "parent", lambda: tree(tok, cu, T_([-2, 0]), None, tp, g)),
        (ShapeError, "parent", lambda: tree(tok, cu, T_([-1]), None, tp, g)),
        (DTypeError, "parent", lambda: tree(tok, cu, T_([-1.0, 0.0]), None, tp, g)),
        (ShapeError, "parent", lambda: tree(T_([1, 2]), T_([0, 1, 2]), T_([-1, 0]), None, torch.full((4, 4), 0.25),
                                            gens([0, 1]))),  # node 1 is the first of row 1: its parent is -1
        (ShapeError, "target_argmax", lambda: greedy_accept(tok, cu, T_([1, 2]))),
        (ShapeError, "target_argmax", lambda: greedy_accept(tok, cu, T_([1, 2, -3]))),
        (ShapeError, "parent", lambda: greedy_accept(tok, cu, T_([1, 2, 3]), T_([0, 0]))),
    ]
    for err, what, call in cases:
        with pytest.raises(err, match=what):
            call()
    # a bad input consumes no randomness
    gs = gens([0])
    with pytest.raises(ShapeError):
        chain(tok, cu, None, tp * 2, gs)
    assert torch.equal(gs[0].get_state(), torch.Generator().manual_seed(0).get_state())
