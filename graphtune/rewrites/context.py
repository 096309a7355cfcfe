"""Results and bookkeeping of the rewrite pipeline: pass reports, attention sites, the pass context."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx

from graphtune import flags
from graphtune.flags import Options

__all__ = ["PassReport", "AttentionSite", "PipelineResult", "PassContext", "module_path"]


@dataclass
class PassReport:
    """One pass of the pipeline and how many rewrites it made."""

    name: str
    matches: int


@dataclass
class AttentionSite:
    """One attention computation replaced by ``graphtune.attention``.

    ``node`` is the new node's name, ``module_path`` the innermost module it came from (``""`` if
    unknown), ``form`` the matched form (``"sdpa"``, ``"eager-matmul"``, ``"eager-bmm"``,
    ``"eager-baddbmm"``, ``"eager-einsum"``) and ``details`` how it was written: ``scale``
    (``"div"``, ``"mul"``, ``"alpha"`` (baddbmm), ``"prescaled-q"``, ``"prescaled-k"``, ``"none"``,
    ``"default"``, ``"explicit"``), ``mask`` (``"additive"``, ``"masked_fill"``, ``"where"``,
    ``"bool"``, ``"causal"``, None, two stacked stages such as ``"where+additive"``, and a
    ``"bias"`` prefix for baddbmm's bias, e.g. ``"bias+additive"``), ``gqa`` (``"repeat_kv"``,
    ``"repeat_interleave"``, ``"sdpa"`` or None), ``upcast`` (softmax computed in a wider dtype)
    and ``layout`` (``"BHSD"``; ``"BSHD"`` when q/k/v or the output had to be permuted from
    ``[B, S, H, D]``; ``"permuted"`` for other einsum layouts).
    """

    node: str
    module_path: str
    form: str
    details: dict
    impl: str = "graphtune.attention"


@dataclass
class PipelineResult:
    """The rewritten graph, one report per pass (in order) and every attention site."""

    gm: fx.GraphModule
    passes: list[PassReport]
    sites: list[AttentionSite]

    def count(self, pass_name: str) -> int:
        """Total matches of the pass called ``pass_name`` (KeyError naming the passes if unknown)."""
        hits = [p.matches for p in self.passes if p.name == pass_name]
        if not hits:
            raise KeyError(f"no pass named {pass_name!r}; passes run: {[p.name for p in self.passes]}")
        return sum(hits)


def module_path(node: fx.Node) -> str:
    """Innermost module of ``node`` from ``nn_module_stack``, as a dotted path (``"layers.0.attn"``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    # Dynamo spells paths "L['self'].layers[0].attn"; torch.export "layers.0.attn".
    for prefix in ("L['self'].", "L['self']", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path.replace("[", ".").replace("]", "").replace("'", "")


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run; passes append to ``sites``."""

    gm: fx.GraphModule
    options: Options
    verify: Callable[[fx.GraphModule], None] | None = None
    passes: list[PassReport] = field(default_factory=list)
    sites: list[AttentionSite] = field(default_factory=list)

    def run(self, name: str, rewrite: object, enabled: bool = True) -> int:
        """Run one pass: a :class:`~graphtune.rewrites.pattern.PatternMatcher` or ``fn(gm, ctx) -> int``.

        Leaves the module recompiled, lints the graph, logs the pass (``GRAPHTUNE_DEBUG>=1``: its
        match count, ``>=2``: the graph after it) and calls the verifier; a disabled pass is
        reported with 0 matches.
        """
        n = 0
        if enabled:
            apply = getattr(rewrite, "apply", None)
            if apply is not None:
                n = apply(self.gm, self)  # a PatternMatcher recompiles when it changed something
            else:
                n = rewrite(self.gm, self)
                self.gm.recompile()
            self.gm.graph.lint()
        self.passes.append(PassReport(name, n))
        debug = flags.get("DEBUG")
        if debug >= 1:
            print(f"[graphtune] pass {name}: {n} match{'es' if n != 1 else ''}", file=sys.stderr)
        if debug >= 2:
            print(self.gm.code, file=sys.stderr)
        if self.verify is not None:
            self.verify(self.gm)
        return n
