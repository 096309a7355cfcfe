"""Every combination of scale x mask x GQA x precision in one eager module: one match each (an
additive mask added to half-precision scores: none, it stays eager),
numerics equal to the original graph and to eager within per-dtype tolerances; then every
``masked_fill``/``where`` fill x score dtype, with fully masked rows: rewritten exactly when the
fill is exact in the score dtype, eager's result kept either way. Captured with torch.fx (cheap);
the other vocabularies are covered form by form in test_attention.py."""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.rewrites import run_pipeline

B, HQ, HKV, L, S, D = 2, 6, 3, 5, 7, 8
SCALES = ("none", "mul", "div", "prescaled-q")
MASKS = (None, "additive", "masked_fill", "where")
GQAS = (None, "repeat_kv", "repeat_interleave")
# (q dtype, dtype of the scores when scaled and masked): half inputs either upcast only in the
# softmax (HF: softmax(w, dtype=float32).to(q.dtype)) or cast their scores to fp32 right away
PRECISIONS = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16-scores-fp32": (torch.float16, torch.float32),
    "bf16-scores-fp32": (torch.bfloat16, torch.float32),
}
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


class Configurable(nn.Module):
    def __init__(self, scale, mask, gqa, precision, fill=None):
        super().__init__()
        self.scale, self.mask, self.gqa = scale, mask, gqa
        self.dtype, self.score_dtype = PRECISIONS[precision]
        self.fill = torch.finfo(self.score_dtype).min if fill is None else fill

    def forward(self, q, k, v, fmask, bmask):
        if self.gqa == "repeat_kv":
            b, h, s, d = k.shape
            k = k[:, :, None, :, :].expand(b, h, 2, s, d).reshape(b, h * 2, s, d)
            v = v[:, :, None, :, :].expand(b, h, 2, s, d).reshape(b, h * 2, s, d)
        elif self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        if self.scale == "prescaled-q":
            q = q * 0.3
        w = torch.matmul(q, k.transpose(2, 3))
        if self.score_dtype != self.dtype:
            w = w.to(self.score_dtype)
        if self.scale == "mul":
            w = w * 0.3
        elif self.scale == "div":
            w = w / 3.0
        if self.mask == "additive":
            w = w + fmask
        elif self.mask == "masked_fill":
            w = w.masked_fill(bmask, self.fill)
        elif self.mask == "where":
            w = torch.where(~bmask, w, self.fill)
        elif self.mask == "where_inv":
            w = torch.where(bmask, self.fill, w)
        if self.dtype == torch.float32:
            p = F.softmax(w, dim=-1)
        else:
            p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(F.dropout(p, 0.1, training=False), v).transpose(1, 2)


def _inputs(gqa, precision, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype, score_dtype = PRECISIONS[precision]
    hkv = HQ if gqa is None else HKV
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((HQ, L), (hkv, S), (hkv, S)))
    fmask = torch.randn(B, 1, L, S, generator=g).to(score_dtype)
    bmask = torch.rand(1, 1, L, S, generator=g) > 0.6
    bmask[..., 1, :] = True  # a fully masked row
    bmask[..., 3, :-1] = True  # a row with one key
    bmask[..., 3, -1] = False
    return q, k, v, fmask, bmask


def _check(capture, clone_gm, model, inputs, expected, tol):
    gm, run_inputs = capture(model, inputs, "fx")
    res = run_pipeline(gm)
    assert res.count("canonicalize_attention") == expected, gm.code
    with torch.no_grad():
        eager = model(*inputs)
        got = gm(*run_inputs)
    assert got.dtype == eager.dtype
    torch.testing.assert_close(got, eager, rtol=tol, atol=tol, equal_nan=True)
    return res


@pytest.mark.parametrize("scale,mask,gqa,precision",
                         list(itertools.product(SCALES, MASKS, GQAS, PRECISIONS)))
def test_every_combination_matches_once_with_equal_numerics(capture, clone_gm, scale, mask, gqa, precision):
    model = Configurable(scale, mask, gqa, precision)
    # an additive mask added to half-precision scores stays eager (graphtune.rewrites.attention_masks:
    # the half add's rounding decides fully masked rows, the op adds in fp32)
    if mask == "additive" and model.score_dtype in (torch.float16, torch.bfloat16):
        _check(capture, clone_gm, model, _inputs(gqa, precision), 0, TOL[model.dtype])
        return
    res = _check(capture, clone_gm, model, _inputs(gqa, precision), 1, TOL[model.dtype])
    d = res.sites[0].details
    assert d["scale"] == scale and d["mask"] == mask and d["gqa"] == gqa
    assert d["upcast"] is (model.dtype != torch.float32)


FILLS = {
    "-inf": -math.inf,
    "finfo.min": None,  # of the score dtype
    "fp16.min": float(torch.finfo(torch.float16).min),
    "-1e4": -1e4,
    "-1e9": -1e9,
}


def _exact(fill, score_dtype):
    """The rule (``graphtune.rewrites.attention_masks``): -inf, or at most -finfo.max / 2, once
    rounded to the score dtype. Spelled out per case rather than recomputed."""
    if fill in ("-inf", "finfo.min"):
        return True
    if fill == "fp16.min":
        return score_dtype == torch.float16
    if fill == "-1e9":
        return score_dtype == torch.float16  # rounds to -inf in fp16
    return False


@pytest.mark.parametrize("fill,precision,form",
                         list(itertools.product(FILLS, PRECISIONS, ("masked_fill", "where", "where_inv"))))
def test_every_fill_is_rewritten_only_where_exact_and_keeps_fully_masked_rows(capture, clone_gm, fill, precision,
                                                                              form):
    dtype, score_dtype = PRECISIONS[precision]
    if form == "masked_fill" and fill == "-1e9" and score_dtype == torch.float16:
        pytest.skip("masked_fill raises on a fill that overflows fp16 (eager does too)")
    model = Configurable("div", form, None, precision, FILLS[fill])
    inputs = _inputs(None, precision)
    _check(capture, clone_gm, model, inputs, int(_exact(fill, score_dtype)), TOL[dtype])
    with torch.no_grad():
        eager = model(*inputs)
    # the fully masked row really is special: NaN for -inf, else the uniform average of v
    row = eager[:, 1]
    if fill == "-inf" or (fill == "-1e9" and score_dtype == torch.float16):
        assert row.isnan().all()
    else:
        torch.testing.assert_close(row, inputs[2].mean(-2), rtol=TOL[dtype], atol=TOL[dtype])
