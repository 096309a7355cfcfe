"""Eager attention written with ``baddbmm`` + an additive bias (BLOOM's ALiBi form) and with
``einsum`` in any index layout: one match each, numerics equal to the original graph and eager."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.ir import ops as gt_ops
from graphtune.ir.meta import val_of
from graphtune.rewrites import run_pipeline

B, H, L, S, D = 2, 4, 5, 7, 8


def _attn_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is gt_ops.attention.default]


def _alibi(b=B, h=H, s=S):
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)])
    return (slopes[:, None, None] * torch.arange(s)).repeat(b, 1, 1)  # [B*H, 1, S]


class BloomAttention(nn.Module):
    """HF BLOOM's eager attention: [B*H, L, D] operands, ALiBi through baddbmm, [B, H, L, S] mask."""

    def __init__(self, beta=None, mask="additive", method=True):
        super().__init__()
        self.beta, self.mask, self.method = beta, mask, method  # beta None: a literal 1.0

    def forward(self, q, k, v, alibi, mask):
        b, h, l, d = q.shape
        q3 = q.reshape(b * h, -1, d)
        kt = k.reshape(b * h, -1, d).transpose(-1, -2)
        v3 = v.reshape(b * h, -1, d)
        if self.method and self.beta is None:
            s = alibi.baddbmm(batch1=q3, batch2=kt, beta=1.0, alpha=1.0 / math.sqrt(d))
        elif self.method:
            s = alibi.baddbmm(batch1=q3, batch2=kt, beta=self.beta, alpha=1.0 / math.sqrt(d))
        else:
            s = torch.baddbmm(alibi, q3, kt, beta=self.beta, alpha=1.0 / math.sqrt(d))
        w = s.view(b, h, l, -1)
        if self.mask == "additive":
            w = w + mask
        elif self.mask == "masked_fill":
            w = w.masked_fill(mask < -1, torch.finfo(torch.float32).min)
        p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        p = F.dropout(p, 0.1, training=False)
        out = torch.bmm(p.view(b * h, l, -1), v3)  # [B*H, L, D]
        return out.view(b, h, l, d).permute(0, 2, 1, 3).reshape(b, l, h * d)


def _bloom_inputs(dtype=torch.float32, pad_rows=False):
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    mask = torch.zeros(B, 1, L, S)
    mask[1, ..., :2] = torch.finfo(torch.float32).min  # left padding of the second sequence
    mask[..., 0, S - 1] = torch.finfo(torch.float32).min
    if pad_rows:
        mask[0, 0, 1] = torch.finfo(torch.float32).min  # a fully masked row
    return tuple(x.to(dtype) for x in (q, k, v, _alibi(), mask))


@pytest.mark.parametrize("how", ["fx", "dynamo", "export"])
def test_bloom_baddbmm_alibi_form(rewrite_and_check, how):
    gm, res = rewrite_and_check(BloomAttention(), _bloom_inputs(pad_rows=True), how, expected=1)
    site = res.sites[0]
    assert site.form == "eager-baddbmm" and site.details["mask"] == "bias+additive" and site.details["upcast"] is False
    assert site.details["scale"] == "alpha"
    (node,) = _attn_nodes(gm)
    assert tuple(val_of(node.args[0]).shape) == (B, H, L, D)  # run on the [B, H] batch dims of the mask


def test_bloom_form_under_dynamic_shapes_rewrites_once_and_serves_every_length():
    # the [B*H] -> [B, H] split is emitted with -1 for the symbolic batch size (sizes chosen so
    # that no two dims are duck-sized into one symbol)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(run_pipeline(gm))
        return gm.forward

    model = BloomAttention().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for b, l, s in ((3, 5, 7), (2, 6, 9), (5, 3, 11)):
            q, k, v = torch.randn(b, H, l, D), torch.randn(b, H, s, D), torch.randn(b, H, s, D)
            args = (q, k, v, _alibi(b, H, s), torch.zeros(b, 1, l, s))
            torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1 and graphs[0].count("canonicalize_attention") == 1


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("mask", [None, "masked_fill"])
def test_baddbmm_beta_and_mask_variants(rewrite_and_check, beta, mask):
    gm, res = rewrite_and_check(BloomAttention(beta, mask, method=False), _bloom_inputs(pad_rows=True), "fx",
                                expected=1)
    want = {None: None, "masked_fill": "masked_fill"}[mask]
    if beta != 0:
        want = "bias" if want is None else f"bias+{want}"
    assert res.sites[0].details["mask"] == want


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("mask", [None, "additive"])
def test_bloom_form_in_half_precision(rewrite_and_check, dtype, tol, mask):
    # An additive mask added to half-precision scores stays eager (attention_masks: a fully masked
    # row's result depends on the half add's rounding); the ALiBi bias alone is rewritten.
    expected = 1 if mask is None else 0
    _, res = rewrite_and_check(BloomAttention(mask=mask), _bloom_inputs(dtype), "fx", expected=expected, rtol=tol,
                               atol=tol)
    if expected:
        assert res.sites[0].details["upcast"] is True


