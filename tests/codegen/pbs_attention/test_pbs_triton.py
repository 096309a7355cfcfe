"""PBS attention's Triton kernel in the interpreter against the reference, and its default configs
cross-compiled for sm_80/sm_90 without spills.

Tolerances (``pbs_triton_cases.TOL``), as for graphtune's attention kernels: fp32 dots are IEEE
(``input_precision="ieee"``), only summation order differs; fp16/bf16 round P before P@V and the
output to the input dtype. LSE is fp32 throughout.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton.jit

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from graphtune.codegen.pbs_attention.key import PBSShape  # noqa: E402
from graphtune.codegen.pbs_attention.plan import PBSConfig, plan_pbs  # noqa: E402
from graphtune.codegen.pbs_attention.reference import pbs_attention_ref  # noqa: E402
from graphtune.codegen.pbs_attention.triton_kernels import (  # noqa: E402
    PBS_CONFIG_SPACE,
    PBS_DEFAULT_CONFIG,
    default_config,
    device_tables,
    pbs_attention_triton,
    pbs_compile_args,
    pbs_configs,
    prune_pbs_configs,
)
from graphtune.codegen.registry import KernelConfig, get_impl  # noqa: E402
from graphtune.errors import KernelError, PlanError, ShapeError  # noqa: E402

from pbs_triton_cases import assert_close, dense_oracle, make_case, oracle, shuffle_segments  # noqa: E402

SMALL = KernelConfig.make(BLOCK_M=16, BLOCK_N=16)  # short interpreter loops, several tiles per PBS block

# (dtype, GQA group, kv heads, head dim) at PBS block 128, segment 256, 8K keys; SmolLM2 is G3 Hkv3 D64
COMPILE_CASES = [
    (torch.float16, 3, 3, 64),  # SmolLM2: 64x64 tiles
    (torch.bfloat16, 3, 3, 64),  # SmolLM2
    (torch.float16, 4, 8, 128),  # head dim 128, GQA 4: 64x32 tiles
    (torch.bfloat16, 4, 8, 128),
    (torch.float16, 2, 4, 256),  # head dim 256: 8 warps
    (torch.float32, 3, 3, 64),  # fp32: 16x32 FMA tiles, one stage
]


@pytest.mark.parametrize("arch", [80, 90])
def test_default_configs_cross_compile_without_spills(arch):
    # first in this module: the interpreter injects its globals into the kernel module when it
    # runs a kernel, after which compiling that module's kernels in the same process can fail
    from graphtune.codegen.crosscompile import compile_for_target

    for dtype, group, hkv, d in COMPILE_CASES:
        cfg = default_config(dtype, d, 128)
        fn, args, kwargs = pbs_compile_args(dtype, group, d, cfg, block=128, segment=256, num_kv_heads=hkv)
        res = compile_for_target(fn, args, kwargs, cfg, arch=arch, use_cache=False)
        where = (str(dtype), group, hkv, d, str(cfg))
        assert res.spill_bytes == 0, (where, res)
        assert res.registers <= 255 and res.shared_mem_bytes < 160 * 1024, (where, res)


def test_static_rank_of_the_registered_impl_on_meta_tensors():
    from graphtune.codegen.crosscompile import static_rank

    args = PBSShape(1, 9, 3, 64, 8192, dtype="bfloat16").meta_args()
    dflt = default_config(torch.bfloat16, 64, 128)
    assert dflt in pbs_configs(args)
    best_cfg, best_score, best_res = static_rank("triton.pbs", args, [dflt, PBS_DEFAULT_CONFIG], 90)[0]
    assert best_score > 0 and best_res.spill_bytes == 0 and best_res.kernel == "_pbs_attn_kernel"


# small problems, PBS block 16: one 16x16 tile per block, several segments, batch 2
CASES = {
    # GQA 3, whole prefill, N = 117: a partial last block in the last segment; head dim 24: masked lanes
    "gqa3_odd_n": dict(hq=3, hkv=1, n=117, d=24, segment=32),
    # MHA, the last 85 of 117 positions: the chunk starts at key 32, inside the first 48-key segment
    "mha_chunk": dict(hq=2, hkv=2, n=117, m=85, segment=48),
}


@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_fp32_matches_the_reference(name, tau, permute):
    qkv, plan = make_case(**CASES[name], tau=tau, permute=permute)
    assert (float(plan.density().mean()) < 1) == (tau < 1)  # tau 0.5 skips blocks: a sparse plan
    assert_close(pbs_attention_triton(*qkv, plan=plan), oracle(qkv, plan), torch.float32, f"{name} {tau} {permute}")


@pytest.mark.parametrize("bm, bn", [(16, 16), (16, 32), (32, 16), (32, 32)])
def test_triton_tiles_smaller_than_the_pbs_block(bm, bn):
    # block 32: a block is 1-2 tiles; BLOCK_N > BLOCK_M starts the causal tiles before the tile's first query
    qkv, plan = make_case(hq=6, hkv=2, n=150, m=118, block=32, segment=64, tau=0.5)
    cfg = KernelConfig.make(BLOCK_M=bm, BLOCK_N=bn)
    assert_close(pbs_attention_triton(*qkv, plan=plan, config=cfg), oracle(qkv, plan), torch.float32, str(cfg))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_within_dtype_tolerance(dtype):
    qkv, plan = make_case(hq=6, hkv=2, n=150, m=118, d=32, block=32, segment=64, tau=0.5, dtype=dtype)
    want = oracle(qkv, plan)
    for cfg in (None, SMALL):
        assert_close(pbs_attention_triton(*qkv, plan=plan, config=cfg), want, dtype, str(cfg))


def test_tau_one_is_dense_causal_attention_for_any_permutation():
    qkv, plan = make_case(hq=3, hkv=1, n=150, m=118, block=32, segment=64, tau=1.0)
    shuffle_segments(plan)
    assert not bool((plan.perm == torch.arange(150)).all())
    want = dense_oracle(qkv, 0.3)
    for cfg in (None, SMALL):
        assert_close(pbs_attention_triton(*qkv, scale=0.3, plan=plan, config=cfg), want, torch.float32, str(cfg))


def test_query_blocks_without_selected_blocks_and_garbage_past_the_count():
    qkv, plan = make_case(hq=3, hkv=1, n=117, tau=0.5)
    plan.kv_count[:, 1, -2] = 0  # one head's second-to-last query block: its own segment only
    plan.kv_count[0, :, 3] = 0
    assert int(plan.kv_count[:, 1, -2].sum()) == 0
    for bb, h, i in (plan.kv_count < plan.kv_index.shape[-1]).nonzero().tolist():
        plan.kv_index[bb, h, i, int(plan.kv_count[bb, h, i]):] = 2**20  # never read
    assert_close(pbs_attention_triton(*qkv, plan=plan), oracle(qkv, plan), torch.float32)


def test_one_plan_uploads_its_tables_once_for_every_layer():
    (q, k, v), plan = make_case(n=80, tau=0.5)
    tables = device_tables(plan, q.device)
    assert [t.dtype for t in tables] == [torch.int32] * 3
    for _ in range(2):  # two layers
        k, v = torch.randn_like(k), torch.randn_like(v)
        assert_close(pbs_attention_triton(q, k, v, plan=plan), oracle((q, k, v), plan), torch.float32)
    assert device_tables(plan, q.device) is tables


def test_triton_refuses_what_it_cannot_run():
    (q, k, v), plan = make_case(n=64, tau=0.5)
    with pytest.raises(ShapeError, match="dtype"):
        pbs_attention_triton(q.double(), k.double(), v.double(), plan=plan)
    with pytest.raises(ShapeError, match="unit stride"):
        pbs_attention_triton(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, plan=plan)
    with pytest.raises(PlanError, match="plan for"):
        pbs_attention_triton(q[:, :, 16:], k, v, plan=plan)
    with pytest.raises(PlanError, match="multiple of 16"):
        pbs_attention_triton(q, k, v, PBSConfig(block=8, segment=32))
    with pytest.raises(KernelError, match="dividing block 16"):
        pbs_attention_triton(q, k, v, plan=plan, config=KernelConfig.make(BLOCK_M=32, BLOCK_N=16))


def test_prune_keeps_dividing_tiles_and_the_default():
    kept = prune_pbs_configs(PBS_CONFIG_SPACE, m=4096, head_dim=128, dtype=torch.float16, block=32)
    assert kept and all(c["BLOCK_M"] <= 32 and c["BLOCK_N"] <= 32 for c in kept)
    fp32 = prune_pbs_configs(PBS_CONFIG_SPACE, m=4096, head_dim=64, dtype=torch.float32, block=128)
    assert fp32 and all(c.num_stages == 1 for c in fp32)
    for shape in PBSShape.examples() + (PBSShape(1, 9, 3, 64, 8192, dtype="float16"),):
        args = shape.meta_args()
        assert default_config(args[0].dtype, shape.head_dim, shape.block, shape.m) in pbs_configs(args)


def test_registered_impl_matches_the_reference_with_its_configs():
    impl = get_impl("pbs_attention", "triton.pbs")
    args = PBSShape(2, 6, 2, 16, 150, 118, block=32, segment=64, tau=0.8).make_args(0)
    assert impl.supports(args)
    q, k, v, pbs, _ = args
    plan = plan_pbs(q, k, pbs)
    assert 0 < float(plan.density().mean()) < 1
    want = pbs_attention_ref(q.double(), k.double(), v.double(), plan=plan)
    for cfg in (impl.default_config(args), SMALL):
        assert_close(impl.fn(*args, config=cfg), want, torch.float32, str(cfg))
