"""Every combination of scale x mask x GQA x softmax dtype in one eager module: one match each,
numerics equal to the original graph. Captured with torch.fx (cheap); the other vocabularies are
covered form by form in test_attention.py."""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

B, HQ, HKV, L, S, D = 2, 6, 3, 5, 7, 8
SCALES = ("none", "mul", "div", "prescaled-q")
MASKS = (None, "additive", "masked_fill", "where")
GQAS = (None, "repeat_kv", "repeat_interleave")
SOFTMAX = ("plain", "upcast")


class Configurable(nn.Module):
    def __init__(self, scale, mask, gqa, softmax):
        super().__init__()
        self.scale, self.mask, self.gqa, self.softmax = scale, mask, gqa, softmax

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
        if self.scale == "mul":
            w = w * 0.3
        elif self.scale == "div":
            w = w / 3.0
        if self.mask == "additive":
            w = w + fmask
        elif self.mask == "masked_fill":
            w = w.masked_fill(bmask, torch.finfo(torch.float32).min)
        elif self.mask == "where":
            w = torch.where(~bmask, w, torch.finfo(torch.float32).min)
        if self.softmax == "upcast":
            p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            p = F.softmax(w, dim=-1)
        return torch.matmul(F.dropout(p, 0.1, training=False), v).transpose(1, 2)


@pytest.mark.parametrize("scale,mask,gqa,softmax", list(itertools.product(SCALES, MASKS, GQAS, SOFTMAX)))
def test_every_combination_matches_once_with_equal_numerics(rewrite_and_check, scale, mask, gqa, softmax):
    hkv = HQ if gqa is None else HKV
    q, k, v = torch.randn(B, HQ, L, D), torch.randn(B, hkv, S, D), torch.randn(B, hkv, S, D)
    fmask = torch.randn(B, 1, L, S)
    bmask = torch.rand(1, 1, L, S) > 0.6
    _, res = rewrite_and_check(Configurable(scale, mask, gqa, softmax), (q, k, v, fmask, bmask), "fx", expected=1)
    d = res.sites[0].details
    assert d["scale"] == scale and d["mask"] == mask and d["gqa"] == gqa
