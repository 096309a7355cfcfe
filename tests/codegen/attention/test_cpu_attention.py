"""CPU attention implementations vs the fp32 reference, over every config they offer."""
import itertools

import pytest
import torch

from graphtune.codegen.attention import cpu as C
from graphtune.codegen.registry import KernelConfig, get_impl, impls_for
from graphtune.errors import ShapeError
from graphtune.ir.ops import attention_cpu
from graphtune.ir.reference import attention_ref

ATTN_IMPLS = ["cpu.flash", "cpu.split_kv", "cpu.gqa_fold", "cpu.math"]
# (B, Hq, Hkv, L, S, D): odd lengths, decode (L=1), GQA groups 1/2/3/4, S long enough to split
SHAPES = [(1, 4, 2, 1, 300, 16), (2, 6, 2, 17, 257, 32), (1, 2, 2, 3, 1000, 8), (2, 4, 1, 1, 129, 64),
          (1, 3, 3, 129, 17, 16)]
MASKS = [None, "bool", "additive_batch", "bool_per_head"]


def _mask(kind, B, Hq, L, S):
    if kind == "bool":
        return torch.rand(L, S) > 0.3
    if kind == "additive_batch":
        return torch.randn(B, 1, L, S)
    if kind == "bool_per_head":
        return torch.rand(B, Hq, L, S) > 0.5
    return None


def _check(got, want, atol, rtol=0.0):
    (o, l), (ro, rl) = got, want
    assert o.shape == ro.shape and o.dtype == ro.dtype and l.shape == rl.shape and l.dtype == torch.float32
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(l), fin), "-inf LSE rows differ from the reference"
    torch.testing.assert_close(o.float(), ro.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(l[fin], rl[fin], atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", ATTN_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_config_matches_reference_fp32(name, shape):
    B, Hq, Hkv, L, S, D = shape
    impl = get_impl("attention_with_lse", name)
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    n_run = 0
    for causal, mk in itertools.product((False, True), MASKS):
        args = (q, k, v, _mask(mk, B, Hq, L, S), causal, None, Hq != Hkv)
        if not impl.supports(args):
            continue
        want = attention_ref(*args)
        for cfg in {impl.default, *impl.configs(args)}:
            _check(impl.fn(*args, config=cfg), want, atol=1e-5)
            n_run += 1
    expect_supported = name not in ("cpu.split_kv", "cpu.gqa_fold") or (
        (name == "cpu.split_kv" and S >= 256) or (name == "cpu.gqa_fold" and Hq != Hkv))
    assert (n_run > 0) == expect_supported


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("name", ATTN_IMPLS)
def test_low_precision_matches_reference(name, dtype, atol):
    q, k, v = torch.randn(2, 4, 1, 32, dtype=dtype), torch.randn(2, 2, 513, 32, dtype=dtype), torch.randn(2, 2, 513, 32, dtype=dtype)
    args = (q, k, v, None, False, 0.2, True)
    impl = get_impl("attention_with_lse", name)
    assert impl.supports(args)
    for cfg in {impl.default, *impl.configs(args)}:
        _check(impl.fn(*args, config=cfg), attention_ref(*args), atol=atol, rtol=atol)


@pytest.mark.parametrize("name", ATTN_IMPLS)
def test_three_d_inputs_and_fully_masked_rows(name):
    # q: [H, L, E] (no batch dim); row 2 of the mask attends to nothing -> out 0, lse -inf
    q, k, v = torch.randn(4, 5, 16), torch.randn(2, 300, 16), torch.randn(2, 300, 16)
    mask = torch.rand(5, 300) > 0.5
    mask[2] = False
    args = (q, k, v, mask, False, None, True)
    impl = get_impl("attention_with_lse", name)
    for cfg in {impl.default, *impl.configs(args)}:
        out, lse = impl.fn(*args, config=cfg)
        assert torch.isneginf(lse[:, 2]).all() and (out[:, 2] == 0).all()
        _check((out, lse), attention_ref(*args), atol=1e-5)


def test_causal_split_chunks_empty_rows_merge_correctly():
    # top-left causal with S >> L: later chunks are empty for every row; their lse must be -inf
    q, k = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 1024, 16)
    args = (q, k, k, None, True, None, False)
    for cfg in C._split_configs(args):
        _check(C.split_kv_attention(*args, config=cfg), attention_ref(*args), atol=1e-5)


def test_math_takes_value_head_dim_different_from_query():
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 33, 16), torch.randn(1, 2, 33, 24)
    args = (q, k, v, None, True, None, False)
    assert not get_impl("attention_with_lse", "cpu.flash").supports(args)
    _check(C.math_attention(*args, config=KernelConfig.make(BLOCK_M=4)), attention_ref(*args), atol=1e-5)


