# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv from pyproject.toml first; `make setup` does only that.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The stamp is newer than pyproject.toml once its dependencies are installed,
# so a second `make setup` installs nothing.
STAMP := $(VENV)/.installed
# CPU machines take torch's CPU build first, so pip never pulls a CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup browser demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py

# The report test renders report.html in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# Two pytest workers (pytest-xdist), a whole test file each at a time, the longest files first
# (tests/conftest.py): on 2 cores the suite waits on retries, timeouts and process starts
# much of the time, and the second worker fills it. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: $(STAMP)
	$(PY) jobs/bench.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
