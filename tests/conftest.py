"""Test-wide settings: Triton in interpreter mode, the IR verifier and translation validation are always on, and the
tuning database is a fresh file per test session (never the user's cache)."""
import os
import tempfile

# Triton kernels run in the interpreter (no GPU here); it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRAPHTUNE_SPEC", "1")
os.environ.setdefault("GRAPHTUNE_VALIDATE", "1")
os.environ.setdefault("GRAPHTUNE_DB", os.path.join(tempfile.mkdtemp(prefix="graphtune-test-"), "tuning.db"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
