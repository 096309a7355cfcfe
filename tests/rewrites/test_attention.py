"""canonicalize_attention: every attention form becomes graphtune.attention, look-alikes do not.

Each positive test asserts the exact match count and that the rewritten graph equals the
original graph and eager PyTorch within fp32 1e-5 (``rewrite_and_check`` in conftest.py).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphtune.ir import ops as gt_ops
from graphtune.ir.meta import val_of
from graphtune.rewrites import run_pipeline

B, HQ, HKV, L, D = 2, 4, 2, 5, 8


def _qkv(hq=HQ, hkv=HKV, l=L, s=L, d=D, dtype=torch.float32):
    return (torch.randn(B, hq, l, d, dtype=dtype), torch.randn(B, hkv, s, d, dtype=dtype),
            torch.randn(B, hkv, s, d, dtype=dtype))


def _attn_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is gt_ops.attention.default]


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


# -- F.scaled_dot_product_attention --------------------------------------------------------

class SdpaAllKwargs(nn.Module):
    def forward(self, q, k, v, fmask, bmask):
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        kr, vr = repeat_kv(k, 2), repeat_kv(v, 2)
        b = F.scaled_dot_product_attention(q, kr, vr, attn_mask=fmask)
        c = F.scaled_dot_product_attention(q, kr, vr, attn_mask=bmask, scale=0.3)
        d = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, dropout_p=0.0)
        return a + b + c + d


@pytest.mark.parametrize("how", ["fx", "dynamo", "export"])
def test_sdpa_with_every_kwarg_is_canonicalized(rewrite_and_check, how):
    q, k, v = _qkv()
    fmask = torch.randn(1, 1, L, L)
    bmask = torch.rand(B, 1, L, L) > 0.3
    bmask[..., 0] = True
    gm, res = rewrite_and_check(SdpaAllKwargs(), (q, k, v, fmask, bmask), how, expected=4)
    assert [s.details["mask"] for s in res.sites] == [None, "additive", "bool", "causal"]
    assert [s.details["gqa"] for s in res.sites] == ["sdpa", "repeat_kv", "repeat_kv", "repeat_kv"]
    assert all(s.form == "sdpa" for s in res.sites)
    # repeat_kv is folded away: every attention reads the 2-head k
    assert all(val_of(n.args[1]).shape[1] == HKV for n in _attn_nodes(gm))


class SdpaDropout(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def test_sdpa_with_active_dropout_is_left_alone(capture):
    gm, _ = capture(SdpaDropout(), _qkv(hkv=HQ), "fx")
    assert run_pipeline(gm).count("canonicalize_attention") == 0


# -- eager forms -----------------------------------------------------------------------------

class LlamaEager(nn.Module):
    """HF Llama's eager_attention_forward, fed a sliced additive mask."""

    def forward(self, q, k, v, mask):
        ks, vs = repeat_kv(k, 2), repeat_kv(v, 2)
        w = torch.matmul(q, ks.transpose(2, 3)) * (D ** -0.5)
        w = w + mask[:, :, :, : ks.shape[-2]]
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.1, training=False)
        return torch.matmul(w, vs).transpose(1, 2).contiguous()


@pytest.mark.parametrize("how", ["fx", "dynamo", "export"])
def test_hf_llama_eager_attention_with_repeat_kv_and_sliced_mask(rewrite_and_check, how):
    q, k, v = _qkv()
    mask = torch.triu(torch.full((L, L + 3), torch.finfo(torch.float32).min), 1)[None, None]
    gm, res = rewrite_and_check(LlamaEager(), (q, k, v, mask), how, expected=1)
    (site,) = res.sites
    assert site.form == "eager-matmul"
    assert site.details == {"scale": "mul", "mask": "additive", "gqa": "repeat_kv", "upcast": False, "layout": "BHSD"}
    (node,) = _attn_nodes(gm)
    assert node.kwargs["enable_gqa"] is True and node.kwargs["scale"] == pytest.approx(D ** -0.5)
    assert not any(n.op == "call_function" and n.target in (torch.matmul, F.softmax) for n in gm.graph.nodes)


