# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-chainzrule study-full test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The headline job: the DREG study's quick profile (report + figures in results/dreg_study/quick).
demo: $(STAMP)
	$(PY) experiments/dreg_study.py --profile quick

# ChainzRule MLP on digits with and without DREG (accuracies and per-layer terms).
demo-chainzrule: $(STAMP)
	$(PY) experiments/demo.py

study-full: $(STAMP)
	$(PY) experiments/dreg_study.py --profile full

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/vmap_seeds.py

clean:
	rm -rf $(VENV) build *.egg-info
