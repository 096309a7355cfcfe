"""Fused Triton suffix attention + merge (shared-prefix decode/append), in the interpreter, and
cross-compiled for sm_80/sm_90.

Tolerances: kernel and torch path both accumulate in fp32 (IEEE dots for fp32 inputs) and differ
by summation order: fp32 1e-5; bf16 outputs are rounded once more, 2e-2 vs the fp32 reference.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton.jit

import pytest  # noqa: E402
import torch  # noqa: E402

from graphtune.codegen.registry import KernelConfig  # noqa: E402
from graphtune.codegen.shared_prefix import Partial, Segment, merge_partials, shared_prefix_attention  # noqa: E402
from graphtune.codegen.shared_prefix import suffix_attention  # noqa: E402
from graphtune.codegen.shared_prefix_triton import (  # noqa: E402
    SUFFIX_MERGE_CONFIG_SPACE,
    SUFFIX_MERGE_DEFAULT_CONFIG,
    _suffix_merge_kernel,
    prune_suffix_merge_configs,
    suffix_merge,
    suffix_merge_compile_spec,
    suffix_merge_configs,
)
from graphtune.errors import KernelError, ShapeError  # noqa: E402
from graphtune.ir.reference import attention_ref  # noqa: E402


@pytest.mark.parametrize("arch", [80, 90])
def test_default_config_cross_compiles_without_spills(arch):
    # first in this module: once the interpreter has run a kernel, compiling it can fail
    from graphtune.codegen.crosscompile import compile_for_target

    meta = lambda *s: torch.empty(*s, dtype=torch.float16, device="meta")  # noqa: E731
    q, k = meta(8, 32, 1, 128), meta(8, 8, 64, 128)  # decode, GQA 4, head dim 128, fp16
    op_args = (q, k, k, torch.empty(8, dtype=torch.int32, device="meta"), q, meta(8, 32, 1), False)
    spec = suffix_merge_compile_spec(op_args, SUFFIX_MERGE_DEFAULT_CONFIG)
    res = compile_for_target(spec.fn, spec.args, spec.kwargs, SUFFIX_MERGE_DEFAULT_CONFIG, arch=arch,
                             use_cache=False)
    assert res.spill_bytes == 0, res
    assert res.registers <= 255 and res.shared_mem_bytes < 160 * 1024, res


def _torch_path(q, k, v, lens, prior, causal, gqa):
    parts = [suffix_attention(q, k, v, lens, None, causal, None, gqa)]
    if prior is not None:
        parts.insert(0, Partial(None, *prior))
    return merge_partials(q.shape[0], parts)


@pytest.mark.parametrize("G,Lq,D,with_prior,cfg", [
    (1, 1, 16, False, None),
    (3, 1, 24, True, None),  # odd head dim, GQA 3
    (2, 4, 32, True, KernelConfig.make(num_warps=2, num_stages=1, BLOCK_M=16, BLOCK_N=32)),  # append, causal
    (4, 5, 16, True, KernelConfig.make(num_warps=4, num_stages=1, BLOCK_M=32, BLOCK_N=32)),  # M spans 2 blocks
])
def test_fused_suffix_merge_matches_torch_suffix_then_merge(G, Lq, D, with_prior, cfg):
    B, Hkv, Ls = 3, 2, 70
    causal = Lq > 1
    q = torch.randn(B, Hkv * G, Lq, D)
    kk, vv = torch.randn(B, Hkv, Ls + 3, D), torch.randn(B, Hkv, Ls + 3, D)
    k, v = kk[:, :, 3:], vv[:, :, 3:]  # strided views, as on a cache slice
    lens = torch.tensor([70, Lq if causal else 0, 41])  # ragged; an empty suffix when not causal
    prior = None
    if with_prior:
        plse = torch.randn(B, Hkv * G, Lq) * 3
        plse[1, 0] = float("-inf")  # a row with no prefix keys
        po = torch.randn(B, Hkv * G, Lq, D).masked_fill(torch.isinf(plse)[..., None], 0.0)
        prior = (po, plse)
    out, lse = suffix_merge(q, k, v, lens, prior, causal, None, G > 1, config=cfg, fallback=False)
    ref_out, ref_lse = _torch_path(q, k, v, lens, prior, causal, G > 1)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_rows_without_any_key_get_zero_output_and_minus_inf_lse():
    q, k = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 8, 16)
    out, lse = suffix_merge(q, k, k, torch.tensor([0, 8]), fallback=False)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_decomposition_equals_attention_over_concatenated_kv(dtype, atol):
    B, Hkv, G, D = 4, 2, 2, 32
    segs = [Segment(None, torch.randn(Hkv, 40, D, dtype=dtype), torch.randn(Hkv, 40, D, dtype=dtype)),
            Segment(torch.tensor([3, 1]), torch.randn(Hkv, 17, D, dtype=dtype), torch.randn(Hkv, 17, D, dtype=dtype))]
    lens = torch.tensor([5, 2, 9, 1])
    sk, sv = torch.randn(B, Hkv, 9, D, dtype=dtype), torch.randn(B, Hkv, 9, D, dtype=dtype)
    q = torch.randn(B, Hkv * G, 1, D, dtype=dtype)
    out, _ = shared_prefix_attention(q, segs, sk, sv, suffix_lens=lens, causal=True, enable_gqa=True, fused=True)
    for b in range(B):
        ks = [segs[0].k] + ([segs[1].k] if b in (1, 3) else []) + [sk[b, :, : int(lens[b])]]
        vs = [segs[0].v] + ([segs[1].v] if b in (1, 3) else []) + [sv[b, :, : int(lens[b])]]
        ref, _ = attention_ref(q[b : b + 1], torch.cat(ks, 1)[None], torch.cat(vs, 1)[None], enable_gqa=True)
        torch.testing.assert_close(out[b : b + 1].float(), ref.float(), atol=atol, rtol=atol)


def test_config_pruning_keeps_the_default_and_fits_the_problem():
    q, k = torch.empty(2, 8, 1, 64), torch.empty(2, 2, 20, 64)
    cfgs = suffix_merge_configs((q, k, k))
    assert SUFFIX_MERGE_DEFAULT_CONFIG in cfgs
    pruned = prune_suffix_merge_configs(SUFFIX_MERGE_CONFIG_SPACE, rows=4, keys=20, head_dim=64)
    assert pruned and all(c["BLOCK_M"] == 16 and c["BLOCK_N"] == 32 and c.num_stages == 1 for c in pruned)
    assert prune_suffix_merge_configs([], 1, 1, 16) == [SUFFIX_MERGE_DEFAULT_CONFIG]


def test_bad_inputs_raise_and_kernel_failures_fall_back_with_a_warning():
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 8, 16)
    with pytest.raises(ShapeError, match="enable_gqa"):
        suffix_merge(q, k, k)
    with pytest.raises(ShapeError, match="prior"):
        suffix_merge(q, k, k, prior=(q, torch.zeros(2, 4)), enable_gqa=True)
    bad = KernelConfig.make(num_warps=4, num_stages=1, BLOCK_M=3, BLOCK_N=32)  # not a power of two
    with pytest.raises(KernelError):
        suffix_merge(q, k, k, enable_gqa=True, config=bad, fallback=False)
    with pytest.warns(RuntimeWarning, match="falling back"):
        out, _ = suffix_merge(q, k, k, enable_gqa=True, config=bad)
    torch.testing.assert_close(out, attention_ref(q, k, k, enable_gqa=True)[0], atol=1e-5, rtol=1e-5)
    assert _suffix_merge_kernel is not None


def test_run_dense_gpu_path_uses_the_fused_kernel_and_stays_exact(monkeypatch):
    import torch.nn.functional as F

    from graphtune.runtime import shared_prefix as sp

    plan = sp.SharedPrefixPlan(4, (sp.SharedSegment((0, 1, 2, 3), 0, 30), sp.SharedSegment((1, 2), 30, 35)))
    plan_one_suffix_start = sp.SharedPrefixPlan(4, (sp.SharedSegment((0, 1, 2, 3), 0, 30),))
    k, v = torch.randn(1, 2, 45, 16).repeat(4, 1, 1, 1), torch.randn(1, 2, 45, 16).repeat(4, 1, 1, 1)
    k[:, :, 30:] += torch.randn(4, 2, 15, 16)  # rows differ after the shared prompt...
    k[2, :, 30:35] = k[1, :, 30:35]  # ...except rows 1, 2 on [30, 35)
    q = torch.randn(4, 4, 1, 16)
    used = []
    real = sp._suffix_merge
    monkeypatch.setattr(sp, "fused_available", lambda *a: True)  # as on CUDA
    monkeypatch.setattr(sp, "_suffix_merge", lambda *a: used.append(1) or real(*a))
    for p in (plan, plan_one_suffix_start):
        out, _ = sp.run_dense(p, q, k, v, enable_gqa=True)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-5, rtol=1e-5)
    assert used == [1]  # only the plan whose rows' suffixes all start at one key takes the fused path