def test_default_config_is_the_untuned_aten_path():
    impl = get_impl("attention_with_lse", "cpu.flash")
    assert impl.default == KernelConfig.make(THREADS=0)
    q, k = torch.randn(2, 8, 3, 32), torch.randn(2, 2, 77, 32)
    args = (q, k, k, None, True, 0.3, True)
    got, want = impl.fn(*args, config=impl.default), attention_cpu(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_threads_knob_is_scoped_and_restored():
    before = torch.get_num_threads()
    q = torch.randn(1, 2, 4, 16)
    for t in C.thread_choices():
        C.flash_attention(q, q, q, config=KernelConfig.make(THREADS=t))
        assert torch.get_num_threads() == before
    with pytest.raises(ShapeError, match="head dim"):
        C.flash_attention(q, q[..., :8], q, config=KernelConfig.make(THREADS=1))
    assert torch.get_num_threads() == before


def test_registered_cpu_impls_and_their_spaces():
    names = [i.name for i in impls_for("attention_with_lse", "cpu")]
    assert set(ATTN_IMPLS) <= set(names)
    q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 4096, 64)
    args = (q, k, k, None, False, None, True)
    split = get_impl("attention_with_lse", "cpu.split_kv").configs(args)
    assert {c["SPLITS"] for c in split} == {2, 4, 8, 16, 32} and {c["FOLD"] for c in split} == {0, 1}
    assert not get_impl("attention_with_lse", "cpu.split_kv").supports((q, k[:, :, :200], k[:, :, :200], None, False, None, True))
    assert not get_impl("attention_with_lse", "cpu.gqa_fold").supports((q, q, q, None, False, None, False))


@pytest.mark.parametrize("name", ATTN_IMPLS)
def test_non_contiguous_inputs(name):
    # HF layout: q/k/v made as [B, L, H, D] and transposed; K/V a slice of a longer static cache
    q = torch.randn(2, 3, 8, 32).transpose(1, 2)
    kv = torch.randn(2, 2, 700, 32)[:, :, :513]
    v = torch.randn(2, 700, 2, 32).transpose(1, 2)[:, :, :513]
    args = (q, kv, v, None, False, None, True)
    impl = get_impl("attention_with_lse", name)
    for cfg in {impl.default, *impl.configs(args)}:
        _check(impl.fn(*args, config=cfg), attention_ref(*args), atol=1e-5)


def test_memory_hungry_configs_are_pruned_for_long_prefill():
    # causal 8x32 heads x 4096^2: folding/splitting would materialise a 2 GiB mask, math a 4 GiB score
    # block (meta tensors: shapes only, so the checks below are the memory rules themselves)
    q = torch.empty(8, 32, 4096, 64, device="meta")
    k = torch.empty(8, 8, 4096, 64, device="meta")
    prefill = (q, k, k, None, True, None, True)
    assert not C._mask_fits(prefill)
    assert C._mask_fits((q, k, k, None, False, None, True))  # nothing to materialise without mask/causal
    assert C._mask_fits((q[:1, :, :16], k[:1], k[:1], None, True, None, True))
    blocks = [c["BLOCK_M"] for c in C._math_configs(prefill)]
    assert blocks == [64]  # 256 and 1024 rows would need 1 and 4 GiB of scores
    assert [c["BLOCK_M"] for c in C._math_configs((q[:1, :4, :300], k[:1, :1], k[:1, :1], None, False, None, True))] == [64, 256, 300]


