"""The rewrite pipeline: one function listing graphtune's passes in order."""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from graphtune.flags import Options
from graphtune.rewrites.attention import pm_canonicalize_attention
from graphtune.rewrites.context import PassContext, PipelineResult

__all__ = ["run_pipeline"]


def run_pipeline(gm: fx.GraphModule, options: Options | None = None,
                 verify: Callable[[fx.GraphModule], None] | None = None) -> PipelineResult:
    """Run graphtune's rewrite passes over ``gm`` in place and report what they did.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        A captured graph whose value nodes carry ``meta["val"]`` (fx, Dynamo or export vocabulary).
    options : graphtune.flags.Options, optional
        Which optional passes run; defaults to ``Options()``.
    verify : callable, optional
        Called with ``gm`` after every pass (the IR verifier, under ``GRAPHTUNE_SPEC``).

    Returns
    -------
    PipelineResult
        ``gm`` (rewritten and recompiled), one :class:`PassReport` per pass and one
        :class:`AttentionSite` per attention replaced by ``graphtune.attention``.

    Examples
    --------
    >>> import torch, torch.fx as fx, torch.nn.functional as F
    >>> from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    >>> gm = fx.symbolic_trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    >>> x = torch.randn(1, 2, 4, 8)
    >>> _ = FakeTensorProp(gm).propagate(x, x, x)
    >>> res = run_pipeline(gm)
    >>> res.count("canonicalize_attention"), res.sites[0].form, res.sites[0].details["mask"]
    (1, 'sdpa', 'causal')
    """
    ctx = PassContext(gm, options or Options(), verify)
    # Every attention form (SDPA, eager matmul/bmm chains, repeat_kv GQA) -> graphtune.attention.
    ctx.run("canonicalize_attention", pm_canonicalize_attention)
    # Add a pass with one line here: ctx.run("<name>", <rules or gm -> matches>, enabled=<option>).
    # Only exact, shape-static transformations belong here; data-dependent or approximate choices
    # (shared prefix, lean decode, sparsity, speculation) are runtime selectors (graphtune.runtime).
    return PipelineResult(gm, ctx.passes, ctx.sites)
