"""Triton attention forward (+LSE) against graphtune.ir.reference.attention_ref, in the interpreter.

Tolerances, per dtype (out atol/rtol, lse atol):
* fp32: the kernel's dots are IEEE fp32 (``input_precision="ieee"``) like the reference's
  matmuls; only summation order differs (~1e-6 at these sizes), so 2e-5.
* fp16: the kernel rounds P to fp16 before P@V (as FlashAttention does on tensor cores) while the
  reference keeps P fp32: relative error ~2^-11 per term plus one fp16 output ulp (2^-10 at |o|~1),
  so 2e-3. LSE is computed in fp32 from exactly-representable products, so 1e-4.
* bf16: same with 8 mantissa bits: P rounding ~2^-8 plus a bf16 ulp (2^-7 at |o|~1), so 2e-2.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton.jit

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from graphtune.codegen import registry  # noqa: E402
from graphtune.codegen.attention.triton_kernels import (  # noqa: E402
    ATTN_CONFIG_SPACE,
    ATTN_DEFAULT_CONFIG,
    AttnProblem,
    attention_configs,
    attention_default_config,
    attention_fwd,
)
from graphtune.errors import KernelError, ShapeError  # noqa: E402
from graphtune.ir.reference import attention_ref  # noqa: E402

TOL = {  # dtype: (out atol, out rtol, lse atol)
    torch.float32: (2e-5, 2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3, 1e-4),
    torch.bfloat16: (2e-2, 2e-2, 1e-4),
}


def _qkv(B, Hq, Hkv, L, S, D, dtype=torch.float32, Dv=None):
    q = torch.randn(B, Hq, L, D).to(dtype)
    k = torch.randn(B, Hkv, S, D).to(dtype)
    v = torch.randn(B, Hkv, S, Dv or D).to(dtype)
    return q, k, v


def _check(q, k, v, mask=None, causal=False, bottom_right=False, scale=None, config=None):
    gqa = q.dim() >= 3 and q.shape[-3] != k.shape[-3]
    out, lse = attention_fwd(q, k, v, mask, causal, scale, gqa, causal_bottom_right=bottom_right, config=config)
    ref_out, ref_lse = attention_ref(q, k, v, mask, causal, scale, gqa, bottom_right=bottom_right)
    atol, rtol, lse_atol = TOL[q.dtype]
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    # -inf exactly where the reference has it (rows that see no key), close elsewhere
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=lse_atol, rtol=1e-5)
    return out, lse


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("L,S", [(1, 1), (17, 17), (17, 129), (129, 17), (5, 64)])
def test_matches_reference_on_odd_lengths(L, S, causal):
    q, k, v = _qkv(1, 2, 2, L, S, 16)
    _check(q, k, v, causal=causal != "none", bottom_right=causal == "bottom_right")


@pytest.mark.parametrize("S", [1, 2, 31, 64, 129, 300])
def test_decode_q_len_1_with_gqa_folds_group_into_rows(S):
    q, k, v = _qkv(2, 8, 2, 1, S, 32)
    _check(q, k, v, causal=True, bottom_right=True, config=attention_default_config((q, k, v, None, True, None, True)))


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bottom_right", [False, True])
def test_gqa_groups_causal_prefill_and_append(group, bottom_right):
    q, k, v = _qkv(1, 2 * group, 2, 13, 37, 16)
    _check(q, k, v, causal=True, bottom_right=bottom_right, config=registry.KernelConfig.make(BLOCK_M=16, BLOCK_N=32))


def test_bottom_right_rows_before_first_key_are_empty():
    # L > S bottom-right: the first L - S queries see no key -> out 0, lse -inf
    q, k, v = _qkv(1, 2, 2, 9, 4, 16)
    out, lse = _check(q, k, v, causal=True, bottom_right=True)
    assert torch.isneginf(lse[..., :5]).all() and (out[..., :5, :] == 0).all()
    assert torch.isfinite(lse[..., 5:]).all()


def test_zero_keys_gives_zero_out_and_neg_inf_lse():
    q, k, v = _qkv(1, 2, 2, 3, 0, 16)
    out, lse = attention_fwd(q, k, v)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("kind", ["float_full", "bool_full", "bool_2d_broadcast", "float_key_padding", "bool_with_causal"])
def test_masks_additive_bool_and_broadcast(kind):
    B, H, L, S = 2, 2, 11, 23
    q, k, v = _qkv(B, H, H, L, S, 16)
    causal = kind == "bool_with_causal"
    if kind == "float_full":
        mask = torch.randn(B, H, L, S)
        mask[0, 1, 3] = float("-inf")  # a fully masked row
    elif kind in ("bool_full", "bool_with_causal"):
        mask = torch.rand(B, H, L, S) > 0.4
        mask[1, 0, 2] = False
    elif kind == "bool_2d_broadcast":
        mask = torch.rand(L, S) > 0.5
    else:  # [B, 1, 1, S] padding mask, as HF builds it
        mask = torch.zeros(B, 1, 1, S)
        mask[0, ..., 15:] = float("-inf")
    out, lse = _check(q, k, v, mask=mask, causal=causal)
    if kind == "float_full":
        assert torch.isneginf(lse[0, 1, 3]) and (out[0, 1, 3] == 0).all()


@pytest.mark.parametrize("D", [16, 64, 128, 256, 80, 96])
def test_head_dims_powers_of_two_and_padded(D):
    q, k, v = _qkv(1, 2, 1, 7, 19, D, dtype=torch.float16)
    _check(q, k, v, causal=True, bottom_right=True)


def test_value_head_dim_differs_from_query_head_dim():
    q, k, v = _qkv(1, 2, 2, 9, 21, 32, Dv=48)
    _check(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 17, 45, 64), (1, 8, 2, 1, 130, 128)])
def test_half_precision_dtypes(dtype, shape):
    q, k, v = _qkv(*shape, dtype=dtype)
    _check(q, k, v, causal=True, bottom_right=True)


def test_non_contiguous_inputs_use_strides():
    # HF layout [B, L, H, D] transposed to [B, H, L, D]: no copy, strides passed to the kernel
    B, L, S, H, D = 2, 13, 29, 2, 16
    q = torch.randn(B, L, H, D).transpose(1, 2)
    k = torch.randn(B, S, H, D).transpose(1, 2)
    v = torch.randn(B, H, D, S).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, causal=True)


@pytest.mark.parametrize("rank", [2, 3, 5])
def test_ranks_other_than_4(rank):
    shape = {2: (), 3: (), 5: (2, 1)}[rank]
    heads = () if rank == 2 else (2,)
    q = torch.randn(*shape, *heads, 9, 16)
    k = torch.randn(*shape, *heads, 14, 16)
    v = torch.randn(*shape, *heads, 14, 16)
    _check(q, k, v, causal=True)


def test_explicit_scale():
    q, k, v = _qkv(1, 2, 2, 5, 9, 16)
    _check(q, k, v, scale=0.3)


def test_every_config_any_problem_can_get_runs_and_matches():
    # union of the pruned spaces over representative problems (meta tensors: shapes only) ...
    union = set()
    for dtype in (torch.float16, torch.float32):
        for D in (16, 64, 128, 256):
            for L, S, hq in ((1, 4096, 32), (512, 512, 8), (4096, 4096, 8)):
                q = torch.empty(1, hq, L, D, dtype=dtype, device="meta")
                kv = torch.empty(1, 8, S, D, dtype=dtype, device="meta")
                union.update(attention_configs((q, kv, kv, None, True, None, hq != 8)))
    assert union == set(ATTN_CONFIG_SPACE)  # no dead configs in the space
    # ... each run once on a small odd shape (rows = 2 * 40 > 64 and S = 70 > 64 exercise every tile)
    q, k, v = _qkv(1, 2, 1, 40, 70, 16, dtype=torch.float16)
    for cfg in sorted(union, key=str):
        _check(q, k, v, causal=True, bottom_right=True, config=cfg)


def test_prune_drops_large_row_tiles_for_decode_and_never_empties():
    p = AttnProblem(batch=8, hq=8, hkv=8, q_len=1, kv_len=4096, head_dim=128, head_dim_v=128,
                    dtype=torch.float16, mask_kind=0, is_causal=False)
    q = torch.empty(8, 8, 1, 128, dtype=torch.float16, device="meta")
    kv = torch.empty(8, 8, 4096, 128, dtype=torch.float16, device="meta")
    assert AttnProblem.from_args((q, kv, kv)) == p
    configs = attention_configs((q, kv, kv, None, False, None, False))
    assert configs and all(c["BLOCK_M"] == 16 for c in configs)
    assert all(c in ATTN_CONFIG_SPACE for c in configs)


def test_default_config_is_in_the_space_and_adapts_to_problem():
    q = torch.empty(1, 8, 1, 128, dtype=torch.float16, device="meta")
    kv = torch.empty(1, 8, 512, 128, dtype=torch.float16, device="meta")
    assert ATTN_DEFAULT_CONFIG in ATTN_CONFIG_SPACE
    assert attention_default_config((q, kv, kv, None, False, None, False))["BLOCK_M"] == 16
    q256 = torch.empty(1, 8, 512, 256, dtype=torch.float16, device="meta")
    assert attention_default_config((q256, q256, q256)) in ATTN_CONFIG_SPACE


def test_registered_impl_takes_the_op_argument_tuple():
    impl = registry.get_impl("attention_with_lse", "triton.attention_fwd")
    assert impl is not None and impl.device == "cuda" and len(impl.source_hash) == 16
    q, k, v = _qkv(1, 4, 2, 6, 10, 16)
    args = (q, k, v, None, True, None, True)
    assert impl.supports(args)
    out, lse = impl.fn(*args, config=impl.configs(args)[0])
    ref_out, ref_lse = attention_ref(*args)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert not impl.supports((q.double(), k.double(), v.double(), None, False, None, True))


def test_bad_inputs_raise_errors_naming_the_problem():
    q, k, v = _qkv(1, 2, 2, 4, 4, 16)
    with pytest.raises(ShapeError, match="dtype"):
        attention_fwd(q.double(), k.double(), v.double())
    big = torch.randn(1, 1, 2, 512)
    with pytest.raises(ShapeError, match="head dims"):
        attention_fwd(big, big, big)
    with pytest.raises(ShapeError, match="broadcast"):
        attention_fwd(q, k, v, torch.zeros(3, 4, 4))
    with pytest.raises(ShapeError, match="enable_gqa"):
        attention_fwd(torch.randn(1, 4, 4, 16), k, v)


def test_kernel_failure_warns_and_falls_back_to_reference_unless_told_not_to(monkeypatch):
    # no CUDA and no interpreter: the kernel cannot run
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    q, k, v = _qkv(1, 2, 2, 4, 6, 16)
    with pytest.warns(RuntimeWarning, match="falling back"):
        out, lse = attention_fwd(q, k, v, is_causal=True, causal_bottom_right=True)
    ref_out, ref_lse = attention_ref(q, k, v, None, True, bottom_right=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(KernelError, match="CUDA"):
        attention_fwd(q, k, v, fallback=False)
    impl = registry.get_impl("attention_with_lse", "triton.attention_fwd")
    with pytest.raises(KernelError):  # the registered fn never hides a failure from the tuner
        impl.fn(q, k, v, None, False, None, False, config=ATTN_DEFAULT_CONFIG)


def test_invalid_config_is_rejected():
    q, k, v = _qkv(1, 2, 2, 4, 6, 16)
    with pytest.raises(KernelError, match="power-of-two"):
        attention_fwd(q, k, v, config=registry.KernelConfig.make(BLOCK_M=24, BLOCK_N=32))


@pytest.mark.parametrize("qs,ks,gqa", [
    ((2, 4, 3, 16), (1, 2, 7, 16), True),  # q batch 2 over k/v batch 1 (once read out of bounds)
    ((1, 2, 3, 16), (2, 2, 7, 16), False),  # k/v batch 2: the output has batch 2, as in SDPA
    ((2, 3, 16), (2, 2, 7, 16), False),  # rank-3 q with rank-4 k/v
    ((3, 2, 2, 3, 16), (1, 2, 2, 7, 16), False),  # rank 5, broadcast leading dim
])
def test_batch_dims_broadcast_like_sdpa(qs, ks, gqa):
    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(ks)
    mask = torch.rand(3, 7) > 0.3
    mask[:, 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    out, lse = attention_fwd(q, k, v, mask, enable_gqa=gqa)
    assert out.shape == want.shape and lse.shape == want.shape[:-1]
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, attention_ref(q, k, v, mask, enable_gqa=gqa)[1], atol=2e-5, rtol=2e-5)


def test_rows_emptied_by_mask_and_causality_together_are_empty():
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    m = torch.tensor([[False, False, True]] * 3)  # with top-left causal, rows 0 and 1 see nothing
    out, lse = _check(q, k, k, m, causal=True)
    assert torch.isneginf(lse[..., :2]).all() and (out[..., :2, :] == 0).all()


def _lse64(q, k, mask, scale=None):
    # fp64 LSE of the scores plus the (rounded) additive mask, cast to fp32: a row of one huge finite
    # fill f has lse = f + max(s) + log(n), which rounds to f itself in fp32
    qd, kd = q.double(), k.double().repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = (qd @ kd.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return torch.logsumexp(s + mask.double(), dim=-1).float()


def _fill_rows_problem(dtype, fill, S=257, L=3):
    # batch 0: row 1 at the fill for every key; batch 1: rows 0 and 2, and row 1 with a few fill keys
    f = torch.finfo(dtype).min if fill == "min" else fill
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, L, 16, generator=g).to(dtype)
    k, v = torch.randn(2, 2, S, 16, generator=g).to(dtype), torch.randn(2, 2, S, 16, generator=g).to(dtype)
    m = torch.randn(2, 1, L, S, generator=g).to(dtype)
    m[0, :, 1] = f
    m[1, :, 0::2] = f
    m[1, :, 1, :5] = f
    return q, k, v, m


def _check_fill_rows(q, k, v, m, config=None):
    # target: SDPA's fp32 arithmetic, softmax(s + fill) max-shifted (finfo.min: the mean of V); lse:
    # the fp64 reference's (finite), never treated as an empty row
    out, lse = attention_fwd(q, k, v, m, enable_gqa=True, config=config)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    atol, rtol, _ = TOL[q.dtype]
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol, msg=lambda s: f"{config}: {s}")
    assert torch.isfinite(lse).all(), config
    torch.testing.assert_close(lse, _lse64(q, k, m), atol=1e-4 if q.dtype == torch.float32 else 2e-3, rtol=1e-6,
                               msg=lambda s: f"{config} lse: {s}")


@pytest.mark.parametrize("dtype,fill", [(torch.float32, "min"), (torch.float32, -1e4), (torch.float16, "min"),
                                        (torch.float16, -1e4), (torch.bfloat16, "min"), (torch.bfloat16, -1e4)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_rows_at_one_finite_fill_match_sdpa_not_empty(dtype, fill):
    # F2: fill * log2(e) overflowed to -inf for finfo.min (fp32/bf16): the row came out empty (0)
    q, k, v, m = _fill_rows_problem(dtype, fill)
    _check_fill_rows(q, k, v, m, config=attention_default_config((q, k, v, m, False, None, True)))


def test_rows_at_finfo_min_match_sdpa_with_every_config_of_the_space():
    # fp32 (fill * log2(e) overflows); rows = 2 * 20 > 32 and S = 70 > 64 exercise every tile
    q, k, v, m = _fill_rows_problem(torch.float32, "min", S=70, L=20)
    for cfg in sorted(ATTN_CONFIG_SPACE, key=str):
        _check_fill_rows(q, k, v, m, config=cfg)


def test_truly_empty_rows_stay_empty_next_to_finite_fill_rows():
    # empty = every key -inf (additive) or False (bool): out 0, lse -inf; a finfo.min row is not empty
    q, k, v = _qkv(1, 4, 2, 4, 70, 16)
    m = torch.randn(1, 1, 4, 70)
    m[..., 1, :] = float("-inf")
    m[..., 2, :] = torch.finfo(torch.float32).min
    b = torch.rand(1, 1, 4, 70) > 0.5
    b[..., 3, :] = False
    for mask, empty_row in ((m, 1), (b, 3)):
        out, lse = _check(q, k, v, mask)
        assert torch.isneginf(lse[..., empty_row]).all() and (out[..., empty_row, :] == 0).all()
        assert torch.isfinite(lse[..., [i for i in range(4) if i != empty_row]]).all()
