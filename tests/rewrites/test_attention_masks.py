"""masked_fill / where masks: rewritten only where the fill is exact in the score dtype, and rows
masked entirely keep eager's result (uniform average for a finite fill, NaN for ``-inf``).

Each case compares the rewritten graph against eager PyTorch on inputs with fully masked rows.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.rewrites import run_pipeline, validate_rewrite

B, H, L, S, D = 2, 3, 5, 6, 8
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class FillMask(nn.Module):
    """Eager attention masked by ``masked_fill`` / ``where`` with ``fill``; ``upcast`` casts the
    scores to fp32 before masking (the fill then lives in fp32), else only the softmax upcasts."""

    def __init__(self, form, fill, upcast):
        super().__init__()
        self.form, self.fill, self.upcast = form, fill, upcast

    def forward(self, q, k, v, masked):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.35
        if self.upcast:
            s = s.float()
        if self.form == "masked_fill":
            s = s.masked_fill(masked, self.fill)
        elif self.form == "where":
            s = torch.where(~masked, s, self.fill)
        else:
            s = torch.where(masked, self.fill, s)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (L, S, S))
    masked = torch.rand(B, 1, L, S, generator=g) > 0.6
    masked[0, 0, 1] = True  # fully masked rows
    masked[1, 0, 3] = True
    masked[..., 0, 0] = False  # and rows with exactly one key
    masked[..., 0, 1:] = True
    return q, k, v, masked


def _run(capture, clone_gm, model, inputs, how="fx"):
    gm, run_inputs = capture(model, inputs, how)
    original = clone_gm(gm)
    res = run_pipeline(gm)
    with torch.no_grad():
        eager = model(*inputs)
        got = gm(*run_inputs)
    got = got[0] if isinstance(got, (tuple, list)) else got
    return res, original, gm, run_inputs, eager, got


@pytest.mark.parametrize("how", ["fx", "export"])
@pytest.mark.parametrize("form", ["masked_fill", "where", "where_inv"])
def test_neg_inf_fill_keeps_eager_nan_rows(capture, clone_gm, form, how):
    # Eager softmax over a row of -inf is NaN; SDPA semantics would give 0 there.
    res, *_, eager, got = _run(capture, clone_gm, FillMask(form, float("-inf"), False), _inputs(torch.float32), how)
    assert res.count("canonicalize_attention") == 1
    assert eager[0, :, 1].isnan().all() and not eager[0, :, 0].isnan().any()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("how", ["fx", "export"])
@pytest.mark.parametrize("form", ["masked_fill", "where", "where_inv"])
def test_finfo_min_fill_keeps_eager_uniform_rows(capture, clone_gm, form, how):
    fill = torch.finfo(torch.float32).min
    res, *_, eager, got = _run(capture, clone_gm, FillMask(form, fill, False), _inputs(torch.float32), how)
    assert res.count("canonicalize_attention") == 1
    q, k, v, _ = _inputs(torch.float32)
    torch.testing.assert_close(eager[0, :, 1], v[0].mean(-2), rtol=1e-5, atol=1e-6)  # uniform average
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", [-1e4, -1e9, float(torch.finfo(torch.float16).min)])
def test_fill_not_saturating_the_score_dtype_is_left_eager(capture, clone_gm, fill):
    # fp32 scores: s + fill != fill, so no additive or bool mask reproduces a fully masked row
    res, *_, eager, got = _run(capture, clone_gm, FillMask("masked_fill", fill, False), _inputs(torch.float32))
    assert res.count("canonicalize_attention") == 0
    torch.testing.assert_close(got, eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_scores_upcast_before_the_fill_keep_the_fp32_fill(capture, clone_gm, dtype):
    # Scores cast to fp32, then filled with fp32's minimum: clamping that fill to the query
    # dtype's minimum changes the fully masked rows (fp16: s - 65504 keeps s in fp32).
    fill = torch.finfo(torch.float32).min
    res, *_, eager, got = _run(capture, clone_gm, FillMask("masked_fill", fill, True), _inputs(dtype))
    assert res.count("canonicalize_attention") == 1
    torch.testing.assert_close(got, eager, rtol=TOL[dtype], atol=TOL[dtype])


def test_translation_validation_catches_a_fully_masked_row_mismatch(capture, clone_gm, monkeypatch):
    # The same check graphtune runs under GRAPHTUNE_VALIDATE: a rewrite that drops the fully-masked
    # row fix-up is caught on these example inputs.
    from graphtune.errors import TranslationValidationError
    from graphtune.rewrites import attention

    monkeypatch.setattr(attention, "emit_empty_rows", lambda m, plan, out, v, n_rep: out)
    fill = torch.finfo(torch.float32).min
    res, original, gm, run_inputs, *_ = _run(capture, clone_gm, FillMask("masked_fill", fill, False),
                                             _inputs(torch.float32))
    assert res.count("canonicalize_attention") == 1
    with pytest.raises(TranslationValidationError, match="max abs difference"):
        validate_rewrite(original, gm, run_inputs, rtol=1e-5, atol=1e-5)


class TwoAdditiveMasks(nn.Module):
    def forward(self, q, k, v, causal, pad):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.35
        s = (s + causal) + pad
        return torch.matmul(s.softmax(-1), v)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_two_stacked_additive_masks_are_both_kept(rewrite_and_check, how):
    q, k, v, _ = _inputs(torch.float32)
    causal = torch.randn(L, S)
    pad = torch.zeros(B, 1, 1, S)
    pad[1, ..., :3] = -1e4
    _, res = rewrite_and_check(TwoAdditiveMasks(), (q, k, v, causal, pad), how, expected=1)
    assert res.sites[0].details["mask"] == "additive+additive"
