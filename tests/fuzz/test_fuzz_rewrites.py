"""Rewrite-level differential fuzzing: random eager attention written by hand (the forms graphtune
canonicalizes: matmul, ``baddbmm`` with a bias, ``einsum``; scales; additive, ``masked_fill`` and ``where``
masks with any fill; score upcasts; GQA by ``repeat_interleave`` or ``expand``), optimized with
``graphtune.optimize(..., capture="fx")``, against the same module run eagerly.

Whatever graphtune rewrites must keep eager's result, including fully masked rows: a finite fill averages
all values. A row at ``-inf`` everywhere is NaN in eager; such rows are compared only where eager is finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

import graphtune

from fuzz_support import DTYPES, count_example, fuzz_settings

# eager in low precision is itself rounded: compare with the matrix test's per-dtype tolerances
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


@dataclass(frozen=True)
class EagerForm:
    dtype: str
    scores: str  # matmul | baddbmm | einsum
    scale: str  # none | mul | div | prescaled
    mask: str  # none | additive | masked_fill | where
    fill: str  # min | min16 | -1e4 | -1e9 | -inf
    upcast: str  # none | scores | softmax
    gqa: str  # none | repeat_interleave | expand
    b: int
    hkv: int
    lq: int
    s: int
    d: int
    empty: tuple[int, ...]
    seed: int

    def fill_value(self) -> float:
        score_dtype = torch.float32 if self.upcast == "scores" else DTYPES[self.dtype]
        return {"min": torch.finfo(score_dtype).min, "min16": torch.finfo(torch.float16).min, "-1e4": -1e4,
                "-1e9": -1e9, "-inf": float("-inf")}[self.fill]

    def inputs(self):
        g = torch.Generator().manual_seed(self.seed)
        dt = DTYPES[self.dtype]
        hq = self.hkv * (1 if self.gqa == "none" else 2)
        q = torch.randn(self.b, hq, self.lq, self.d, generator=g).to(dt)
        k = torch.randn(self.b, self.hkv, self.s, self.d, generator=g).to(dt)
        v = torch.randn(self.b, self.hkv, self.s, self.d, generator=g).to(dt)
        keep = torch.rand(self.b, 1, self.lq, self.s, generator=g) > 0.3
        for i in self.empty:
            keep[:, :, i] = False
        score_dtype = torch.float32 if self.upcast == "scores" else dt
        bias = torch.zeros(keep.shape).masked_fill(~keep, self.fill_value()).to(score_dtype)
        return q, k, v, bias, ~keep


class Attention(nn.Module):
    def __init__(self, form: EagerForm):
        super().__init__()
        self.f = form

    def forward(self, q, k, v, bias, masked):
        f = self.f
        if f.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        elif f.gqa == "expand":
            b, h, s, d = k.shape
            k = k[:, :, None].expand(b, h, 2, s, d).reshape(b, h * 2, s, d)
            v = v[:, :, None].expand(b, h, 2, s, d).reshape(b, h * 2, s, d)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if f.scale == "prescaled":
            q = q * scale
        B, H, L, D = q.shape
        S = k.shape[2]
        if f.scores == "baddbmm":  # BLOOM: alpha scales, the bias is the additive term
            base = q.new_zeros((B * H, L, S))
            w = torch.baddbmm(base, q.reshape(B * H, L, D), k.reshape(B * H, S, D).transpose(1, 2),
                              beta=1.0, alpha=scale if f.scale in ("mul", "div") else 1.0).view(B, H, L, S)
        elif f.scores == "einsum":
            w = torch.einsum("bhld,bhsd->bhls", q, k)
        else:
            w = torch.matmul(q, k.transpose(-2, -1))
        if f.upcast == "scores":
            w = w.float()
        if f.scores != "baddbmm":
            if f.scale == "mul":
                w = w * scale
            elif f.scale == "div":
                w = w / math.sqrt(D)
        if f.mask == "additive":
            w = w + bias
        elif f.mask == "masked_fill":
            w = w.masked_fill(masked, f.fill_value())
        elif f.mask == "where":
            w = torch.where(masked, torch.tensor(f.fill_value(), dtype=w.dtype), w)
        if f.upcast == "softmax":
            p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            p = F.softmax(w, dim=-1).to(q.dtype)
        return torch.matmul(p, v)


@st.composite
def eager_forms(draw) -> EagerForm:
    dtype = draw(st.sampled_from(list(DTYPES)))
    lq = draw(st.integers(1, 5))
    return EagerForm(dtype, draw(st.sampled_from(["matmul", "matmul", "baddbmm", "einsum"])),
                     draw(st.sampled_from(["none", "mul", "div", "prescaled"])),
                     draw(st.sampled_from(["none", "additive", "masked_fill", "where"])),
                     draw(st.sampled_from(["min", "min16", "-1e4", "-1e9", "-inf"])),
                     draw(st.sampled_from(["none", "scores", "softmax"] if dtype != "float32" else ["none"])),
                     draw(st.sampled_from(["none", "none", "repeat_interleave", "expand"])),
                     draw(st.integers(1, 2)), draw(st.integers(1, 2)), lq, draw(st.integers(1, 9)),
                     draw(st.sampled_from([8, 16])),
                     tuple(sorted(draw(st.sets(st.integers(0, lq - 1), max_size=2)))), draw(st.integers(0, 2**16)))


@fuzz_settings(30)
@given(form=eager_forms())
# a row fully masked by an fp32 finfo.min added to upcast scores of a bf16 model (tests/fuzz findings F8)
@example(form=EagerForm("bfloat16", "matmul", "none", "additive", "min", "scores", "repeat_interleave", 1, 2, 3, 4, 16,
                        (2,), 332))
@example(form=EagerForm("float16", "matmul", "div", "masked_fill", "min16", "scores", "none", 1, 1, 2, 5, 8, (0,), 1))
@example(form=EagerForm("float32", "baddbmm", "mul", "additive", "-1e4", "none", "none", 2, 1, 3, 6, 8, (1,), 2))
@example(form=EagerForm("float32", "einsum", "div", "where", "-1e9", "none", "expand", 1, 2, 2, 3, 8, (0, 1), 3))
def test_rewritten_eager_attention_keeps_eagers_result(form):
    score_dtype = torch.float32 if form.upcast == "scores" else DTYPES[form.dtype]
    fill = form.fill_value()
    assume(form.mask == "none" or math.isinf(fill) or abs(fill) <= torch.finfo(score_dtype).max)  # else eager raises
    count_example("rewrites: eager attention forms, optimize(capture='fx') vs eager")
    model = Attention(form).eval()
    args = form.inputs()
    with torch.no_grad():
        want = model(*args)
        fast = graphtune.optimize(model, args, capture="fx", validate=False)
        got = fast(*args)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype, form)
    finite = torch.isfinite(want)  # eager's NaN rows (every key at -inf) are its own business
    atol, rtol = TOL[want.dtype]
    g, w = got.double()[finite], want.double()[finite]
    err = (g - w).abs()
    bad = err > atol + rtol * w.abs()
    assert not bool(bad.any()), f"rewritten attention differs from eager by {err.max().item():.3g}: {form}"