class ScaledBy(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.register_buffer("inv_scale", torch.tensor(math.sqrt(D)))

    def forward(self, q, k, v):
        kt = k.transpose(-2, -1)
        if self.how == "div-number":
            s = torch.matmul(q, kt) / math.sqrt(D)
        elif self.how == "div-full":
            s = torch.matmul(q, kt) / torch.full([], math.sqrt(D), dtype=q.dtype)
        elif self.how == "div-buffer":
            s = torch.matmul(q, kt) / self.inv_scale
        elif self.how == "mul-left":
            s = 0.125 * torch.matmul(q, kt)
        elif self.how == "prescaled-q":
            s = torch.matmul(q * 0.125, kt)
        elif self.how == "prescaled-k":
            s = torch.matmul(q, (k / 3.0).transpose(-2, -1))
        else:  # no scale at all
            s = torch.matmul(q, kt)
        return torch.matmul(torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("form,scale,detail", [
    ("div-number", D ** -0.5, "div"), ("div-full", D ** -0.5, "div"), ("div-buffer", D ** -0.5, "div"),
    ("mul-left", 0.125, "mul"), ("prescaled-q", 0.125, "prescaled-q"), ("prescaled-k", 1 / 3.0, "prescaled-k"),
    ("none", 1.0, "none"),
])
def test_every_way_of_writing_the_scale(rewrite_and_check, form, scale, detail):
    gm, res = rewrite_and_check(ScaledBy(form), _qkv(hkv=HQ), "fx", expected=1)
    (node,) = _attn_nodes(gm)
    # no scale must mean scale=1.0 explicitly: SDPA's default would be 1/sqrt(E)
    assert node.kwargs["scale"] == pytest.approx(scale)
    assert res.sites[0].details["scale"] == detail


@pytest.mark.parametrize("how", ["dynamo", "export"])
def test_scale_by_a_constant_tensor_in_dynamo_and_export_graphs(rewrite_and_check, how):
    gm, _ = rewrite_and_check(ScaledBy("div-full"), _qkv(hkv=HQ), how, expected=1)
    assert _attn_nodes(gm)[0].kwargs["scale"] == pytest.approx(D ** -0.5)


class MaskedFill(nn.Module):
    def forward(self, q, k, v, bmask):
        s = torch.matmul(q, k.transpose(-1, -2)) / 4.0
        s = s.masked_fill(bmask, torch.finfo(torch.float32).min)
        return torch.matmul(s.softmax(-1), v)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_masked_fill_becomes_a_bool_mask_with_fully_masked_rows_unchanged(rewrite_and_check, how):
    bmask = torch.rand(B, 1, L, L) > 0.5
    bmask[0, 0, 2] = True  # a fully masked row: uniform attention in the original, and after
    gm, res = rewrite_and_check(MaskedFill(), (*_qkv(hkv=HQ), bmask), how, expected=1)
    assert res.sites[0].details["mask"] == "masked_fill"
    assert val_of(_attn_nodes(gm)[0].kwargs["attn_mask"]).dtype == torch.bool


class Gpt2Where(nn.Module):
    """Older GPT-2: torch.where(causal, scores, finfo.min) with the fill a 0-dim tensor."""

    def forward(self, q, k, v):
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))[None, None]
        w = torch.where(causal, w, torch.full([], torch.finfo(torch.float32).min, dtype=w.dtype))
        w = nn.functional.softmax(w, dim=-1).type(v.dtype)
        return torch.matmul(w, v)


@pytest.mark.parametrize("how", ["fx", "dynamo", "export"])
def test_gpt2_where_form(rewrite_and_check, how):
    gm, res = rewrite_and_check(Gpt2Where(), _qkv(hkv=HQ), how, expected=1)
    assert res.sites[0].details["mask"] == "where"


class Gpt2WhereThenPadding(nn.Module):
    """Older GPT-2 with a padding mask too: two stacked masks, where(...) then + attention_mask."""

    def forward(self, q, k, v, pad):
        w = torch.matmul(q, k.transpose(-1, -2)) / 8.0
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))[None, None]
        w = torch.where(causal, w, torch.finfo(torch.float32).min) + pad
        return torch.matmul(F.softmax(w, dim=-1), v)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_two_stacked_masks_combine_into_one_additive_mask(rewrite_and_check, how):
    pad = torch.zeros(B, 1, 1, L)
    pad[0, ..., :2] = torch.finfo(torch.float32).min  # left padding of the first sequence
    gm, res = rewrite_and_check(Gpt2WhereThenPadding(), (*_qkv(hkv=HQ), pad), how, expected=1)
    assert res.sites[0].details["mask"] == "where+additive"


class Bmm3D(nn.Module):
    def forward(self, q, k, v, mask):
        s = torch.bmm(q, k.transpose(1, 2)) * 0.3 + mask
        return torch.bmm(F.dropout(torch.softmax(s, dim=2), 0.2, training=False), v)


@pytest.mark.parametrize("how", ["fx", "export"])
def test_3d_bmm_form(rewrite_and_check, how):
    q, k, v = (torch.randn(6, 7, 8) for _ in range(3))
    gm, res = rewrite_and_check(Bmm3D(), (q, k, v, torch.randn(7, 7)), how, expected=1)
    assert res.sites[0].form == "eager-bmm"


class BSHD(nn.Module):
    """q, k, v arrive as [B, S, H, D]; kᵀ is built with one permute(0, 2, 3, 1)."""

    def forward(self, q, k, v):
        s = torch.matmul(q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1)) / 8.0
        p = torch.softmax(s, dim=-1)
        return torch.matmul(p, v.transpose(1, 2))


@pytest.mark.parametrize("how", ["fx", "dynamo", "export"])
def test_bshd_key_permute_becomes_a_bhsd_key(rewrite_and_check, how):
    q, k, v = (torch.randn(B, L, HQ, D) for _ in range(3))
    gm, res = rewrite_and_check(BSHD(), (q, k, v), how, expected=1)
    assert res.sites[0].details["layout"] == "BSHD"
    (node,) = _attn_nodes(gm)
    assert tuple(val_of(node.args[1]).shape) == (B, HQ, L, D)


