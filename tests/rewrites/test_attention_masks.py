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


class AdditiveMask(nn.Module):
    """Eager attention with an additive mask; ``upcast`` casts the scores to fp32 before the add
    (the mask is then added in fp32), else the add runs in q's dtype and only the softmax upcasts
    (HF's eager idiom: ``softmax(w + mask, dtype=float32).to(q.dtype)``)."""

    def __init__(self, upcast):
        super().__init__()
        self.upcast = upcast

    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-1, -2))
        if self.upcast:
            s = s.float()
        s = s / 4.0 + mask
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


def _additive_inputs(dtype, mask_dtype, fill, seed=0, qscale=3.0):
    q, k, v, masked = _inputs(dtype, seed)
    q = (q.float() * qscale).to(dtype)  # scores beyond fp16's absorption threshold (|s| >= 16 at -65504)
    mask = torch.zeros(masked.shape).masked_fill(masked, fill).to(mask_dtype)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_additive_min_over_upcast_half_scores_keeps_uniform_rows(capture, clone_gm, dtype):
    # tests/fuzz findings F8: eager adds the fp32 mask to fp32 scores, so a row at finfo(fp32).min
    # everywhere is the uniform average of v. Cast to q's dtype the fill overflows to -inf and the
    # row would become "empty" (0): the mask must stay in fp32, where the eager add happens.
    fill = torch.finfo(torch.float32).min
    inputs = _additive_inputs(dtype, torch.float32, fill, qscale=1.0)
    res, *_, eager, got = _run(capture, clone_gm, AdditiveMask(True), inputs)
    assert res.count("canonicalize_attention") == 1
    assert res.sites[0].details["mask"] == "additive"
    torch.testing.assert_close(eager[0, :, 1].float(), inputs[2][0].float().mean(-2), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(got, eager, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype,fill", [
    (torch.float16, float(torch.finfo(torch.float16).min)),  # HF's fp16 eager mask
    (torch.float16, -1e4),
    (torch.bfloat16, float(torch.finfo(torch.float16).min)),  # -65536 in bf16: absorbs the scores too
    (torch.bfloat16, -1e4),
])
def test_additive_mask_added_in_half_precision_is_left_eager(capture, clone_gm, dtype, fill):
    # tests/fuzz findings F9: eager's half-precision add absorbs the scores of a fully masked row
    # (or overflows them to -inf); the op adds in fp32. No rewrite can know the mask's values, so
    # the form stays eager and keeps eager's result exactly.
    inputs = _additive_inputs(dtype, dtype, fill)
    res, *_, eager, got = _run(capture, clone_gm, AdditiveMask(False), inputs)
    assert res.count("canonicalize_attention") == 0
    torch.testing.assert_close(got, eager, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_additive_mask_added_to_upcast_scores_is_rewritten(capture, clone_gm, dtype):
    # The same half-precision mask added to scores already cast to fp32: the add runs in fp32,
    # as in the op, so fully masked rows agree.
    fill = float(torch.finfo(dtype).min)
    inputs = _additive_inputs(dtype, dtype, fill)
    res, *_, eager, got = _run(capture, clone_gm, AdditiveMask(True), inputs)
    assert res.count("canonicalize_attention") == 1
    torch.testing.assert_close(got, eager, rtol=TOL[dtype], atol=TOL[dtype])
