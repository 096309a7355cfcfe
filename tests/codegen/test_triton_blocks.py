"""The shared Triton building blocks (graphtune/codegen/triton_blocks.py), called from tiny test kernels in the
interpreter and compared with torch; and every kernel that calls them hashes them.

Tolerances (out atol, lse atol): the scores are fp32 inputs and the LSE is fp32 throughout, only the
summation order differs from torch -> 1e-5 for the LSE in every dtype. The output multiplies P (cast to
V's dtype, as the kernels do for the MMA) by V: fp32 -> 1e-5; fp16 rounds P to 11 significant bits
-> 2e-3; bf16 to 8 -> 2e-2 (as tests/codegen/lean_decode/test_lean_triton.py). The merge reads the
partials in their dtype and computes in fp32 -> 1e-5 for both outputs in fp32, and the partials'
own rounding for 16-bit outputs stored back (fp16 1e-3, bf16 8e-3).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from graphtune.codegen import triton_blocks as tb  # noqa: E402
from graphtune.codegen.registry import source_hash  # noqa: E402
from graphtune.codegen.triton_blocks import (finite_or_zero, lse_merge_epilogue, lse_merge_step,  # noqa: E402
                                             online_softmax_step, softmax_epilogue, softmax_init,
                                             softmax_init_from_lse)

OUT_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
MERGE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LSE_ATOL = 1e-5
DTYPES = list(OUT_ATOL)


@triton.jit
def _softmax_kernel(S, V, PO, PLSE, O, LSE, N, DV,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                    NATURAL: tl.constexpr, HAS_PRIOR: tl.constexpr):
    # S: [BLOCK_M, N] fp32 scores (-inf = masked); V: [N, DV]; PO: [BLOCK_M, DV], PLSE: [BLOCK_M] (prior)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < DV
    if HAS_PRIOR:
        po = tl.load(PO + rows[:, None] * DV + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        m_i, l_i, acc = softmax_init_from_lse(po, tl.load(PLSE + rows))
    else:
        m_i, l_i, acc = softmax_init(BLOCK_M, BLOCK_DV)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = tl.load(S + rows[:, None] * N + cols[None, :], mask=cols[None, :] < N, other=float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, V + cols[:, None] * DV + offs_d[None, :],
                                            (cols[:, None] < N) & d_ok[None, :], NATURAL, "ieee", True)
    out, lse = softmax_epilogue(m_i, l_i, acc, NATURAL)
    tl.store(O + rows[:, None] * DV + offs_d[None, :], out, mask=d_ok[None, :])
    tl.store(LSE + rows, lse)


@triton.jit
def _merge2_kernel(O1, L1, O2, L2, O, LSE, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, MASK_EMPTY: tl.constexpr):
    rows = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = rows[:, None] * D + offs_d[None, :]
    d_ok = offs_d[None, :] < D
    l1, l2 = tl.load(L1 + rows), tl.load(L2 + rows)
    m_safe = finite_or_zero(tl.maximum(l1, l2))
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc, den = lse_merge_step(acc, den, m_safe, l1, tl.load(O1 + ptrs, mask=d_ok, other=0.0), MASK_EMPTY)
    acc, den = lse_merge_step(acc, den, m_safe, l2, tl.load(O2 + ptrs, mask=d_ok, other=0.0), MASK_EMPTY)
    out, lse = lse_merge_epilogue(acc, den, m_safe)
    tl.store(O + ptrs, out, mask=d_ok)
    tl.store(LSE + rows, lse)


def _softmax(s_log2_or_nat, v, natural, prior=None, block_n=8):
    m, n = s_log2_or_nat.shape
    dv = v.shape[1]
    out = torch.empty(m, dv)
    lse = torch.empty(m)
    po, pl = prior if prior is not None else (out, lse)
    _softmax_kernel[(1,)](s_log2_or_nat.contiguous(), v.contiguous(), po.contiguous(), pl.contiguous(), out, lse,
                          n, dv, BLOCK_M=m, BLOCK_N=block_n, BLOCK_DV=triton.next_power_of_2(max(dv, 16)),
                          NATURAL=natural, HAS_PRIOR=prior is not None)
    return out, lse


def _torch_softmax(x_nat, v):
    """softmax(x) @ v and logsumexp(x) in float64; rows with every score -inf: out 0, lse -inf."""
    x = x_nat.double()
    lse = torch.logsumexp(x, dim=1)
    p = torch.softmax(x, dim=1).nan_to_num(0.0)  # max-shifted: a row at finfo.min averages V
    return p @ v.double(), lse


def _scores(m=16, n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * 3  # natural domain
    x[0] = float("-inf")  # fully masked row
    x[1, :30] = float("-inf")  # keys only in the last block
    x[2, ::2] = float("-inf")
    x[3, 8:] = float("-inf")  # keys only in the first block: later blocks are all -inf for this row
    return x, g


@pytest.mark.parametrize("dtype", DTYPES)
def test_online_softmax_over_blocks_log2_domain_matches_torch(dtype):
    x, g = _scores()
    v = torch.randn(x.shape[1], 24, generator=g).to(dtype)  # head dim 24: padded lanes masked
    out, lse = _softmax(x * math.log2(math.e), v, natural=False)  # the kernels' qk * scale * log2(e)
    ref_o, ref_l = _torch_softmax(x, v)
    torch.testing.assert_close(lse.double(), ref_l, atol=LSE_ATOL, rtol=0)
    torch.testing.assert_close(out.double(), ref_o, atol=OUT_ATOL[dtype], rtol=0)
    assert lse[0] == float("-inf") and torch.all(out[0] == 0)  # the fully masked row


@pytest.mark.parametrize("dtype", DTYPES)
def test_online_softmax_natural_domain_keeps_rows_at_one_finite_fill(dtype):
    # NATURAL: scores + an additive mask; a row whose keys all carry finfo.min averages V (SDPA), not empty
    x, g = _scores(seed=1)
    x[4] = torch.finfo(torch.float32).min
    v = torch.randn(x.shape[1], 16, generator=g).to(dtype)
    out, lse = _softmax(x, v, natural=True)
    ref_o, ref_l = _torch_softmax(x, v)
    torch.testing.assert_close(out.double(), ref_o, atol=OUT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(out[4].double(), v.double().mean(0), atol=OUT_ATOL[dtype], rtol=0)
    finite = torch.isfinite(ref_l)
    torch.testing.assert_close(lse[finite].double(), ref_l[finite], atol=LSE_ATOL, rtol=1e-6)
    assert lse[0] == float("-inf") and torch.all(out[0] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_started_from_a_prior_state_equals_the_merge(dtype):
    x, g = _scores(seed=2)
    v = torch.randn(x.shape[1], 16, generator=g).to(dtype)
    po = torch.randn(16, 16, generator=g)
    pl = torch.randn(16, generator=g)
    pl[0] = float("-inf")  # no prior keys and no suffix keys: empty
    pl[5] = float("-inf")  # no prior keys: just the suffix
    po[5] = float("nan")  # ... whatever the prior output holds
    out, lse = _softmax(x * math.log2(math.e), v, natural=False, prior=(po, pl))
    so, sl = _torch_softmax(x, v)
    tot = torch.logaddexp(pl.double(), sl)
    w_p = torch.where(torch.isfinite(pl), torch.exp(pl.double() - tot), 0)
    w_s = torch.where(torch.isfinite(sl), torch.exp(sl - tot), 0)
    ref = torch.nan_to_num(w_p[:, None] * torch.nan_to_num(po.double())) + w_s[:, None] * so
    torch.testing.assert_close(out.double(), ref, atol=OUT_ATOL[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), tot, atol=LSE_ATOL, rtol=0)
    assert lse[0] == float("-inf") and torch.all(out[0] == 0)


@pytest.mark.parametrize("mask_empty", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_merge_of_two_states_with_empty_partials(dtype, mask_empty):
    g = torch.Generator().manual_seed(3)
    o1, o2 = torch.randn(8, 20, generator=g).to(dtype), torch.randn(8, 20, generator=g).to(dtype)
    l1, l2 = torch.randn(8, generator=g) * 4, torch.randn(8, generator=g) * 4
    l1[0] = l2[0] = float("-inf")  # both empty: out 0, lse -inf
    l2[1] = float("-inf")  # partial 2 empty ...
    if mask_empty:
        o2[1] = float("nan")  # ... and its output garbage: must not leak (MASK_EMPTY)
    l1[2], l2[2] = 300.0, -200.0  # a 500-nat spread: no overflow
    out = torch.empty(8, 20)
    lse = torch.empty(8)
    _merge2_kernel[(1,)](o1, l1, o2, l2, out, lse, 20, BLOCK_R=8, BLOCK_D=32, MASK_EMPTY=mask_empty)
    tot = torch.logaddexp(l1.double(), l2.double())
    w1 = torch.where(torch.isfinite(l1), torch.exp(l1.double() - tot), 0)
    w2 = torch.where(torch.isfinite(l2), torch.exp(l2.double() - tot), 0)
    ref = (w1[:, None] * o1.double()).nan_to_num() + (w2[:, None] * torch.nan_to_num(o2.double()))
    ref[0] = 0
    torch.testing.assert_close(out.double(), ref, atol=MERGE_ATOL[torch.float32], rtol=0)
    assert lse[0] == float("-inf") and torch.all(out[0] == 0)
    torch.testing.assert_close(lse[1:].double(), tot[1:], atol=LSE_ATOL, rtol=1e-6)
    torch.testing.assert_close(out[1], o1[1].float(), atol=0, rtol=0)  # only partial 1, weight exactly 1
    if dtype != torch.float32:  # stored back in the partials' dtype, as merge_states does
        torch.testing.assert_close(out.to(dtype).double(), ref, atol=MERGE_ATOL[dtype], rtol=0)


def test_jit_deps_follow_calls_and_every_triton_kernel_hashes_its_blocks():
    from graphtune.codegen.attention.triton_kernels import ATTENTION_IMPL, _attn_fwd_kernel
    from graphtune.codegen.lean_decode.triton_kernels import LEAN_IMPL, _lean_partial_kernel
    from graphtune.codegen.merge_states.triton_kernels import MERGE_IMPL, _merge_states_kernel
    from graphtune.codegen.shared_prefix.triton_kernels import SUFFIX_MERGE_IMPL, _suffix_merge_kernel

    names = lambda deps: {getattr(d, "__name__", d) for d in deps}  # noqa: E731
    attn = names(tb.jit_deps(_attn_fwd_kernel))
    assert {"softmax_init", "online_softmax_step", "softmax_epilogue"} <= attn and "lse_merge_step" not in attn
    assert f"LOG2E={tb.LOG2E.value!r}" in attn and f"LN2={tb.LN2.value!r}" in attn  # used inside the blocks
    assert "softmax_init_from_lse" in names(tb.jit_deps(_suffix_merge_kernel))
    assert {"lse_merge_step", "lse_merge_epilogue", "finite_or_zero"} <= names(tb.jit_deps(_merge_states_kernel))
    assert "online_softmax_step" in names(tb.jit_deps(_lean_partial_kernel))
    for impl, kernel in ((ATTENTION_IMPL, _attn_fwd_kernel), (MERGE_IMPL, _merge_states_kernel),
                         (SUFFIX_MERGE_IMPL, _suffix_merge_kernel)):
        assert impl.source_hash == source_hash(kernel.fn, *tb.jit_deps(kernel)), impl.name
        assert impl.source_hash != source_hash(kernel.fn), impl.name  # the blocks are in it
    assert LEAN_IMPL.source_hash != source_hash(_lean_partial_kernel.fn)
