"""The pattern engine: kinds across vocabularies, captures, alternation, wrappers, single-use, apply."""
import operator

import pytest
import torch
import torch.fx as fx

from graphtune.rewrites import Any, Maybe, Pat, PatternMatcher, Rule
from graphtune.rewrites.kinds import kind_of, view
from graphtune.rewrites.pattern import dead_code_elimination


class Chain(torch.nn.Module):
    def forward(self, q, k):
        s = torch.matmul(q, k.transpose(-2, -1)) / 4.0
        return torch.softmax(s.float(), dim=-1)


def _kinds(gm):
    return [kind_of(n) for n in gm.graph.nodes if kind_of(n) is not None]


def test_kinds_are_the_same_for_fx_dynamo_and_export_graphs(capture):
    x = torch.randn(2, 3, 4, 8)
    expected = ["transpose", "matmul", "div", "cast", "softmax"]
    for how in ("fx", "dynamo", "export"):
        gm, _ = capture(Chain(), (x, x), how)
        assert _kinds(gm) == expected, how


def test_view_normalizes_arguments_of_method_and_aten_spellings(capture):
    x = torch.randn(2, 3, 4, 8)
    for how in ("fx", "export"):
        gm, _ = capture(Chain(), (x, x), how)
        v = {view(n).kind: view(n) for n in gm.graph.nodes if view(n) is not None}
        assert v["transpose"].params["dims"] == (-2, -1)
        assert v["softmax"].params["dim"] == -1
        assert v["div"].inputs[1] == 4.0


def test_view_rejects_ops_that_only_look_like_kinds():
    def f(x, y):
        return torch.add(x, y, alpha=2), torch.div(x, y, rounding_mode="floor"), x[0], torch.where(x > 0)

    gm = fx.symbolic_trace(f)
    assert _kinds(gm) == []


def _keep_x(m, x, **_):
    return x


def _is_two(m, c, **_):
    return c == 2


def _trace(f, *shapes):
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = fx.symbolic_trace(f)
    FakeTensorProp(gm).propagate(*[torch.randn(s) for s in shapes])
    return gm


def test_commutative_pattern_matches_either_operand_order():
    pm = PatternMatcher([Rule(Pat("mul", Pat.var("x"), Pat.var("c"), commutative=True), _keep_x, extra_check=_is_two)])
    gm = _trace(lambda a: torch.relu(2 * a) + torch.relu(a * 2), (3,))
    assert pm.apply(gm) == 2
    assert "mul" not in gm.code


def test_same_capture_name_twice_requires_the_same_value():
    pm = PatternMatcher([Rule(Pat("mul", Pat.var("x"), Pat.var("x")), _keep_x)])
    gm = _trace(lambda a, b: (a * a).relu() + (a * b).relu(), (3,), (3,))
    assert pm.apply(gm) == 1  # a*a matches, a*b does not


def _sum_inputs(m, a, b, **_):
    return m.call(operator.add, a, b)


def test_any_backtracks_into_a_later_alternative():
    # the first alternative fails below the root (x is not a div); the second must still be tried
    inner = Any(Pat("mul", Pat("div", Pat.var("a"), Pat.var("b"))), Pat("mul", Pat.var("a"), Pat.var("b")))
    pm = PatternMatcher([Rule(Pat("softmax", inner), _sum_inputs)])
    gm = _trace(lambda x, y: torch.softmax(x * y, dim=-1), (4,), (4,))
    assert pm.apply(gm) == 1
    x, y = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(gm(x, y), x + y)


def _record_wrappers(m, x, wraps, **_):
    m.ctx.append([kind_of(w) for w in wraps])
    return x


def test_maybe_skips_any_number_of_wrappers_and_captures_them():
    pat = Pat("softmax", Maybe(("cast", "contiguous"), Pat.var("x"), name="wraps"))
    pm = PatternMatcher([Rule(pat, _record_wrappers)])
    gm = _trace(lambda a: torch.softmax(a.float().contiguous(), -1).relu(), (3, 4))
    seen = []
    assert pm.apply(gm, seen) == 1
    assert seen == [["contiguous", "cast"]]


def _softmax_and_product(x, y):
    p = x * y
    return torch.softmax(p, -1), p


def test_interior_node_with_another_user_does_not_match():
    pm = PatternMatcher([Rule(Pat("softmax", Pat("mul", Pat.var("a"), Pat.var("b"))), _sum_inputs)])
    gm = _trace(_softmax_and_product, (4,), (4,))
    gm2 = _trace(lambda x, y: torch.softmax(x * y, -1), (4,), (4,))
    before = gm.code
    assert pm.apply(gm) == 0 and gm.code == before  # the product is also returned
    assert pm.apply(gm2) == 1


def _never(m, **_):
    return False


def test_extra_check_false_blocks_the_rewrite():
    pm = PatternMatcher([Rule(Pat("mul", Pat.var("x"), Pat.var("c")), _keep_x, extra_check=_never)])
    gm = _trace(lambda a: a * 2, (3,))
    assert pm.apply(gm) == 0


def _insert_then_decline(m, x, **_):
    m.call(torch.relu, x)
    return None


def test_declining_callback_leaves_no_inserted_nodes_behind():
    pm = PatternMatcher([Rule(Pat("mul", Pat.var("x"), Pat.var("c")), _insert_then_decline)])
    gm = _trace(lambda a: a * 2, (3,))
    n_before = len(gm.graph.nodes)
    assert pm.apply(gm) == 0
    assert len(gm.graph.nodes) == n_before


def _to_relu(m, x, **_):
    return m.call(torch.relu, x)


def _to_neg(m, x, **_):
    return m.call(torch.neg, x)


def test_composition_with_plus_tries_left_rules_first():
    a = PatternMatcher([Rule(Pat("mul", Pat.var("x"), Pat.var("c")), _to_relu)])
    b = PatternMatcher([Rule(Pat("mul", Pat.var("x"), Pat.var("c")), _to_neg)])
    gm = _trace(lambda t: t * 3, (3,))
    assert (a + b).apply(gm) == 1
    assert "relu" in gm.code and "neg" not in gm.code
    assert len((a + b).rules) == 2


def test_a_pattern_rooted_at_a_bare_variable_is_rejected():
    with pytest.raises(ValueError, match="any node"):
        PatternMatcher([Rule(Pat.var("x"), _keep_x)])


def test_inserted_nodes_get_metadata_and_dead_nodes_are_removed():
    pm = PatternMatcher([Rule(Pat("mul", Pat("div", Pat.var("x"), Pat.var("c")), Pat.var("d")), _to_relu)])
    gm = _trace(lambda a: (a / 2) * 3, (5,))
    assert pm.apply(gm) == 1
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in ops] == [torch.relu]
    assert ops[0].meta["val"].shape == (5,)


def test_dead_code_elimination_keeps_unrelated_impure_nodes():
    gm = _trace(lambda a: a + 1, (3,))
    with gm.graph.inserting_before(next(iter(gm.graph.nodes)).next):
        gm.graph.call_function(torch._assert, (True, "keep me"))
    assert dead_code_elimination(gm) == 0
    assert any(n.target is torch._assert for n in gm.graph.nodes)
