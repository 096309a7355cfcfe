"""Autotuning: search (implementation, config) candidates per op and shape, store winners in the
SQLite tuning database, which :mod:`graphtune.runtime.dispatch` consults at call time.

Public entry points: :func:`tune_shapes` (measured tuning on this device), :func:`tune_static`
(rank configs for a GPU you do not have), :func:`summary_table`, :class:`AttentionShape` / :class:`MergeShape` / :class:`LeanShape`,
:class:`TuningDB` / :func:`get_db`. See ``docs/autotuning.md``.
"""
from graphtune.autotune.db import ImportReport, Record, TuningDB, get_db
from graphtune.autotune.search import STRATEGIES, Budget, CostModel, ResourceModel, parse_budget
from graphtune.autotune.shapes import (AttentionShape, LeanShape, MergeShape, ShapeKey, key_for_args, lean_key,
                                      parse_lean_shape, parse_merge_shape, parse_shape, pow2_bucket)
from graphtune.autotune.tuner import TuneResult, load_impls, summary_table, tune_shape, tune_shapes, tune_static


__all__ = [
    "AttentionShape", "MergeShape", "LeanShape", "lean_key", "parse_lean_shape", "ShapeKey", "key_for_args", "parse_shape", "parse_merge_shape", "pow2_bucket",
    "Budget", "CostModel", "ResourceModel", "STRATEGIES", "parse_budget",
    "Record", "ImportReport", "TuningDB", "get_db",
    "TuneResult", "tune_shape", "tune_shapes", "tune_static", "summary_table", "load_impls",
]
