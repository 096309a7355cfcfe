"""The tree-attention host plan: ancestor masks of chains, trees and forests, the CPU batching groups,
the plan cache, the packed ancestor bits of the Triton path, and the reference's own visibility."""
import pytest
import torch

from graphtune.codegen.tree_attention.plan import ancestor_mask, plan_for, plan_tree
from graphtune.codegen.tree_attention.reference import row_visibility
from graphtune.errors import PlanError


def _walk(parents, j):
    out = set()
    while j >= 0:
        out.add(j)
        j = parents[j]
    return out


def test_ancestor_mask_of_a_chain_is_lower_triangular():
    m = ancestor_mask(torch.tensor([0, 5]), torch.tensor([-1, 0, 1, 2, 3]))
    assert torch.equal(m, torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("seed", range(5))
def test_ancestor_mask_is_the_ancestor_relation_of_random_forests(seed):
    g = torch.Generator().manual_seed(seed)
    ns = [int(x) for x in torch.randint(1, 9, (4,), generator=g)]
    par, cu = [], [0]
    for n in ns:
        par += [-1] + [int(torch.randint(-1, j, (), generator=g)) for j in range(1, n)]
        cu.append(cu[-1] + n)
    m = ancestor_mask(cu, par)
    assert m.shape == (sum(ns), max(ns))
    for i, n in enumerate(ns):
        local = par[cu[i]:cu[i + 1]]
        for j in range(n):
            want = _walk(local, j)
            assert {c for c in range(max(ns)) if m[cu[i] + j, c]} == want
        # and the reference's own (independent) visibility agrees
        assert torch.equal(row_visibility(3, local)[:, 3:], m[cu[i]:cu[i + 1], :n])


@pytest.mark.parametrize("cu_q, parent, match", [
    ([0, 2, 2], [-1, 0], "at least its root"),
    ([1, 3], [-1, 0], "start at 0"),
    ([0, 3], [-1, 0], "parent has 2"),
    ([0, 3], [-1, 2, 0], "parent 2"),  # a parent after the token
    ([0, 2], [-1, -2], "parent -2"),
    ([0, 2, 4], [-1, 0, -1, 2], "parent 2"),  # a parent index of another row (global, not row-local)
])
def test_malformed_trees_are_refused(cu_q, parent, match):
    with pytest.raises(PlanError, match=match):
        ancestor_mask(cu_q, parent)


def test_the_reference_refuses_a_parent_after_its_token():
    with pytest.raises(PlanError, match="parent 2"):
        row_visibility(4, [-1, 2, 0])


def test_plan_groups_rows_with_equal_sizes_and_evenly_spaced_keys():
    # rows 0, 1, 2: ctx 20, n 4, spaced 64 apart (one group); row 3 breaks the spacing; row 4 differs
    plan = plan_tree([0, 64, 128, 300, 400], [20, 20, 20, 20, 5], [0, 4, 8, 12, 16, 17],
                     [-1, 0, 1, 2] * 3 + [-1, 0, 0, 1] + [-1])
    assert [g.rows for g in plan.groups] == [(0, 1, 2), (3,), (4,)]
    g0 = plan.groups[0]
    assert (g0.ctx, g0.n, g0.kv0, g0.step, g0.t0, g0.shared_tree) == (20, 4, 0, 64, 0, True)
    assert plan.kv_end == 406 and plan.total == 17 and plan.max_n == 4 and plan.batch == 5


def test_plan_groups_non_adjacent_rows_and_flags_distinct_trees():
    plan = plan_tree([0, 50, 100], [10, 3, 10], [0, 3, 5, 8], [-1, 0, 0, -1, 0, -1, 0, 1])
    grp = next(g for g in plan.groups if len(g.rows) == 2)
    assert grp.rows == (0, 2) and grp.t0 == -1 and grp.tokens == (0, 1, 2, 5, 6, 7)
    assert not grp.shared_tree  # a root with two children vs a chain


def test_plan_refuses_inconsistent_index_arguments():
    with pytest.raises(PlanError, match="disagree"):
        plan_tree([0], [1, 2], [0, 1], [-1])
    with pytest.raises(PlanError, match=">= 0"):
        plan_tree([-1], [1], [0, 1], [-1])
    with pytest.raises(PlanError, match="1-D integer"):
        plan_tree(torch.tensor([0.0]), [1], [0, 1], [-1])


def test_plan_for_caches_by_tensor_identity_and_version():
    idx = [torch.tensor([0]), torch.tensor([5]), torch.tensor([0, 2]), torch.tensor([-1, 0])]
    p = plan_for(*idx)
    assert plan_for(*idx) is p
    idx[1][0] = 6  # modified in place: a new version, a new plan
    p2 = plan_for(*idx)
    assert p2 is not p and p2.ctx_len == (6,)
    assert plan_for([0], [6], [0, 2], [-1, 0]).ctx_len == (6,)  # sequences are keyed by value


def test_plan_memo_builds_once():
    plan = plan_tree([0], [3], [0, 1], [-1])
    calls = []
    for _ in range(3):
        plan.memo("x", lambda: calls.append(1) or len(calls))
    assert calls == [1] and plan.memo("x", lambda: 99) == 1
    # a builder may ask the memo for something else (the CPU path's stacked masks do)
    assert plan.memo("outer", lambda: plan.memo("inner", lambda: 1) + 1) == 2


def test_ancestor_bits_pack_32_keys_per_word_including_the_sign_bit():
    pytest.importorskip("triton")
    from graphtune.codegen.tree_attention.triton_kernels import ancestor_bits

    n = 70  # three words, the last one partial
    m = ancestor_mask([0, n], list(range(-1, n - 1)))
    bits = ancestor_bits(m)
    assert bits.shape == (n, 3) and bits.dtype == torch.int32
    for t in (0, 31, 32, 69):
        for c in range(n):
            assert bool((int(bits[t, c // 32]) >> (c % 32)) & 1) == bool(m[t, c])
