"""Fused Triton suffix attention + merge (shared-prefix decode/append), in the interpreter, and
cross-compiled for sm_80/sm_90.

Tolerances: kernel and torch path both accumulate in fp32 (IEEE dots for fp32 inputs) and differ
by summation order: fp32 1e-5; bf16 outputs are rounded once more, 2e-2 vs the fp32 reference.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton.jit

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graphtune.codegen.registry import KernelConfig  # noqa: E402
from graphtune.codegen.shared_prefix.decompose import Partial, Segment, merge_partials, shared_prefix_attention  # noqa: E402
from graphtune.codegen.shared_prefix.decompose import suffix_attention  # noqa: E402
from graphtune.codegen.shared_prefix.triton_kernels import (  # noqa: E402
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
    op_args = (q, k, k, torch.empty(8, dtype=torch.int32, device="meta"), q, meta(8, 32, 1), None, False)
    spec = suffix_merge_compile_spec(op_args, SUFFIX_MERGE_DEFAULT_CONFIG)
    res = compile_for_target(spec.fn, spec.args, spec.kwargs, SUFFIX_MERGE_DEFAULT_CONFIG, arch=arch,
                             use_cache=False)
    assert res.spill_bytes == 0, res
    assert res.registers <= 255 and res.shared_mem_bytes < 160 * 1024, res


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float16])
def test_masked_variant_cross_compiles_without_spills(mask_dtype):
    from graphtune.codegen.crosscompile import compile_for_target

    meta = lambda *s, dt=torch.float16: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    q, k = meta(8, 32, 4, 128), meta(8, 8, 64, 128)  # append of 4 tokens, GQA 4, head dim 128
    op_args = (q, k, k, torch.empty(8, dtype=torch.int32, device="meta"), q, meta(8, 32, 4),
               meta(1, 1, 4, 64, dt=mask_dtype), True)
    spec = suffix_merge_compile_spec(op_args, SUFFIX_MERGE_DEFAULT_CONFIG)
    assert spec.kwargs["MASK_KIND"] == (1 if mask_dtype == torch.bool else 2)
    res = compile_for_target(spec.fn, spec.args, spec.kwargs, SUFFIX_MERGE_DEFAULT_CONFIG, arch=90, use_cache=False)
    assert res.spill_bytes == 0, res


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
    out, lse = suffix_merge(q, k, v, lens, prior, None, causal, None, G > 1, config=cfg, fallback=False)
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
    out, _ = shared_prefix_attention(q, segs, sk, sv, suffix_lens=lens, is_causal=True, enable_gqa=True, fused=True)
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


def _suffix_masks(B, Hq, Lq, Ls, dtype):
    bool_rows = torch.rand(B, 1, Lq, Ls) > 0.4
    bool_rows[0, :, 0] = False  # row 0, query 0: no suffix key at all (the prefix still counts)
    bias = torch.randn(1, Hq, Lq, Ls, dtype=dtype)
    bias[..., 1::3] = float("-inf")
    return {"bool [B,1,Lq,Ls]": bool_rows, "additive [1,Hq,Lq,Ls]": bias,
            "bool [Lq,Ls]": torch.rand(Lq, Ls) > 0.5, "additive [B,1,1,Ls]": torch.randn(B, 1, 1, Ls, dtype=dtype),
            "bool [1,1,Lq,1]": torch.tensor([True, False] * Lq)[:Lq].view(1, 1, Lq, 1)}


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("Lq,causal", [(1, False), (3, True)])
def test_fused_path_honours_the_suffix_mask(dtype, atol, Lq, causal):
    # fused=True once ignored suffix_mask silently; it must equal the torch decomposition and the
    # fp32 reference over the concatenated keys, fully masked suffix rows included
    B, Hkv, G, D, Ls = 3, 2, 2, 16, 11
    segs = [Segment(None, torch.randn(Hkv, 20, D, dtype=dtype), torch.randn(Hkv, 20, D, dtype=dtype)),
            Segment(torch.tensor([2]), torch.randn(Hkv, 7, D, dtype=dtype), torch.randn(Hkv, 7, D, dtype=dtype))]
    lens = torch.tensor([11, 4, 9])
    sk, sv = torch.randn(B, Hkv, Ls, D, dtype=dtype), torch.randn(B, Hkv, Ls, D, dtype=dtype)
    q = torch.randn(B, Hkv * G, Lq, D, dtype=dtype)
    for name, m in _suffix_masks(B, Hkv * G, Lq, Ls, dtype).items():
        kw = dict(suffix_lens=lens, suffix_mask=m, is_causal=causal, enable_gqa=True)
        out, lse = shared_prefix_attention(q, segs, sk, sv, fused=True, **kw)
        t_out, t_lse = shared_prefix_attention(q, segs, sk, sv, fused=False, **kw)
        torch.testing.assert_close(out.float(), t_out.float(), atol=atol, rtol=atol, msg=name)
        torch.testing.assert_close(lse, t_lse, atol=atol, rtol=atol, msg=name)
        m4 = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).expand(B, Hkv * G, Lq, Ls)
        for b in range(B):  # reference: attention over prefix + suffix keys with one mask
            n = int(lens[b])
            pre = [s for s in segs if s.rows is None or b in s.rows.tolist()]
            ks = torch.cat([s.k for s in pre] + [sk[b, :, :n]], 1)[None]
            vs = torch.cat([s.v for s in pre] + [sv[b, :, :n]], 1)[None]
            P = ks.shape[2] - n
            sm = m4[b : b + 1, :, :, :n]
            if sm.dtype == torch.bool:
                full = torch.cat([torch.ones(1, Hkv * G, Lq, P, dtype=torch.bool), sm], -1)
                if causal:
                    full = full & torch.ones(Lq, P + n, dtype=torch.bool).tril(P + n - Lq)
            else:
                full = torch.cat([torch.zeros(1, Hkv * G, Lq, P, dtype=dtype), sm], -1)
                if causal:
                    full = full.masked_fill(~torch.ones(Lq, P + n, dtype=torch.bool).tril(P + n - Lq), float("-inf"))
            ro, rl = attention_ref(q[b : b + 1], ks, vs, full, enable_gqa=True)
            torch.testing.assert_close(out[b : b + 1].float(), ro.float(), atol=atol, rtol=atol, msg=f"{name} row {b}")
            torch.testing.assert_close(lse[b : b + 1], rl, atol=atol, rtol=atol, msg=f"{name} row {b}")


def test_suffix_merge_masked_rows_without_prior_get_zero_output_and_minus_inf_lse():
    q, k = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 6, 16)
    m = torch.ones(2, 1, 2, 6, dtype=torch.bool)
    m[1, :, 0] = False  # row 1, query 0 sees no key
    out, lse = suffix_merge(q, k, k, attn_mask=m, fallback=False)
    ro, rl = attention_ref(q, k, k, m)
    assert (out[1, :, 0] == 0).all() and torch.isneginf(lse[1, :, 0]).all()
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)


def test_suffix_masks_that_do_not_broadcast_raise_shape_error_on_both_paths():
    q, k = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 6, 16)
    for fused in (True, False):
        with pytest.raises(ShapeError, match="mask"):
            shared_prefix_attention(q, [], k, k, suffix_mask=torch.ones(2, 1, 1, 5, dtype=torch.bool), fused=fused)
    with pytest.raises(ShapeError, match="mask"):
        suffix_merge(q, k, k, attn_mask=torch.ones(3, 1, 1, 6, dtype=torch.bool))


def test_fused_is_the_default_on_cuda_with_a_suffix_mask_too():
    from types import SimpleNamespace

    from graphtune.codegen.shared_prefix import decompose as sp

    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    assert not sp.fused_available(torch.empty(1, 2, 1, 16), mask)  # CPU: only when forced
    on_cuda = SimpleNamespace(device=torch.device("cuda"))  # stands in for a CUDA query tensor
    assert sp.fused_available(on_cuda, None) and sp.fused_available(on_cuda, mask, passes_mask=True)
    assert not sp.fused_available(on_cuda, mask)  # a caller that would not pass the mask never gets the kernel


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_suffix_merge_rows_at_one_finite_fill_average_like_sdpa(dtype, atol):
    # An additive mask at finfo.min once overflowed to -inf in the kernel's log2 domain, making the
    # row "empty" (0) where SDPA averages every value uniformly.
    q, k, v = (torch.randn(2, 2, 3, 16, dtype=dtype) for _ in range(3))
    m = torch.zeros(2, 1, 3, 3, dtype=dtype)
    m[1, :, 0] = torch.finfo(dtype).min  # row 1, query 0: every key at the fill
    m[0, :, 2, :2] = torch.finfo(dtype).min  # a partly masked row
    out, lse = suffix_merge(q, k, v, attn_mask=m, fallback=False)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(out[1, :, 0].float(), v[1, :, :].float().mean(-2), atol=atol, rtol=atol)
    assert torch.isfinite(lse).all()


def test_op_arguments_keep_the_attention_order_and_the_reference_takes_them():
    # (q, k, v, <lens, prior_out, prior_lse>, attn_mask, is_causal, scale, enable_gqa): the impl and the
    # family's torch reference take the same tuple
    import inspect

    from graphtune.codegen.shared_prefix.decompose import suffix_merge_ref
    from graphtune.codegen.shared_prefix.triton_kernels import SUFFIX_MERGE_IMPL

    names = ["q", "k", "v", "lens", "prior_out", "prior_lse", "attn_mask", "is_causal", "scale", "enable_gqa"]
    assert list(inspect.signature(SUFFIX_MERGE_IMPL.fn).parameters)[:10] == names
    assert list(inspect.signature(suffix_merge_ref).parameters)[:10] == names
    assert list(inspect.signature(suffix_merge).parameters)[:9] == ["q", "k", "v", "lens", "prior", *names[6:]]
    q, k, v = torch.randn(2, 4, 2, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    prior = (torch.randn(2, 4, 2, 16), torch.randn(2, 4, 2))
    m = torch.rand(2, 1, 2, 6) > 0.3
    args = (q, k, v, torch.tensor([6, 4]), *prior, m, True, 0.3, True)
    assert SUFFIX_MERGE_IMPL.supports(args) and not SUFFIX_MERGE_IMPL.supports(args[:9] + (False,))
    want = suffix_merge_ref(*args)
    got = SUFFIX_MERGE_IMPL.fn(*args, config=SUFFIX_MERGE_DEFAULT_CONFIG)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
