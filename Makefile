# Every target installs what it needs first, so a fresh clone needs only `make quickstart` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install test quickstart benchmarks clean

install: $(STAMP)

# torch first, pinned: these builds lie on local disk here; other builds are multi-GB downloads.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

quickstart: install
	$(PY) train.py

benchmarks: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf outputs multirun .cache
