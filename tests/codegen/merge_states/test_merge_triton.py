"""Triton merge_states against graphtune.ir.reference.merge_states_ref, in the interpreter.

Tolerances: the kernel and the reference both merge in fp32 and round once to the output dtype,
so they differ by summation order (~1e-7 relative) plus at most one output ulp:
fp32 1e-5, fp16 1e-3 (ulp 2^-10 at |o| ~ 1), bf16 1.6e-2 (ulp 2^-7 at |o| ~ 2). LSEs are fp32: 1e-5.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton.jit

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from graphtune.codegen import registry  # noqa: E402
from graphtune.codegen.attention.triton_kernels import attention_fwd  # noqa: E402
from graphtune.codegen.merge_states.triton_kernels import (  # noqa: E402
    MERGE_CONFIG_SPACE,
    MERGE_DEFAULT_CONFIG,
    merge_configs,
    merge_states,
    merge_states_stacked,
    prune_merge_configs,
)
from graphtune.codegen.registry import KernelConfig  # noqa: E402
from graphtune.errors import KernelError, ShapeError  # noqa: E402
from graphtune.ir.reference import attention_ref, merge_states_ref  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def _partials(n, shape, dtype=torch.float32):
    outs = [torch.randn(*shape).to(dtype) for _ in range(n)]
    lses = [torch.randn(*shape[:-1]) * 3 for _ in range(n)]
    return outs, lses


def _check(outs, lses, config=None):
    out, lse = merge_states(outs, lses, config=config)
    ref_out, ref_lse = merge_states_ref(outs, lses)
    tol = TOL[outs[0].dtype]
    assert out.dtype == outs[0].dtype and lse.dtype == torch.float32 and out.shape == ref_out.shape
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-5, rtol=1e-5)
    return out, lse


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("shape", [(1, 16), (3, 17, 64), (2, 2, 3, 80)])
def test_matches_reference_for_n_partials_and_odd_shapes(n, shape):
    _check(*_partials(n, shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs(dtype):
    _check(*_partials(3, (2, 9, 128), dtype))


def test_empty_partials_and_all_empty_rows():
    outs, lses = _partials(3, (2, 7, 32))
    lses[1][0] = float("-inf")  # partial 1 empty for every row of head 0
    for l in lses:
        l[1, 4] = float("-inf")  # row (1, 4): every partial empty
    outs[2][1, 4] = 1e4  # garbage in an empty partial must not leak
    out, lse = _check(outs, lses)
    assert (out[1, 4] == 0).all() and torch.isneginf(lse[1, 4])


def test_huge_lse_spread_does_not_overflow():
    outs, lses = _partials(2, (4, 16))
    lses[0] += 500.0  # exp(500) overflows fp32; the max-shift must avoid it
    out, lse = _check(outs, lses)
    assert torch.isfinite(out).all()


def test_merging_attention_over_split_keys_equals_attention_over_all_keys():
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    o1, l1 = attention_fwd(q, k[..., :13, :], v[..., :13, :])
    o2, l2 = attention_fwd(q, k[..., 13:, :], v[..., 13:, :])
    out, lse = merge_states([o1, o2], [l1, l2])
    ref_out, ref_lse = attention_ref(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_stacked_non_contiguous_input():
    out = torch.randn(3, 16, 5, 2).transpose(1, 3)  # [3, 2, 5, 16], non-contiguous
    lse = torch.randn(3, 2, 5)
    res, res_lse = merge_states_stacked(out, lse)
    ref, ref_lse = merge_states_ref(list(out), list(lse))
    torch.testing.assert_close(res, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res_lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_every_config_of_the_space_runs_and_matches():
    # 33 rows (BLOCK_R cap 64) x D=128: the prune keeps most of the space; wider/narrower D cover the rest
    outs, lses = _partials(2, (33, 128))
    kept = merge_configs((outs, lses))
    wide = _partials(2, (33, 256))
    kept_wide = [c for c in merge_configs(wide) if c not in kept]
    small = _partials(2, (33, 16))
    kept_small = [c for c in merge_configs(small) if c not in kept and c not in kept_wide]
    covered = set(kept) | set(kept_wide) | set(kept_small)
    assert MERGE_DEFAULT_CONFIG in covered
    assert covered == set(MERGE_CONFIG_SPACE)  # no dead configs in the space
    for cfg in kept:
        _check(outs, lses, config=cfg)
    for cfg in kept_wide:
        _check(*wide, config=cfg)
    for cfg in kept_small:
        _check(*small, config=cfg)


def test_prune_caps_rows_per_program_and_never_empties():
    kept = prune_merge_configs(MERGE_CONFIG_SPACE, rows=3, head_dim=64)
    assert kept and all(c["BLOCK_R"] <= 4 for c in kept)
    assert prune_merge_configs(MERGE_CONFIG_SPACE[-1:], rows=1, head_dim=16)


def test_registered_impl_takes_the_op_argument_tuple():
    impl = registry.get_impl("merge_states", "triton.merge_states")
    assert impl is not None and impl.device == "cuda" and impl.default == MERGE_DEFAULT_CONFIG
    outs, lses = _partials(3, (2, 5, 16))
    assert impl.supports((outs, lses))
    out, lse = impl.fn(outs, lses, config=impl.configs((outs, lses))[0])
    ref_out, ref_lse = merge_states_ref(outs, lses)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_errors_naming_the_problem():
    outs, lses = _partials(2, (3, 16))
    with pytest.raises(ShapeError, match="as many"):
        merge_states(outs, lses[:1])
    with pytest.raises(ShapeError, match="partial 1"):
        merge_states([outs[0], torch.randn(4, 16)], lses)
    with pytest.raises(ShapeError, match="dtype"):
        merge_states([o.double() for o in outs], lses)
    with pytest.raises(ShapeError, match="N >= 1"):
        merge_states_stacked(torch.randn(0, 3, 16), torch.randn(0, 3))
    with pytest.raises(KernelError, match="power-of-two"):
        merge_states(outs, lses, config=KernelConfig.make(BLOCK_R=3))


def test_kernel_failure_warns_and_falls_back_to_reference_unless_told_not_to(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)  # no CUDA, no interpreter
    outs, lses = _partials(2, (3, 16))
    with pytest.warns(RuntimeWarning, match="falling back"):
        out, lse = merge_states(outs, lses)
    ref_out, ref_lse = merge_states_ref(outs, lses)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(KernelError, match="CUDA"):
        merge_states(outs, lses, fallback=False)
