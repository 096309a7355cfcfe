"""Translation validation: run the original and the rewritten graph and compare every output."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from graphtune.errors import TranslationValidationError

__all__ = ["validate_rewrite"]


def validate_rewrite(original: fx.GraphModule, rewritten: fx.GraphModule, example_inputs: Sequence,
                     rtol: float, atol: float) -> None:
    """Run both graphs on real ``example_inputs`` and raise if any output differs.

    Outputs are compared leaf by leaf (pytree order): tensors by shape, dtype and
    ``allclose(rtol, atol)`` with NaNs equal, everything else by ``==``.

    Raises
    ------
    TranslationValidationError
        Naming the first mismatching output (index, node name) and how it differs.

    Examples
    --------
    >>> import torch, torch.fx as fx
    >>> a = fx.symbolic_trace(lambda x: x * 2)
    >>> b = fx.symbolic_trace(lambda x: x + x)
    >>> validate_rewrite(a, b, [torch.randn(3)], rtol=1e-5, atol=1e-5)
    """
    with torch.no_grad():
        want = original(*example_inputs)
        got = rewritten(*example_inputs)
    want_flat, want_spec = tree_flatten(want)
    got_flat, got_spec = tree_flatten(got)
    if want_spec != got_spec:
        raise TranslationValidationError(f"rewritten graph returns {got_spec}, original returns {want_spec}")
    names = _output_names(rewritten)
    for i, (w, g) in enumerate(zip(want_flat, got_flat)):
        where = f"output {i}" + (f" ({names[i]})" if i < len(names) else "")
        if isinstance(w, torch.Tensor) != isinstance(g, torch.Tensor):
            raise TranslationValidationError(
                f"{where}: original gives {type(w).__name__}, rewritten {type(g).__name__}")
        if not isinstance(w, torch.Tensor):
            if w != g:
                raise TranslationValidationError(f"{where}: original gives {w!r}, rewritten {g!r}")
            continue
        if w.shape != g.shape or w.dtype != g.dtype:
            raise TranslationValidationError(
                f"{where}: original is {w.dtype}{list(w.shape)}, rewritten is {g.dtype}{list(g.shape)}")
        if not torch.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
            diff = (g.double() - w.double()).abs().nan_to_num(float("inf"))
            raise TranslationValidationError(
                f"{where}: max abs difference {diff.max().item():.3g} "
                f"at index {_unravel(int(diff.argmax()), w.shape)}, "
                f"beyond rtol={rtol} atol={atol}")


def _output_names(gm: fx.GraphModule) -> list[str]:
    out = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    if out is None:
        return []
    flat, _ = tree_flatten(out.args[0])
    return [a.name if isinstance(a, fx.Node) else repr(a) for a in flat]


def _unravel(i: int, shape: torch.Size) -> tuple:
    idx = []
    for s in reversed(shape):
        idx.append(i % s)
        i //= s
    return tuple(reversed(idx))