class Bmm3DWithBias(nn.Module):
    """baddbmm with a bias shared by every batch ([L, S]) and a scale after it (scales the bias too)."""

    def forward(self, q, k, v, bias):
        s = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.5) * 0.7
        return torch.bmm(torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_baddbmm_with_broadcast_bias_and_a_scale_after_it(rewrite_and_check, how):
    q, k, v = torch.randn(6, L, D), torch.randn(6, S, D), torch.randn(6, S, D)
    _, res = rewrite_and_check(Bmm3DWithBias(), (q, k, v, torch.randn(L, S)), how, expected=1)
    assert res.sites[0].details["scale"] == "mul"


class Einsum(nn.Module):
    """Research-code attention written with einsum, in the layout given by ``qk`` / ``pv``."""

    def __init__(self, qk, pv, mask=None, gqa=False):
        super().__init__()
        self.qk, self.pv, self.mask, self.gqa = qk, pv, mask, gqa

    def forward(self, q, k, v, fmask):
        if self.gqa:
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        s = torch.einsum(self.qk, q, k) * (q.shape[-1] ** -0.5)
        if self.mask == "additive":
            s = s + fmask
        elif self.mask == "masked_fill":
            s = s.masked_fill(fmask < 0, float("-inf"))
        return torch.einsum(self.pv, s.softmax(dim=-1), v)


EINSUM_LAYOUTS = [
    # (qk equation, pv equation, q/k/v layout, layout detail)
    ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", "BHSD", "BHSD"),
    ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", "BSHD", "BSHD"),
    ("b h i d, b h j d -> b h i j", "b h i j, b h j d -> b h i d", "BHSD", "BHSD"),
    ("bhqd,bhdk->bhqk", "bhqk,bhkd->bhqd", "BHSD-kT", "permuted"),  # k passed pre-transposed
]


def _layout(x, layout):
    if layout == "BSHD":
        return x.transpose(1, 2).contiguous()
    return x


@pytest.mark.parametrize("how", ["fx", "dynamo", "export"])
@pytest.mark.parametrize("qk,pv,layout,detail", EINSUM_LAYOUTS)
def test_einsum_forms(rewrite_and_check, how, qk, pv, layout, detail):
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    q, v = _layout(q, layout), _layout(v, layout)
    k = k.transpose(-1, -2).contiguous() if layout == "BHSD-kT" else _layout(k, layout)
    _, res = rewrite_and_check(Einsum(qk, pv, "additive"), (q, k, v, torch.randn(B, 1, L, S)), how, expected=1)
    site = res.sites[0]
    assert site.form == "eager-einsum" and site.details["layout"] == detail and site.details["mask"] == "additive"


@pytest.mark.parametrize("mask", [None, "masked_fill"])
def test_einsum_with_gqa_and_fill_mask(rewrite_and_check, mask):
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H // 2, S, D), torch.randn(B, H // 2, S, D)
    fmask = torch.randn(B, 1, L, S)
    fmask[0, 0, 2] = -1.0  # a fully masked row: NaN in eager (-inf fill), NaN after
    _, res = rewrite_and_check(Einsum("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", mask, gqa=True), (q, k, v, fmask), "fx",
                               expected=1)
    assert res.sites[0].details["gqa"] == "repeat_interleave"


class EinsumLookAlike(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        if self.how == "softmax-over-queries":
            return torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-2), v)
        if self.how == "scores-not-last-two":  # [B, Q, H, K]: softmax over keys, but q/k dims not last
            return torch.einsum("bqhk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bqhk", q, k).softmax(-1), v)
        if self.how == "two-contracted":
            return torch.einsum("bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q[..., :4], k[..., :4]).softmax(-1)
                                + torch.einsum("bhqd,bhkd->bhqk", q, k), v)
        if self.how == "pv-summed-over-queries":
            return torch.einsum("bhqk,bhkd->bhd", torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1), v)
        if self.how == "ellipsis":
            return torch.einsum("...qk,...kd->...qd", torch.einsum("...qd,...kd->...qk", q, k).softmax(-1), v)
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["softmax-over-queries", "scores-not-last-two", "two-contracted",
                                 "pv-summed-over-queries", "ellipsis"])
def test_einsum_look_alikes_are_not_matched(capture, how):
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    gm, _ = capture(EinsumLookAlike(how), (q, k, v), "fx")
    assert run_pipeline(gm).count("canonicalize_attention") == 0
