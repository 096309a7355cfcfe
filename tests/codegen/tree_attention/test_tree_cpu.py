"""Tree attention on the CPU (``cpu.tree_attention``, every BATCH mode) and its reference, against float64.

Odd shapes: ctx_len 0, n = 1, chains, trees, forests, GQA and MHA, rows of different n, rows that
batch (equal sizes, evenly spaced in the pool) and rows that do not, non-contiguous pool views.
The oracle: over a chain, tree attention is bottom-right causal attention over context + chain,
computed by torch's SDPA. Tolerances: ``tree_cases.TOL``.
"""
import pytest
import torch

from graphtune.codegen.registry import KernelConfig, get_impl
from graphtune.codegen.tree_attention.cpu import BATCH_MODES, tree_attention_cpu
from graphtune.codegen.tree_attention.key import TreeShape
from graphtune.codegen.tree_attention.op import tree_attention
from graphtune.codegen.tree_attention.plan import plan_tree
from graphtune.codegen.tree_attention.reference import tree_attention_ref
from graphtune.errors import PlanError, ShapeError

from tree_cases import assert_close, causal_oracle, make_case, oracle, poisoned_case

CFGS = [KernelConfig.make(BATCH=b) for b in BATCH_MODES]

CASES = {
    # rows that batch: equal ctx and n, evenly spaced
    "chains_batched": dict(ctxs=[30] * 4, ns=[5] * 4, kinds="chain"),
    "trees_batched": dict(ctxs=[30] * 4, ns=[5] * 4, kinds="tree"),
    "forests_batched_no_context": dict(ctxs=[0] * 3, ns=[6] * 3, kinds="forest"),
    # ragged rows: ctx 0, n 1, different n, packed unevenly
    "ragged": dict(ctxs=[0, 17, 5, 40], ns=[1, 4, 7, 2], kinds=["tree", "forest", "tree", "chain"], layout="packed"),
    "single_root_rows": dict(ctxs=[9, 0, 33], ns=[1, 1, 1], layout="shuffled"),
    # two equal rows separated by an odd one: a group whose tokens are not contiguous
    "non_adjacent_group": dict(ctxs=[12, 3, 12], ns=[3, 2, 3], kinds=["tree", "chain", "forest"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("hq, hkv", [(6, 2), (3, 3)])  # GQA 3, MHA
def test_cpu_matches_fp64_for_every_batch_mode(name, hq, hkv):
    args = make_case(**CASES[name], hq=hq, hkv=hkv)
    want = oracle(args)
    for cfg in CFGS:
        assert_close(tree_attention_cpu(*args, config=cfg), want, torch.float32, f"{name} {cfg}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["trees_batched", "ragged", "chains_batched"])
def test_cpu_half_precision_within_dtype_tolerance(dtype, name):
    args = make_case(**CASES[name], d=64, dtype=dtype)
    want = oracle(args)
    for cfg in CFGS:
        assert_close(tree_attention_cpu(*args, config=cfg), want, dtype, f"{name} {cfg}")


@pytest.mark.parametrize("pool", ["layer", "slot_major"])
def test_cpu_reads_non_contiguous_pool_views(pool):
    args = make_case(ctxs=[20] * 3 + [7], ns=[4] * 3 + [2], kinds="tree", pool=pool)
    assert not args[1].is_contiguous()
    want = oracle(args)
    for cfg in CFGS:
        assert_close(tree_attention_cpu(*args, config=cfg), want, torch.float32, f"{pool} {cfg}")


def test_cpu_reads_only_each_rows_slots():
    args = poisoned_case(ctxs=[10, 10, 4], ns=[3, 3, 2], layout="spaced")
    want = oracle(args)
    for cfg in CFGS:
        assert_close(tree_attention_cpu(*args, config=cfg), want, torch.float32, str(cfg))


@pytest.mark.parametrize("ctx", [0, 1, 37])
@pytest.mark.parametrize("n", [1, 2, 6])
def test_chain_tree_attention_is_causal_attention_over_context_plus_chain(ctx, n):
    """The oracle: a chain draft sees exactly the keys bottom-right causal attention lets it see."""
    args = make_case(ctxs=[ctx, ctx + 3], ns=[n, n], kinds="chain", layout="packed", d=32)
    want_o, want_l = causal_oracle(args, 0.2)
    for cfg in CFGS:
        o, l = tree_attention_cpu(*args, 0.2, config=cfg)
        torch.testing.assert_close(o.double(), want_o, atol=2e-5, rtol=0)
        torch.testing.assert_close(l.double(), want_l, atol=2e-5, rtol=0)
    ro, rl = tree_attention_ref(*args, 0.2)
    torch.testing.assert_close(ro.double(), want_o, atol=2e-6, rtol=0)
    torch.testing.assert_close(rl.double(), want_l, atol=2e-6, rtol=0)


def test_reference_in_fp64_agrees_with_fp32():
    args = make_case(ctxs=[15, 0], ns=[4, 3], kinds="forest", layout="packed")
    o64, l64 = oracle(args)
    assert o64.dtype == torch.float64 and l64.dtype == torch.float32
    o32, l32 = tree_attention_ref(*args)
    torch.testing.assert_close(o32.double(), o64, atol=2e-6, rtol=0)
    torch.testing.assert_close(l32, l64, atol=2e-6, rtol=0)


def test_cpu_in_fp64():
    # fp64 end to end, except the split groups' LSE merge: merge_lse weighs partials in fp32 (1e-7 relative)
    args = make_case(ctxs=[8] * 3, ns=[3] * 3, kinds="tree", dtype=torch.float64)
    want = tree_attention_ref(*args)
    for cfg, atol in zip(CFGS, (1e-12, 1e-6, 1e-6)):
        o, l = tree_attention_cpu(*args, config=cfg)
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, want[0], atol=atol, rtol=0)
        torch.testing.assert_close(l, want[1], atol=1e-6, rtol=0)


def test_one_plan_serves_every_layer_and_the_entry_point_dispatches_to_cpu():
    args = make_case(ctxs=[20] * 3, ns=[4] * 3, kinds="tree")
    q, k, v, *idx = args
    plan = plan_tree(*idx)
    for layer in range(3):  # new keys and queries per layer, one plan
        k, v, q = torch.randn_like(k), torch.randn_like(v), torch.randn_like(q)
        want = oracle((q, k, v, *idx))
        assert_close(tree_attention(q, k, v, *idx, plan=plan), want, torch.float32, f"layer {layer}")
        assert_close(tree_attention(q, k, v, *idx), want, torch.float32, f"layer {layer}, no plan")
    # distinct trees in one group: one stacked mask, built once for the three layers
    assert [k[0] for k in plan._memo].count("cpu.group_masks") == 1


def test_default_batch_mode_splits_groups_whose_stacked_masks_exceed_the_budget(monkeypatch):
    from graphtune.codegen.tree_attention import cpu

    args = make_case(**CASES["trees_batched"])
    want = oracle(args)
    monkeypatch.setattr(cpu, "STACKED_MASK_BYTES", 0)
    plan = plan_tree(*args[3:])
    assert_close(tree_attention_cpu(*args, plan=plan), want, torch.float32)
    assert {k[0] for k in plan._memo} == {"cpu.draft_masks"}  # split: the n x n draft masks only


def test_cpu_refuses_mismatched_shapes_and_pools():
    q, k, v, *idx = make_case(ctxs=[10, 5], ns=[3, 2])
    with pytest.raises(ShapeError, match="ranks"):
        tree_attention_cpu(q[None], k, v, *idx)
    with pytest.raises(ShapeError, match="incompatible"):
        tree_attention_cpu(q[:5], k, v, *idx)
    with pytest.raises(PlanError, match="tokens"):
        tree_attention_cpu(q[:, :4], k, v, *idx)
    with pytest.raises(PlanError, match="pool"):
        tree_attention_cpu(q, k[:, :10], v[:, :10], *idx)
    with pytest.raises(ShapeError, match="BATCH"):
        tree_attention_cpu(q, k, v, *idx, config=KernelConfig.make(BATCH=7))


def test_registered_cpu_impl_is_tunable_on_its_key():
    from graphtune.autotune.tuner import tune_shape

    impl = get_impl("tree_attention", "cpu.tree_attention")
    shape = TreeShape(3, 6, 2, 16, 24, 4, "tree")
    args = shape.make_args(0)
    assert impl.supports(args) and impl.configs(args) == CFGS
    res = tune_shape(shape, "exhaustive", device="cpu", db=None)
    assert res.op == "tree_attention" and res.n_tried == len(CFGS) and not res.failures, res
