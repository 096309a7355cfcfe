"""graphtune's generation engine (see :mod:`graphtune.runtime.engine.engine` and ``docs/engine.md``)."""
from graphtune.runtime.engine.engine import Engine, EngineResult, EngineStats

__all__ = ["Engine", "EngineResult", "EngineStats"]
