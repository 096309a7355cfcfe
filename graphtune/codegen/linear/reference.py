"""Pure-torch reference of the ``linear`` op: ``x @ W^T + b`` in float64."""
from __future__ import annotations

from torch import Tensor

__all__ = ["linear_ref"]


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, None]:
    """``(x @ weight^T + bias, None)`` computed in float64, returned in ``x``'s dtype.

    ``x [M, K]``, ``weight [N, K]``, ``bias [N]`` or None -> ``[M, N]``. The second element is the
    op family convention's LSE slot (a linear has none).

    >>> import torch
    >>> x, w = torch.randn(3, 8), torch.randn(5, 8)
    >>> torch.allclose(linear_ref(x, w)[0], x @ w.T, atol=1e-5)
    True
    """
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype), None
