"""Lean decode Triton kernels (stream-K partial attention + reduction) in the interpreter, and the
default config cross-compiled for sm_80/sm_90 without spills.

Tolerances (out atol, lse atol), as for graphtune's attention kernel: fp32 dots are IEEE
(``input_precision="ieee"``), only summation order differs -> 2e-5; fp16 rounds P before P@V and
the output to fp16 -> 2e-3; bf16 likewise with 8 mantissa bits -> 2e-2. LSE is fp32 throughout.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton.jit

import pytest  # noqa: E402
import torch  # noqa: E402

from graphtune.codegen.lean_decode.triton_kernels import (  # noqa: E402
    LEAN_CONFIG_SPACE,
    LEAN_DEFAULT_CONFIG,
    build_tables,
    lean_attention_triton,
    lean_compile_args,
    prune_lean_configs,
)
from graphtune.codegen.registry import KernelConfig  # noqa: E402
from graphtune.errors import PlanError, ShapeError  # noqa: E402
from graphtune.ir.reference import attention_ref  # noqa: E402
from graphtune.codegen.lean_decode.plan import make_plan  # noqa: E402

LENGTHS = [70, 1, 33, 5]  # ragged, one length-1 row
SMALL = KernelConfig.make(BLOCK_N=16)  # keeps interpreter loops short


def _case(lq, group, d, dtype, pad=3):
    S = max(LENGTHS) + pad
    q = torch.randn(len(LENGTHS), 2 * group, lq, d, dtype=dtype)
    k = torch.randn(len(LENGTHS), 2, S, d, dtype=dtype)
    v = torch.randn(len(LENGTHS), 2, S, d, dtype=dtype)
    starts = [S - n for n in LENGTHS]
    return q, k, v, starts


def _reference(q, k, v, starts, causal):
    outs, lses = zip(*(attention_ref(q[b:b + 1], k[b:b + 1, :, s:s + n], v[b:b + 1, :, s:s + n], is_causal=causal,
                                     enable_gqa=True, bottom_right=True)
                       for b, (s, n) in enumerate(zip(starts, LENGTHS))))
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("arch", [80, 90])
def test_default_config_cross_compiles_without_spills(arch):
    # first in this module: the interpreter injects its globals into the kernel module when it
    # runs a kernel, after which compiling that module's kernels in the same process can fail
    from graphtune.codegen.crosscompile import compile_for_target

    # decode with GQA 4 at head dim 128 in fp16: the common serving case
    for name, (fn, args, kwargs) in lean_compile_args(torch.float16, 4, 1, 128, LEAN_DEFAULT_CONFIG).items():
        if name == "reduce" and arch == 80:
            continue  # the 56-register reduction is checked on sm_90 only, to save compile time
        cfg = LEAN_DEFAULT_CONFIG if name == "partial" else KernelConfig.make(num_warps=4, num_stages=1)
        res = compile_for_target(fn, args, kwargs, cfg, arch=arch, use_cache=False)
        assert res.spill_bytes == 0, (name, res)
        assert res.registers <= 255 and res.shared_mem_bytes < 160 * 1024, (name, res)


@pytest.mark.parametrize("tile, workers", [(16, 1), (16, 3), (32, 5), (16, 40)])
def test_lean_triton_fp32_matches_unsplit_attention_for_tiles_and_workers(tile, workers):
    q, k, v, starts = _case(lq=1, group=3, d=24, dtype=torch.float32)  # odd head dim, GQA 3
    plan = make_plan(LENGTHS, 2, tile, workers)
    o, l = lean_attention_triton(q, k, v, plan, starts, config=SMALL)
    ref_o, ref_l = _reference(q, k, v, starts, False)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(l, ref_l, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_lean_triton_q_len_4_bottom_right_causal_gqa(dtype, atol):
    q, k, v, starts = _case(lq=4, group=2, d=16, dtype=dtype)
    plan = make_plan(LENGTHS, 2, 16, 4)
    o, l = lean_attention_triton(q, k, v, plan, starts, is_causal=True, config=SMALL)
    ref_o, ref_l = _reference(q, k, v, starts, True)
    assert o.dtype == dtype
    torch.testing.assert_close(o.float(), ref_o.float(), atol=atol, rtol=0)
    torch.testing.assert_close(l, ref_l, atol=1e-4, rtol=0)
    # the length-1 row: queries 0..2 see no key -> out 0, lse -inf (merge_states convention)
    assert torch.all(l[1, :, :3] == float("-inf")) and torch.all(o[1, :, :3] == 0)


def test_lean_triton_reuses_tables_across_layers():
    q, k, v, starts = _case(lq=1, group=1, d=16, dtype=torch.float32)
    plan = make_plan(LENGTHS, 2, 32, 3)
    tables = build_tables(plan, starts, q.device)
    assert tables.num_red == len(plan.split_outputs) > 0
    for _ in range(2):  # two "layers", one plan
        k, v = torch.randn_like(k), torch.randn_like(v)
        o, _ = lean_attention_triton(q, k, v, plan, starts, tables=tables, config=SMALL)
        torch.testing.assert_close(o, _reference(q, k, v, starts, False)[0], atol=2e-5, rtol=2e-5)


def test_lean_triton_rejects_mismatched_plan_and_shapes():
    q, k, v, starts = _case(lq=1, group=1, d=16, dtype=torch.float32)
    with pytest.raises(PlanError, match="does not fit"):
        lean_attention_triton(q, k, v, make_plan(LENGTHS, 1, 16, 2), starts)
    with pytest.raises(PlanError, match="exceed"):
        lean_attention_triton(q, k, v, make_plan(LENGTHS, 2, 16, 2), [100] * 4)
    with pytest.raises(ShapeError, match="ranks"):
        lean_attention_triton(q[0], k, v, make_plan(LENGTHS, 2, 16, 2), starts)


def test_prune_keeps_block_n_dividing_the_tile_and_never_empties():
    kept = prune_lean_configs(LEAN_CONFIG_SPACE, rows=4, head_dim=128, dtype=torch.float16, tile=128)
    assert kept and all(128 % c["BLOCK_N"] == 0 for c in kept)
    assert LEAN_DEFAULT_CONFIG in kept
    assert prune_lean_configs(LEAN_CONFIG_SPACE, rows=4, head_dim=128, dtype=torch.float16, tile=7) == [LEAN_DEFAULT_CONFIG]


@pytest.mark.parametrize("pad", ["right", "both"])
def test_lean_triton_reads_only_keys_from_start_to_start_plus_length(pad):
    # right padding: keys at j >= start + len are padding; made huge so that reading one shows
    q, k, v, _ = _case(lq=1, group=2, d=16, dtype=torch.float32)
    S = k.shape[2]
    starts = [0] * len(LENGTHS) if pad == "right" else [1, 40, 2, S - 5 - 1]
    j = torch.arange(S)
    for b, (s, n) in enumerate(zip(starts, LENGTHS)):
        outside = (j < s) | (j >= s + n)
        k[b, :, outside] = 1e4
        v[b, :, outside] = float("nan")
    o, l = lean_attention_triton(q, k, v, make_plan(LENGTHS, 2, 16, 3), starts, config=SMALL)
    ref_o, ref_l = _reference(q, k, v, starts, False)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(l, ref_l, atol=2e-5, rtol=2e-5)



# ----------------------------------------------------------------------------------------------
# Implementation "triton.lean_decode" of op "lean_decode" (the op arguments of cpu.lean)
# ----------------------------------------------------------------------------------------------

def _op_args(lengths, lq, dtype, mask_kind, causal):
    """Attention's op arguments for a left-padded ragged batch: the mask allows each row's real keys
    (bottom-right causal among them if ``causal``), bool or additive with finfo.min (HF's)."""
    B, S = len(lengths), max(lengths) + 3
    q = torch.randn(B, 4, lq, 16, dtype=dtype)
    k, v = torch.randn(B, 2, S, 16, dtype=dtype), torch.randn(B, 2, S, 16, dtype=dtype)
    n = torch.tensor(lengths)[:, None, None, None]
    start = S - n
    j = torch.arange(S)
    allowed = ((j >= start) & (j < start + n)).expand(B, 1, lq, S)
    if causal:
        allowed = allowed & (j - start <= n - lq + torch.arange(lq)[:, None])
    if mask_kind == "bool":
        return (q, k, v, allowed, False, None, True)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return (q, k, v, mask, False, None, True)


@pytest.mark.parametrize("dtype, atol, lengths, lq, mask_kind, causal", [
    (torch.float32, 2e-5, LENGTHS, 1, "bool", False),
    (torch.float16, 2e-3, LENGTHS, 1, "additive", False),
    (torch.bfloat16, 2e-2, [70, 4, 33, 5], 4, "bool", True),  # causal decode masks need lengths >= q_len
])
def test_registered_impl_matches_the_reference_on_a_ragged_batch(dtype, atol, lengths, lq, mask_kind, causal):
    from graphtune.codegen.registry import get_impl, impls_for

    impl = get_impl("lean_decode", "triton.lean_decode")
    assert impl is not None and impl in impls_for("lean_decode", "cuda")
    args = _op_args(lengths, lq, dtype, mask_kind, causal)
    assert impl.supports(args)
    assert LEAN_DEFAULT_CONFIG in impl.configs(args)
    ref_o, ref_l = attention_ref(*args)
    for cfg in (impl.default, SMALL):
        o, l = impl.fn(*args, config=cfg)
        assert o.dtype == dtype
        torch.testing.assert_close(o.float(), ref_o.float(), atol=atol, rtol=0)
        torch.testing.assert_close(l, ref_l, atol=1e-4, rtol=0)


def test_registered_impl_declines_and_rejects_what_lean_decode_does_not_serve():
    from graphtune.codegen.registry import get_impl

    impl = get_impl("lean_decode", "triton.lean_decode")
    q, k, v, mask, _, scale, gqa = _op_args(LENGTHS, 1, torch.float32, "bool", False)
    assert not impl.supports((q, k, v, mask, True, scale, gqa))  # top-left is_causal is no decode mask
    assert not impl.supports((q, k, v, mask, False, scale, False))  # GQA without enable_gqa
    assert not impl.supports((q.double(), k.double(), v.double(), mask, False, scale, gqa))
    with pytest.raises(ShapeError, match="not a decode call"):
        impl.fn(q, k, v, mask, True, scale, gqa, config=LEAN_DEFAULT_CONFIG)
    bias = torch.randn(mask.shape)  # an additive bias, not a padding mask
    with pytest.raises(ShapeError, match="bias"):
        impl.fn(q, k, v, bias, False, scale, gqa, config=LEAN_DEFAULT_CONFIG)


def test_static_rank_of_the_registered_impl_on_meta_tensors():
    from graphtune.codegen.crosscompile import static_rank

    meta = lambda *s, dt=torch.float16: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    args = (meta(4, 8, 1, 16), meta(4, 2, 600, 16), meta(4, 2, 600, 16), meta(4, 1, 1, 600, dt=torch.bool),
            False, None, True)
    ranked = static_rank("triton.lean_decode", args, None, 80)
    assert len(ranked) == len(prune_lean_configs(LEAN_CONFIG_SPACE, 4, 16, torch.float16, 256))
    best_cfg, best_score, best_res = ranked[0]
    assert best_score > 0 and best_res.spill_bytes == 0 and best_res.kernel == "_lean_partial_kernel"
    assert [s for _, s, _ in ranked] == sorted((s for _, s, _ in ranked), reverse=True)
