"""Rewrite passes over captured graphs, and the pipeline that runs them.

Public API: :func:`run_pipeline` (what ``graphtune.optimize``, the ``torch.compile`` backend
and ``graphtune.explain`` call), :func:`validate_rewrite` (translation validation) and the
result types. The pattern engine lives in :mod:`graphtune.rewrites.pattern`, the op-kind
vocabulary in :mod:`graphtune.rewrites.kinds`; ``docs/rewrites.md`` explains how to add a pass.
"""
from graphtune.rewrites.context import AttentionSite, PassContext, PassReport, PipelineResult
from graphtune.rewrites.pattern import Any, Match, Maybe, Pat, PatternMatcher, Rule
from graphtune.rewrites.pipeline import run_pipeline
from graphtune.rewrites.validate import validate_rewrite

__all__ = [
    "run_pipeline", "validate_rewrite", "PassReport", "AttentionSite", "PipelineResult", "PassContext",
    "Pat", "Any", "Maybe", "Rule", "Match", "PatternMatcher",
]
