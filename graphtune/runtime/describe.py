"""Human-readable description of which implementation serves an attention site (for explain)."""
from __future__ import annotations

from typing import Any

from graphtune.runtime import feature_modules

__all__ = ["implementation"]


def implementation(site: Any, q_shape: tuple | None, k_shape: tuple | None) -> str:
    """Ask each runtime feature (highest priority first) how it would serve this site.

    A feature module may define ``describe(site, q_shape, k_shape) -> str | None``: the
    specialized paths (shared prefix, lean decode) say when they take over, and the tuned
    dispatch says which implementation serves the call otherwise.
    """
    notes = []
    for mod in feature_modules():
        fn = getattr(mod, "describe", None)
        note = fn(site, q_shape, k_shape) if callable(fn) else None
        if note:
            notes.append(note)
    return "; ".join(notes) if notes else "graphtune.attention default path"
