# Everything the project needs is installed here: torch first (the CPU build
# that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: demo test test-fast install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .

install-dev: $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

demo: install
	$(VENV)/bin/fedlora simulate --set simulation.test_notes=1000

# Three workers on the two cores: the end-to-end tests wait on Flower's heartbeat holds
# and on their processes, and a third worker fills those waits. The tests that start a
# Ray cluster run one at a time on one of them (tests/conftest.py). test-fast leaves
# out the slow end-to-end tests.
test: install-dev
	$(PY) -m pytest -q -ra --durations=20 -n 3 --dist loadgroup

test-fast: install-dev
	$(PY) -m pytest -q -ra --durations=10 -n 3 --dist loadgroup -m "not slow"

clean:
	rm -rf runs .pytest_cache
