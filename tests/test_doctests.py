"""Every docstring example in the package runs and shows what it says (public API examples are
documentation users copy; a stale one is a bug)."""
import doctest
import importlib
import pkgutil

import pytest

import graphtune

MODULES = sorted(m.name for m in pkgutil.walk_packages(graphtune.__path__, "graphtune."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):  # each example sees a copy of its module's globals
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
