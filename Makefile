# Set-up is two commands: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install tools lint test bench demo serve clean

install: $(STAMP)

# torch is pinned first: 2.13.0 is the CPU wheel on local disk; an unpinned torch would pull a CUDA build. With torch,
# ninja and numpy in, the stages' C++ kernels build (stage/cpu_build.py, about 40 s) on the other core while the rest
# installs.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 ninja numpy
	$(PY) stage/cpu_build.py & build=$$!; \
		$(PY) -m pip install -q --disable-pip-version-check -e ".[test]" && wait $$build
	touch $(STAMP)

# ruff first (pyproject.toml's [tool.ruff]): a lint error or an unformatted file fails the run before any test. The suite
# runs as two pytest processes at once (tests/run_lanes.py): the testbed and Ray job-API modules, which mostly wait, beside
# the rest. PYTEST_ARGS go to both; given test paths, one pytest runs just those.
test: install tools lint
	$(PY) tests/run_lanes.py $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every benchmark in one run (under 15 minutes here): a table on stdout, bench/results/*.json and bench.png.
bench: install $(VENV)/.bench-installed
	$(PY) bench/run.py

$(VENV)/.bench-installed: pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,bench]"
	touch $@

# tmux drives the terminal-UI test; installed from Debian's packages where apt-get is at hand.
tools:
	@command -v tmux >/dev/null || { command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq tmux >/dev/null; } \
		|| echo "tmux is not installed: the terminal-UI test will be skipped"

# The demo model is downloaded (hash-pinned) and converted once, into ~/.cache/stagecoach.
demo: install
	$(VENV)/bin/stagecoach generate --config configs/demo.yaml --model "$$($(VENV)/bin/stagecoach fetch-demo-model)" \
		--ray-address local --chat --prompt "What is the capital of France? Answer in one word." \
		--temperature 0 --max-new-tokens 32

# The demo model behind the OpenAI-compatible API on http://127.0.0.1:8000 (Ctrl-C drains and stops).
serve: install
	$(VENV)/bin/stagecoach serve --config configs/demo.yaml --model "$$($(VENV)/bin/stagecoach fetch-demo-model)" \
		--ray-address local --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) .cache .pytest_cache