class KTransposeSpellings(nn.Module):
    def forward(self, q, k, v):
        a = torch.softmax(q @ k.mT, dim=-1) @ v
        b = torch.softmax(torch.matmul(q, k.permute(0, 1, 3, 2)), dim=3) @ v
        c = torch.softmax(torch.matmul(q, torch.transpose(k, 3, 2)), dim=-1) @ v
        return a, b, c


@pytest.mark.parametrize("how", ["fx", "dynamo", "export"])
def test_every_spelling_of_k_transpose(rewrite_and_check, how):
    rewrite_and_check(KTransposeSpellings(), _qkv(hkv=HQ), how, expected=3)


class RepeatInterleave(nn.Module):
    def forward(self, q, k, v):
        k, v = k.repeat_interleave(2, dim=1), torch.repeat_interleave(v, 2, dim=-3)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.2, dim=-1) @ v


@pytest.mark.parametrize("how", ["fx", "export"])
def test_repeat_interleave_folds_into_enable_gqa(rewrite_and_check, how):
    gm, res = rewrite_and_check(RepeatInterleave(), _qkv(), how, expected=1)
    assert res.sites[0].details["gqa"] == "repeat_interleave"
    assert _attn_nodes(gm)[0].kwargs["enable_gqa"] is True


class SoftmaxModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.softmax, self.drop = nn.Softmax(dim=-1), nn.Dropout(0.5)

    def forward(self, q, k, v):
        return self.drop(self.softmax(q @ k.transpose(-2, -1))) @ v


class ZeroDropoutWhileTraining(nn.Module):
    def forward(self, q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1), p=0.0, training=True) @ v


def test_dropout_with_p_zero_is_inactive_even_in_training(rewrite_and_check):
    rewrite_and_check(ZeroDropoutWhileTraining(), _qkv(hkv=HQ), "fx", expected=1)


def test_softmax_and_dropout_modules_in_eval_mode(rewrite_and_check):
    rewrite_and_check(SoftmaxModules(), _qkv(hkv=HQ), "fx", expected=1)


class Upcast(nn.Module):
    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)).float() * 0.35
        return F.softmax(s, dim=-1).to(q.dtype) @ v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_upcast_softmax_keeps_the_output_dtype(rewrite_and_check, dtype, tol):
    gm, res = rewrite_and_check(Upcast(), _qkv(hkv=HQ, dtype=dtype), "fx", expected=1, rtol=tol, atol=tol)
    assert res.sites[0].details["upcast"] is (dtype != torch.float32)
    assert val_of(_attn_nodes(gm)[0]).dtype == dtype


# -- look-alikes -----------------------------------------------------------------------------

class LookAlike(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(D, L))
        self.head_scale = nn.Parameter(torch.rand(1, HQ, 1, 1))
        self.temperature = nn.Parameter(torch.tensor(0.3))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1)
        if self.how == "softmax-other-dim":
            return torch.softmax(s, dim=-2) @ v
        if self.how == "relu-chain":
            return torch.relu(s) @ v
        if self.how == "no-transpose":
            return torch.softmax(q @ self.w, dim=-1) @ v
        if self.how == "probs-times-gate":
            return (torch.softmax(s, dim=-1) * 0.5 + 0.1) @ v
        if self.how == "mask-after-softmax":
            return (torch.softmax(s, dim=-1) + torch.randn(L, L)) @ v
        if self.how == "dropout-training":
            return F.dropout(torch.softmax(s, dim=-1), p=0.1, training=True) @ v
        if self.how == "dropout-default-training":
            return F.dropout(torch.softmax(s, dim=-1), p=0.1) @ v
        if self.how == "tensor-scale":
            return torch.softmax(s * self.head_scale, dim=-1) @ v
        if self.how == "learnable-scale":  # a 0-dim Parameter: freezing its value would be wrong
            return torch.softmax(s * self.temperature, dim=-1) @ v
        if self.how == "fill-not-masking":
            return torch.softmax(s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), 0.0), dim=-1) @ v
        if self.how == "probs-also-returned":
            p = torch.softmax(s, dim=-1)
            return p @ v, p
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", [
    "softmax-other-dim", "relu-chain", "no-transpose", "probs-times-gate", "mask-after-softmax",
    "dropout-training", "dropout-default-training", "tensor-scale", "learnable-scale", "fill-not-masking",
    "probs-also-returned",
])
def test_look_alikes_are_not_matched(capture, how):
    gm, _ = capture(LookAlike(how), _qkv(hkv=HQ), "fx")
    before = gm.code
    res = run_pipeline(gm)
    assert res.count("canonicalize_attention") == 0 and res.sites == []
    assert gm.code == before


@pytest.mark.parametrize("how", ["dropout-training", "softmax-other-dim"])
def test_look_alikes_are_not_matched_in_export_graphs(capture, how):
    gm, _ = capture(LookAlike(how), _qkv(hkv=HQ), "export")
    assert run_pipeline(gm).count("canonicalize_attention") == 0
