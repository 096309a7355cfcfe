"""merge_states's CPU implementation cpu.torch: registered by the family's cpu module, every config exact."""
import pytest
import torch

from graphtune.codegen.registry import KernelConfig, get_impl, impls_for

import graphtune.codegen.merge_states.cpu  # noqa: F401  (registers cpu.torch)


def test_cpu_torch_is_registered_for_merge_states():
    impl = get_impl("merge_states", "cpu.torch")
    assert impl is not None and impl in impls_for("merge_states", "cpu")
    outs = [torch.randn(2, 3, 4)]
    assert impl.supports((outs, [torch.randn(2, 3)]))
    assert impl.configs((outs, [torch.randn(2, 3)])) == [KernelConfig.make(STACKED=1), KernelConfig.make(STACKED=0)]


@pytest.mark.parametrize("stacked", [0, 1])
def test_merge_states_torch_matches_float64_with_empty_partials(stacked):
    outs = [torch.randn(2, 3, 5, 8) for _ in range(4)]
    lses = [torch.randn(2, 3, 5) for _ in range(4)]
    lses[1][0, 0, 0] = float("-inf")
    for l in lses:  # row (1, 2, 4) is empty in every partial
        l[1, 2, 4] = float("-inf")
    outs[1][0, 0, 0] = 0.0
    impl = get_impl("merge_states", "cpu.torch")
    out, lse = impl.fn(outs, lses, config=KernelConfig.make(STACKED=stacked))
    w = torch.softmax(torch.stack([l.double() for l in lses]), 0).nan_to_num(0.0)
    want = (w[..., None] * torch.stack([o.double() for o in outs])).sum(0)
    assert torch.isneginf(lse[1, 2, 4]) and (out[1, 2, 4] == 0).all()
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(torch.stack([l.double() for l in lses]), 0),
                               atol=1e-5, rtol=1e-6)
