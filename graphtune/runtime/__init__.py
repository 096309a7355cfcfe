"""graphtune's runtime: per-batch plans, implementation selection, KV caches, generation.

:func:`install` activates every runtime feature (tuned dispatch, shared-prefix attention, lean
decode) by registering its planner/selector in :mod:`graphtune.runtime.context`. Entry points
call it; it is idempotent, and re-activates a feature someone uninstalled.
"""
from __future__ import annotations

import importlib
import logging

__all__ = ["install", "FEATURES"]

log = logging.getLogger("graphtune.runtime")

# Runtime features, highest selector priority first; each module exposes `install()` (and
# optionally `describe(site, q_shape, k_shape)` for explain).
FEATURES = (
    "graphtune.runtime.shared_prefix",  # priority 10
    "graphtune.runtime.lean_decode",  # priority 5
    "graphtune.runtime.dispatch",  # priority 0: tuned implementation + config, else default
)


def install() -> None:
    """Register all runtime features' planners and selectors (each feature's install is idempotent)."""
    for name in FEATURES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            log.debug("runtime feature %s not available", name)
            continue
        mod.install()
