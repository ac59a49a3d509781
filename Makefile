# Set-up is two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_MODEL ?= .cache/demo-random-model
PYTEST_ARGS ?=

.PHONY: install test demo clean

install: $(STAMP)

# torch is pinned first: 2.13.0 is the CPU wheel on local disk; an unpinned torch would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	test -f $(DEMO_MODEL)/config.json || $(VENV)/bin/stagecoach make-random-model --dir $(DEMO_MODEL)
	$(VENV)/bin/stagecoach generate --config configs/demo.yaml --ray-address local --chat \
		--prompt "Give me a short introduction to large language models." --max-new-tokens 24 --seed 0

clean:
	rm -rf $(VENV) .cache .pytest_cache
