"""Losslessness, measured: the tokens the rejection ops emit are distributed exactly as sampling the target.

Each test verifies N = 20k-30k independent rows in one batch (each row its own seeded generator) and checks
the histogram of the first emitted token, or of the first two (a row that emits one token draws its second
from the target at the next position, as the next decoding step would), against the target distribution:
no sample outside the support, chi-square below its 1e-6 quantile, total variation below 4 sqrt(K/N).
Every seed is fixed, so the tests cannot flake; ``test_the_check_detects_a_lossy_rule`` shows the same check
fails by a wide margin on a lossy rule (sampled drafts verified as if deterministic, EAGLE's caveat).
"""
import pytest
import torch

from graphtune.codegen.spec_accept.accept import rejection_accept_chain, rejection_accept_tree

from spec_accept_cases import assert_distribution, chi2_quantile, chi2_statistic, gens, warped

V = 6


def _dists(seed: int):
    """P1 [V], P2 [V, V] (next token given the first), P3 [V] (anything deeper), Q1 [V], Q2 [V, V]; P's warped."""
    g = torch.Generator().manual_seed(seed)
    P1 = warped(torch.randn(V, generator=g) * 1.5, top_k=4).double()  # two tokens of probability 0
    P2 = warped(torch.randn(V, V, generator=g) * 1.5, top_p=0.85).double()  # top-p zeros
    P3 = torch.randn(V, generator=g).softmax(-1).double()
    Q1 = torch.randn(V, generator=g).mul(1.5).softmax(-1).double()  # mass on tokens P rules out, too
    Q2 = torch.randn(V, V, generator=g).mul(1.5).softmax(-1).double()
    return P1, P2, P3, Q1, Q2


def _multinomial(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs.float(), 1, generator=g).squeeze(1)


def _joint(r, P2, g):
    """Counts of (first, second) emitted token; a row that emitted one token draws its second from P2[first]."""
    x1 = r.tokens[:, 0]
    x2 = torch.where(r.num_accepted >= 1, r.tokens[:, 1], _multinomial(P2[x1], g))
    return torch.bincount(x1 * V + x2, minlength=V * V).view(V, V)


def _chain_batch(N: int, k: int, sampled: bool, seed: int):
    """N rows of k drafts: d_0 ~ Q1, d_j ~ Q2[d_{j-1}] (or deterministic per row); targets P1, P2[d_0], P3..."""
    P1, P2, P3, Q1, Q2 = _dists(seed)
    g = torch.Generator().manual_seed(1000 + seed)  # the drafts' stream; the tests' other streams differ
    rows = torch.arange(N)
    d = [_multinomial(Q1.expand(N, V), g) if sampled else rows % V]
    for j in range(1, k):
        d.append(_multinomial(Q2[d[-1]], g) if sampled else (rows * 5 + 3 * j + d[-1]) % V)
    drafts = torch.stack(d, 1)  # [N, k]
    tp = [P1.expand(N, V), P2[drafts[:, 0]]] + [P3.expand(N, V)] * (k - 1)  # positions 0 .. k
    tp = torch.stack(tp, 1).reshape(N * (k + 1), V).float()
    dp = torch.stack([Q1.expand(N, V)] + [Q2[drafts[:, j - 1]] for j in range(1, k)], 1).reshape(N * k, V).float()
    cu = torch.arange(0, N * k + 1, k)
    return drafts.reshape(-1), cu, dp if sampled else None, tp, (P1, P2)


@pytest.mark.parametrize("k, sampled", [(1, True), (3, True), (3, False)])  # k = 2: the joint test below
def test_chain_first_token_is_distributed_as_the_target(k, sampled):
    N = 20_000
    tok, cu, dp, tp, (P1, _) = _chain_batch(N, k, sampled, seed=10 + k)
    r = rejection_accept_chain(tok, cu, dp, tp, gens(range(N)))
    assert_distribution(torch.bincount(r.tokens[:, 0], minlength=V), P1, f"first token, k={k}")
    assert 0 < float(r.num_accepted.float().mean()) < k  # both outcomes occur


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled_q", "one_hot_q"])
def test_chain_first_two_tokens_are_distributed_as_the_target(sampled):
    N = 30_000
    tok, cu, dp, tp, (P1, P2) = _chain_batch(N, 2, sampled, seed=3)
    r = rejection_accept_chain(tok, cu, dp, tp, gens(range(N, 2 * N)))
    counts = _joint(r, P2, torch.Generator().manual_seed(2000))
    assert_distribution(counts, P1[:, None] * P2, "first two tokens")


