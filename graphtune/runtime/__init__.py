"""graphtune's runtime: per-batch plans, implementation selection, KV caches, generation.

:func:`install` activates every runtime feature: the selector of each op family that declares
one (:class:`graphtune.codegen.family.OpFamily`, ``selector=`` and ``priority=``), and the tuned
dispatch (priority 0: the tuned implementation and config of any op, else its default path).
Nothing is listed here: the features are derived from the family declarations. Entry points
call :func:`install`; it is idempotent, and re-activates a feature someone uninstalled.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from graphtune.codegen.family import families

__all__ = ["install", "features"]

DISPATCH = "graphtune.runtime.dispatch"  # the generic tuned dispatch: not a family, serves every family's ops


def features() -> list[tuple[str, int]]:
    """``(selector module, priority)`` of every runtime feature, highest priority first."""
    declared = [(f.selector, f.priority) for f in families() if f.selector]
    return sorted(declared, key=lambda t: -t[1]) + [(DISPATCH, 0)]


def feature_modules() -> list[ModuleType]:
    """The feature modules (imported), highest priority first."""
    return [importlib.import_module(name) for name, _ in features()]


def install() -> None:
    """Register all runtime features' planners and selectors (each feature's install is idempotent)."""
    for name, priority in features():
        importlib.import_module(name).install(priority)
