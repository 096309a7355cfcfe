"""Test-wide settings: Triton in interpreter mode, the IR verifier and translation validation are always on, and the
tuning database is a fresh file per test session (never the user's cache)."""
import os
import tempfile

# Triton kernels run in the interpreter (no GPU here); it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GRAPHTUNE_SPEC", "1")
os.environ.setdefault("GRAPHTUNE_VALIDATE", "1")
if "GRAPHTUNE_DB" not in os.environ:
    import atexit
    import shutil

    _db_dir = tempfile.mkdtemp(prefix="graphtune-test-")
    atexit.register(shutil.rmtree, _db_dir, True)  # the session's database goes with the session
    os.environ["GRAPHTUNE_DB"] = os.path.join(_db_dir, "tuning.db")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _uses_transformers(module) -> bool:
    import types

    import graphtune.models as zoo

    for value in vars(module).values():
        if isinstance(value, types.ModuleType) and value.__name__.split(".")[0] == "transformers":
            return True
        if getattr(value, "__module__", None) == zoo.__name__:  # build_model, demo_model, ...
            return True
    return False


def pytest_collection_modifyitems(config, items):
    # Mark Hugging Face integration tests (modules that use transformers or graphtune.models) with
    # `hf`: `make test-hf-lowest` runs them again on the lowest transformers graphtune supports.
    seen: dict[str, bool] = {}
    for item in items:
        mod = getattr(item, "module", None)
        if mod is None:
            continue
        if mod.__name__ not in seen:
            seen[mod.__name__] = _uses_transformers(mod)
        if seen[mod.__name__]:
            item.add_marker(pytest.mark.hf)
