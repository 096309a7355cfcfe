"""Fixtures shared by the runtime tests."""
from types import SimpleNamespace

import pytest

from graphtune import flags
from graphtune.runtime import shared_prefix as sp


@pytest.fixture
def spy(monkeypatch):
    """Records the shapes of the shared-prefix decode (``run_dense``) and prefill-dedup
    (``run_dedup``) calls, with thresholds low enough for the small test models (the defaults are
    measured for real sizes)."""
    calls = SimpleNamespace(decode=[], prefill=[])
    real, real_dedup = sp.run_dense, sp.run_dedup
    monkeypatch.setattr(sp, "run_dense", lambda *a, **kw: calls.decode.append(a[1].shape) or real(*a, **kw))
    monkeypatch.setattr(sp, "run_dedup", lambda *a, **kw: calls.prefill.append(a[1].shape) or real_dedup(*a, **kw))
    with flags.Context(SHARED_PREFIX_MIN_PREFIX=16, SHARED_PREFIX_MIN_ROWS=2):
        yield calls
