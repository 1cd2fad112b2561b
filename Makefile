# Every target installs what it needs first, so a fresh clone needs only `make quickstart` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install test test-fast quickstart benchmarks clean

install: $(STAMP)

# torch first, pinned: these builds lie on local disk here; other builds are multi-GB downloads.
# The dev extra adds pytest and the optuna and diffusers extras the suite uses.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# PYTEST_ARGS narrows a run, e.g. make test-fast PYTEST_ARGS='tests/test_cli.py -x'
# TEST_WORKERS: pytest-xdist processes, whole files each (module fixtures train once); tests use 1 thread each
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# the edit loop: everything but the end-to-end runs marked slow
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

quickstart: install
	$(PY) train.py

benchmarks: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf outputs multirun .cache
