"""Tree attention's Triton kernel in the interpreter against float64, and its default configs cross-compiled
for sm_80/sm_90 without spills.

Tolerances (``tree_cases.TOL``), as for graphtune's attention kernels: fp32 dots are IEEE
(``input_precision="ieee"``), only summation order differs; fp16/bf16 round P before P@V and the
output to the input dtype. LSE is fp32 throughout.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton.jit

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from graphtune.codegen.registry import KernelConfig, get_impl  # noqa: E402
from graphtune.codegen.tree_attention.key import TreeShape  # noqa: E402
from graphtune.codegen.tree_attention.plan import plan_tree  # noqa: E402
from graphtune.codegen.tree_attention.triton_kernels import (  # noqa: E402
    TREE_CONFIG_SPACE,
    TREE_DEFAULT_CONFIG,
    default_config,
    device_tables,
    prune_tree_configs,
    tree_attention_triton,
    tree_compile_args,
    tree_configs,
)
from graphtune.errors import KernelError, PlanError, ShapeError  # noqa: E402

from tree_cases import assert_close, causal_oracle, make_case, oracle, poisoned_case  # noqa: E402

SMALL = KernelConfig.make(BLOCK_M=16, BLOCK_N=16)  # short interpreter loops, several query blocks per row

# (dtype, GQA group, max_n, head dim): decode-width trees at the serving head dims; SmolLM2 is G3 D64
COMPILE_CASES = [
    (torch.float16, 4, 16, 128),  # 64 folded rows: 64x32 tiles
    (torch.bfloat16, 3, 16, 64),  # SmolLM2: 48 rows
    (torch.float16, 4, 4, 128),  # 16 rows: 16x64 tiles
    (torch.float16, 2, 16, 256),  # head dim 256: 8 warps
    (torch.float32, 3, 16, 64),  # fp32: 16x16 FMA tiles
]


@pytest.mark.parametrize("arch", [80, 90])
def test_default_configs_cross_compile_without_spills(arch):
    # first in this module: the interpreter injects its globals into the kernel module when it
    # runs a kernel, after which compiling that module's kernels in the same process can fail
    from graphtune.codegen.crosscompile import compile_for_target

    for dtype, group, max_n, d in COMPILE_CASES:
        cfg = default_config(dtype, group * max_n, d)
        fn, args, kwargs = tree_compile_args(dtype, group, max_n, d, cfg)
        res = compile_for_target(fn, args, kwargs, cfg, arch=arch, use_cache=False)
        where = (str(dtype), group, max_n, d, str(cfg))
        assert res.spill_bytes == 0, (where, res)
        assert res.registers <= 255 and res.shared_mem_bytes < 160 * 1024, (where, res)


def test_static_rank_of_the_registered_impl_on_meta_tensors():
    from graphtune.codegen.crosscompile import static_rank

    args = TreeShape(8, 9, 3, 64, 1024, 16, "tree", "bfloat16").meta_args()
    assert default_config(torch.bfloat16, 48, 64) in tree_configs(args)
    ranked = static_rank("triton.tree_attention", args, [default_config(torch.bfloat16, 48, 64), TREE_DEFAULT_CONFIG],
                         90)
    best_cfg, best_score, best_res = ranked[0]
    assert best_score > 0 and best_res.spill_bytes == 0 and best_res.kernel == "_tree_attn_kernel"


CASES = {
    "trees": dict(ctxs=[37, 37, 37], ns=[5, 5, 5], kinds="tree"),
    "ragged": dict(ctxs=[0, 17, 5, 40], ns=[1, 4, 7, 2], kinds=["tree", "forest", "tree", "chain"], layout="packed"),
    "shuffled_chains": dict(ctxs=[9, 0, 33], ns=[3, 1, 6], kinds="chain", layout="shuffled"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("hq, hkv", [(6, 2), (2, 2)])  # GQA 3, MHA
def test_triton_fp32_matches_fp64(name, hq, hkv):
    args = make_case(**CASES[name], hq=hq, hkv=hkv, d=24)  # odd head dim: masked D lanes
    want = oracle(args)
    for cfg in (None, SMALL):
        assert_close(tree_attention_triton(*args, config=cfg), want, torch.float32, f"{name} {cfg}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_within_dtype_tolerance(dtype):
    args = make_case(**CASES["ragged"], d=32, dtype=dtype)
    want = oracle(args)
    for cfg in (None, SMALL):
        assert_close(tree_attention_triton(*args, config=cfg), want, dtype, str(cfg))


def test_chain_tree_attention_is_causal_attention_over_context_plus_chain():
    args = make_case(ctxs=[0, 21, 5], ns=[3, 6, 1], kinds="chain", layout="packed", d=32)
    want_o, want_l = causal_oracle(args, 0.2)
    for cfg in (None, SMALL):
        o, l = tree_attention_triton(*args, 0.2, config=cfg)
        torch.testing.assert_close(o.double(), want_o, atol=2e-5, rtol=0)
        torch.testing.assert_close(l.double(), want_l, atol=2e-5, rtol=0)


def test_triton_draft_longer_than_one_ancestor_word():
    # 40 draft tokens: the ancestor bits span two int32 words, the draft loop two 32-key tiles
    args = make_case(ctxs=[3, 20], ns=[40, 34], kinds=["chain", "tree"], layout="packed")
    want = oracle(args)
    for cfg in (None, SMALL, KernelConfig.make(BLOCK_M=64, BLOCK_N=64)):
        assert_close(tree_attention_triton(*args, config=cfg), want, torch.float32, str(cfg))


@pytest.mark.parametrize("pool", ["layer", "slot_major"])
def test_triton_reads_non_contiguous_pool_views(pool):
    args = make_case(ctxs=[20, 20, 7], ns=[4, 4, 2], kinds="forest", pool=pool)
    assert not args[1].is_contiguous()
    assert_close(tree_attention_triton(*args, config=SMALL), oracle(args), torch.float32, pool)


def test_triton_reads_only_each_rows_slots():
    args = poisoned_case(ctxs=[10, 10, 4], ns=[3, 3, 2], layout="spaced")
    assert_close(tree_attention_triton(*args, config=SMALL), oracle(args), torch.float32)


def test_one_plan_uploads_its_tables_once_for_every_layer():
    q, k, v, *idx = make_case(ctxs=[12, 12], ns=[3, 3], kinds="tree")
    plan = plan_tree(*idx)
    tables = device_tables(plan, q.device)
    for _ in range(2):  # two layers
        k, v = torch.randn_like(k), torch.randn_like(v)
        assert_close(tree_attention_triton(q, k, v, *idx, plan=plan, config=SMALL), oracle((q, k, v, *idx)),
                     torch.float32)
    assert device_tables(plan, q.device) is tables


def test_triton_refuses_what_it_cannot_run():
    q, k, v, *idx = make_case(ctxs=[10], ns=[3])
    with pytest.raises(ShapeError, match="dtype"):
        tree_attention_triton(q.double(), k.double(), v.double(), *idx)
    with pytest.raises(PlanError, match="pool"):
        tree_attention_triton(q, k[:, :5], v[:, :5], *idx)
    with pytest.raises(KernelError, match="power-of-two"):
        tree_attention_triton(q, k, v, *idx, config=KernelConfig.make(BLOCK_M=24, BLOCK_N=16))


def test_prune_keeps_the_default_and_caps_block_m_at_the_folded_rows():
    kept = prune_tree_configs(TREE_CONFIG_SPACE, rows=12, head_dim=128, dtype=torch.float16)
    assert kept and all(c["BLOCK_M"] == 16 for c in kept)
    for dtype in ("float16", "float32"):  # 12 folded rows (G 4, n 3) at head dim 128
        args = TreeShape(2, 8, 2, 128, 100, 3, dtype=dtype).meta_args()
        assert default_config(args[0].dtype, 12, 128) in tree_configs(args)


def test_registered_impl_matches_the_reference_with_its_configs():
    impl = get_impl("tree_attention", "triton.tree_attention")
    args = TreeShape(2, 4, 2, 16, 40, 4, "tree").make_args(0)
    assert impl.supports(args)
    want = oracle(args[:7])
    for cfg in (impl.default_config(args), SMALL):
        assert_close(impl.fn(*args, config=cfg), want, torch.float32, str(cfg))
