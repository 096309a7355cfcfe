"""graphtune: graph rewriting and kernel autotuning for LLM inference in PyTorch.

>>> import graphtune
>>> fast = graphtune.optimize(model)                                   # doctest: +SKIP
>>> compiled = torch.compile(model, backend="graphtune")               # doctest: +SKIP
>>> print(graphtune.explain(model, example_inputs))                    # doctest: +SKIP
"""
from __future__ import annotations

__version__ = "0.1.0"

from graphtune import errors, flags  # noqa: E402
from graphtune.ir import ops as _ops  # noqa: E402,F401  (registers torch.ops.graphtune.*)

__all__ = ["optimize", "explain", "Report", "Engine", "Drafter", "NGramDrafter", "LayerSkipDrafter",
           "DynamicTreeDrafter", "errors", "flags", "__version__"]


def __getattr__(name: str):
    # Lazy: importing graphtune (e.g. for torch.ops.graphtune) must not import transformers/inductor.
    if name in ("optimize", "explain", "Report"):
        from graphtune import api

        return getattr(api, name)
    if name == "Engine":
        from graphtune.runtime.engine import Engine

        return Engine
    if name in ("Drafter", "NGramDrafter", "LayerSkipDrafter", "DynamicTreeDrafter"):
        from graphtune.runtime.engine import drafters

        return getattr(drafters, name)
    raise AttributeError(f"module 'graphtune' has no attribute {name!r}")
