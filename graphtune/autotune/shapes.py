"""The tuning keys of every op family, for :mod:`graphtune.autotune`'s public API and the CLI.

Each key lives in its family's folder (``graphtune/codegen/<family>/key.py``, named by the
family's declaration); the shared parts (:class:`ShapeKey`, :func:`pow2_bucket`) in
:mod:`graphtune.codegen.tuning_key`. This module re-exports them.
"""
from __future__ import annotations

from graphtune.codegen.attention.key import ATTENTION_OP, AttentionShape, key_for_args, parse_shape
from graphtune.codegen.lean_decode.key import LEAN_OP, LeanShape, lean_key, parse_lean_shape
from graphtune.codegen.merge_states.key import MERGE_OP, MergeShape, key_for_merge_args, parse_merge_shape
from graphtune.codegen.shared_prefix.key import SUFFIX_MERGE_OP, SuffixMergeShape
from graphtune.codegen.tuning_key import ShapeKey, pow2_bucket

__all__ = ["AttentionShape", "MergeShape", "LeanShape", "SuffixMergeShape", "ShapeKey", "pow2_bucket", "key_for_args",
           "key_for_merge_args", "lean_key", "parse_shape", "parse_merge_shape", "parse_lean_shape", "ATTENTION_OP",
           "MERGE_OP", "LEAN_OP", "SUFFIX_MERGE_OP"]
