# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   - create .venv, install snapwriter, run the demo
#   make test   - create .venv, install the dev tools, run ruff, mypy and the test suite
# torch is pinned through constraints.txt for this path only (pyproject keeps a range).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.snapwriter-installed

.PHONY: demo test lint typecheck pytest bench bench-quick bench-compare clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: lint typecheck pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench.py

bench-quick: $(STAMP)
	$(PY) benchmarks/bench.py --quick

bench-compare: $(STAMP)
	$(PY) benchmarks/bench.py --compare --workloads 0.5GiB-190,5k,50k-small --reps 5 --check-reps 1 --case-timeout 300

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