@pytest.mark.parametrize("name", ATTN_IMPLS)
@pytest.mark.parametrize("mshape", [(1, 1, 3, 1), (1, 1, 1, 300), (2, 1, 1, 1), (3, 300), (1, 4, 1, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_masks_broadcast_over_queries_keys_or_heads_match_reference(name, mshape):
    # a mask with a size-1 query or key dim once folded/split along its own sizes (gqa_fold: "expanded
    # size must match"; split_kv: chunks of a size-1 key dim came out empty)
    B, Hq, Hkv, L, S, D = 2, 4, 2, 3, 300, 16
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    impl = get_impl("attention_with_lse", name)
    for kind in ("bool", "additive"):
        m = torch.rand(mshape) > 0.3 if kind == "bool" else torch.randn(mshape)
        if kind == "bool":
            m[..., 0] = True
        for causal in (False, True):
            args = (q, k, v, m, causal, None, True)
            assert impl.supports(args)
            for cfg in {impl.default, *impl.configs(args)}:
                _check(impl.fn(*args, config=cfg), attention_ref(*args), atol=1e-5)


@pytest.mark.parametrize("name", ATTN_IMPLS)
def test_rows_at_finfo_min_average_uniformly_like_sdpa(name):
    # cpu.math once computed exp(scores - lse), which loses log(#keys) at finfo.min: sum, not mean
    import torch.nn.functional as F

    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    m = torch.randn(1, 1, 3, 300)
    m[..., 1, :] = torch.finfo(torch.float32).min
    args = (q, k, v, m, False, None, True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    impl = get_impl("attention_with_lse", name)
    for cfg in {impl.default, *impl.configs(args)}:
        torch.testing.assert_close(impl.fn(*args, config=cfg)[0], want, atol=1e-5, rtol=1e-5)


def _lse64(q, k, mask, scale=None):
    # the fp64 reference LSE of the scores plus the (rounded) additive mask, cast to fp32: a row of
    # one huge finite fill f has lse = f + max(s) + log(n), which rounds to f in fp32
    qd, kd = q.double(), k.double().repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = (qd @ kd.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return torch.logsumexp(s + mask.double(), dim=-1).float()


FILL_CASES = [(torch.float32, "min"), (torch.float32, -1e4), (torch.float16, "min"), (torch.bfloat16, "min"),
              (torch.bfloat16, -1e4)]
# out vs SDPA in the same dtype (fp32: SDPA's own arithmetic, so tight); lse vs fp64 (atol, rtol)
FILL_TOL = {torch.float32: ((1e-5, 1e-5), (1e-4, 1e-6)), torch.float16: ((2e-3, 4e-3), (2e-3, 1e-6)),
            torch.bfloat16: ((1.6e-2, 2e-2), (2e-3, 1e-6))}


@pytest.mark.parametrize("name", ATTN_IMPLS)
@pytest.mark.parametrize("S", [257, 517])
@pytest.mark.parametrize("dtype,fill", FILL_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_rows_at_one_finite_fill_match_sdpa_over_uneven_chunks(name, S, dtype, fill):
    # F2: a row whose every key carries one finite fill is softmax(s + fill) in fp32, as SDPA computes
    # it (for finfo.min: the mean of V), not an empty row. cpu.split_kv's chunks of unequal length
    # (S=257: 129+128 or 4x65-ish) each had lse = fill + log(n) rounded to the fill, so the merge
    # weighed them equally (1e-3 off)
    import torch.nn.functional as F

    f = torch.finfo(dtype).min if fill == "min" else fill
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16).to(dtype), torch.randn(2, 2, S, 16).to(dtype), torch.randn(2, 2, S, 16).to(dtype)
    m = torch.randn(2, 1, 3, S).to(dtype)
    m[0, :, 1] = f  # batch 0: row 1 at the fill everywhere; batch 1: rows 0 and 2
    m[1, :, 0::2] = f
    m[1, :, 1, :5] = f  # a row with a few fill keys among ordinary ones
    args = (q, k, v, m, False, None, True)
    impl = get_impl("attention_with_lse", name)
    if not impl.supports(args):
        pytest.skip(f"{name} declines")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    want_lse = _lse64(q, k, m)
    (oa, orr), (la, lr) = FILL_TOL[dtype]
    for cfg in {impl.default, *impl.configs(args)}:
        out, lse = impl.fn(*args, config=cfg)
        torch.testing.assert_close(out.float(), want.float(), atol=oa, rtol=orr, msg=lambda s: f"{cfg}: {s}")
        assert torch.isfinite(lse).all(), cfg
        torch.testing.assert_close(lse, want_lse, atol=la, rtol=lr, msg=lambda s: f"{cfg} lse: {s}")


@pytest.mark.parametrize("name", ATTN_IMPLS)
def test_truly_empty_rows_stay_empty_next_to_finite_fill_rows(name):
    # empty = every key -inf (additive) or False (bool): out 0, lse -inf; a finfo.min row is not empty
    q, k, v = torch.randn(1, 4, 4, 16), torch.randn(1, 2, 257, 16), torch.randn(1, 2, 257, 16)
    m = torch.randn(1, 1, 4, 257)
    m[..., 1, :] = float("-inf")
    m[..., 2, :] = torch.finfo(torch.float32).min
    b = torch.rand(1, 1, 4, 257) > 0.5
    b[..., 3, :] = False
    impl = get_impl("attention_with_lse", name)
    for mask, empty_row in ((m, 1), (b, 3)):
        args = (q, k, v, mask, False, None, True)
        for cfg in {impl.default, *impl.configs(args)}:
            out, lse = impl.fn(*args, config=cfg)
            assert torch.isneginf(lse[..., empty_row]).all() and (out[..., empty_row, :] == 0).all(), cfg
            others = [i for i in range(4) if i != empty_row]
            assert torch.isfinite(lse[..., others]).all(), cfg
            _check((out, lse), attention_ref(*args), atol=1e-5, rtol=1e-5)