def _tree_batch(N: int, sampled: bool, seed: int):
    """Root children 0, 1, 2 (under the root), nodes 3, 4, 5 under 0, 1, 2. Deterministic: tokens a, a, b
    (a duplicate) per row; sampled: child 0 deterministic (a token per row), children 1, 2 i.i.d. from Q1."""
    P1, P2, P3, Q1, Q2 = _dists(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    rows = torch.arange(N)
    if sampled:
        first = [rows % V, _multinomial(Q1.expand(N, V), g), _multinomial(Q1.expand(N, V), g)]
        second = [_multinomial(Q2[f], g) for f in first]
    else:
        a, b = rows % V, (rows // V) % V
        first = [a, a, b]
        second = [(a + 1) % V, (a + 2) % V, (b * 2) % V]
    tok = torch.stack(first + second, 1)  # [N, 6]
    parent = torch.tensor([-1, -1, -1, 0, 1, 2]).repeat(N)
    # positions: 0 the root, 1 + j after node j
    tp = torch.stack([P1.expand(N, V)] + [P2[f] for f in first] + [P3.expand(N, V)] * 3, 1).reshape(N * 7, V).float()
    dp = None
    if sampled:
        det = torch.nn.functional.one_hot(first[0], V).double()
        dp = torch.stack([det, Q1.expand(N, V), Q1.expand(N, V)] + [Q2[f] for f in first], 1).reshape(N * 6, V).float()
    return tok.reshape(-1), torch.arange(0, 6 * N + 1, 6), parent, dp, tp, (P1, P2)


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled_and_deterministic_children", "duplicate_one_hot"])
def test_tree_first_two_tokens_are_distributed_as_the_target(sampled):
    N = 20_000
    tok, cu, par, dp, tp, (P1, P2) = _tree_batch(N, sampled, seed=5)
    r = rejection_accept_tree(tok, cu, par, dp, tp, gens(range(2 * N, 3 * N)))
    assert_distribution(torch.bincount(r.tokens[:, 0], minlength=V), P1, "tree: first token")
    assert_distribution(_joint(r, P2, torch.Generator().manual_seed(2001)), P1[:, None] * P2, "tree: first two tokens")
    picked = torch.bincount(r.accepted_nodes[:, 0][r.num_accepted > 0], minlength=6)
    assert picked[0] > 0 and picked[2] > 0 and (picked[3:] == 0).all()
    # a duplicate of a rejected one-hot sibling is never accepted; a sampled second child sometimes is
    assert (picked[1] > 0) == sampled


def test_the_check_detects_a_lossy_rule():
    # q must be the distribution the draft was drawn from: deterministic drafts (Q1's argmax) verified with
    # the ratio rule against Q1 are accepted too rarely when Q1 is confident, so the first token is not ~ P1
    N = 20_000
    tok, cu, dp, tp, (P1, _) = _chain_batch(N, 1, True, seed=11)
    Q1 = dp[0].double()
    tok = torch.full_like(tok, int(Q1.argmax()))
    r = rejection_accept_chain(tok, cu, dp, tp, gens(range(N)))
    stat = chi2_statistic(torch.bincount(r.tokens[:, 0], minlength=V), P1)
    assert stat > 10 * chi2_quantile(int((P1 > 0).sum()) - 1)
    # ... while the same deterministic drafts verified as one-hot (draft_probs=None) are lossless
    r = rejection_accept_chain(tok, cu, None, tp, gens(range(N)))
    assert_distribution(torch.bincount(r.tokens[:, 0], minlength=V), P1, "deterministic drafts, one-hot q")
    # and so are sampled drafts verified as one-hot: the rule is exact for any drafts that do not depend on
    # the verification's uniforms (it only accepts less often than the ratio rule)
    tok, cu, dp, tp, _ = _chain_batch(N, 1, True, seed=11)
    r = rejection_accept_chain(tok, cu, None, tp, gens(range(N, 2 * N)))
    assert_distribution(torch.bincount(r.tokens[:, 0], minlength=V), P1, "sampled drafts, one-hot q")
