"""The runtime's Triton lean path (what CUDA tensors get), run on CPU in the Triton interpreter:
same result as masked attention, tables built once per batch, fallback with a warning."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before graphtune.codegen.lean_decode.triton_kernels is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graphtune import flags  # noqa: E402
from graphtune.runtime import context  # noqa: E402
from graphtune.runtime import lean_decode as ld  # noqa: E402


@pytest.fixture
def triton_path():
    ld.install()
    try:
        with flags.Context(LEAN_TRITON_ON_CPU=True):
            yield
    finally:
        ld.uninstall()


def _case(lengths, lq, causal):
    S = max(lengths)
    hf_mask = (torch.arange(S)[None, :] >= torch.tensor([S - n for n in lengths])[:, None]).long()
    allowed = hf_mask.bool()[:, None, None, :].expand(-1, 1, lq, S)
    if causal:
        allowed = allowed & (torch.arange(S)[None, :] <= S - lq + torch.arange(lq)[:, None])
    q = torch.randn(len(lengths), 4, lq, 16)
    k, v = torch.randn(len(lengths), 2, S, 16), torch.randn(len(lengths), 2, S, 16)
    return hf_mask, allowed, q, k, v


@pytest.mark.parametrize("lq, causal", [(1, False), (4, True)])
def test_triton_lean_path_matches_masked_attention_and_reuses_tables(triton_path, lq, causal):
    hf_mask, mask, q, k, v = _case([90, 4, 33, 5], lq, causal)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with flags.Context(LEAN_MIN_SKEW=0.0), context.batch_context(attention_mask=hf_mask) as ctx:
        got1 = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
        got2 = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)  # second "layer"
        batch = ctx.plans[ld.PLAN_NAME]
    assert batch.calls == 2 and len(batch.programs) == 1  # one plan + table upload per batch
    torch.testing.assert_close(got1, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got2, want, atol=2e-5, rtol=2e-5)


def test_triton_lean_path_falls_back_with_a_warning(triton_path, monkeypatch):
    from graphtune.codegen.lean_decode import triton_kernels as lean_triton

    def broken(*a, **kw):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(lean_triton, "lean_attention_triton", broken)
    hf_mask, mask, q, k, v = _case([40, 3], 1, False)
    with flags.Context(LEAN_MIN_SKEW=0.0), context.batch_context(attention_mask=hf_mask):
        with pytest.warns(RuntimeWarning, match="no kernel today"):
            got = torch.ops.graphtune.attention(q, k, v, mask, False, None, True)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)
