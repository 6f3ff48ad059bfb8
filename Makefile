# Two commands do everything on a fresh machine: `make benchmark` and `make test`.
# Each creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two installs, each with its own stamp: the runtime (make install, make benchmark) and the
# development extras on top of it (make test: pytest, nbval, ruff, playwright, anomalib).
STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
# Reference mode: offline, random weights, synthetic data, CPU (see winclip_nb/nb/helpers.py).
# MKL_CBWR, ONEDNN_MAX_CPU_ISA: the same CPU kernels on every machine (REFERENCE_CPU_KERNELS).
REFERENCE_ENV := WINCLIP_NB_REFERENCE=1 HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES= MKL_CBWR=AVX2,STRICT ONEDNN_MAX_CPU_ISA=AVX2
# The anomalib parity tests fail (instead of skipping) when the [parity] extra is missing.
TEST_ENV := $(REFERENCE_ENV) WINCLIP_NB_REQUIRE_PARITY=1

.PHONY: install install-dev test test-headless unit-test nbval benchmark notebooks speed speed-methods gpu-check loc lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,parity]"
	touch $(DEV_STAMP)

## make install: the runtime only (notebooks, benchmark, CLI), what a workshop laptop needs
install: $(STAMP)

## make install-dev: the runtime plus the test and parity extras
install-dev: $(DEV_STAMP)

## make test: unit tests, the doctests of winclip_nb/core, the executed notebooks (nbval)
## and the browser test, offline (-rs lists skipped tests with their reason)
test: $(DEV_STAMP)
	$(TEST_ENV) $(PY) -m pytest tests notebooks winclip_nb/core winclip_nb/nb/exercises --doctest-modules --nbval --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider -rs -m "not headless"

## make test-headless: every notebook under plain papermill (no WINCLIP_NB_* variables),
## the CPU loaded, notebook 04's widget explorer 5 times; a hang fails (tests/test_headless.py)
test-headless: $(DEV_STAMP)
	env -u WINCLIP_NB_REFERENCE -u WINCLIP_NB_HEADLESS HF_HUB_OFFLINE=1 $(PY) -m pytest tests/test_headless.py -m headless -p no:cacheprovider -rs -s

unit-test: $(DEV_STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -p no:cacheprovider -rs -m "not headless"

nbval: $(DEV_STAMP)
	$(REFERENCE_ENV) $(PY) -m pytest notebooks --nbval --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider

## make benchmark: the benchmark with defaults ($$MVTEC_ROOT if set, else the synthetic set)
benchmark: $(STAMP)
	$(VENV)/bin/winclip-nb benchmark $(ARGS)

## make notebooks: re-execute the committed notebooks in reference mode
notebooks: $(STAMP)
	$(REFERENCE_ENV) $(VENV)/bin/winclip-nb run-notebooks --in-place --reference

speed: $(STAMP)
	$(PY) benchmarks/throughput.py --device auto --weights random $(ARGS)

## make speed-methods: images/s of every method (tokens, windows, anomalydino, musc) and anomalib's WinCLIP, one run
speed-methods: $(STAMP)
	$(PY) benchmarks/methods.py --device auto $(ARGS)

## make gpu-check: throughput, memory and fp16 agreement on a GPU (benchmarks/gpu_check.py);
## ARGS=--dry-run runs it on the CPU with tiny sizes (make test does)
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(ARGS)

## make loc: code-line budgets of the package (benchmarks/loc.py; make test checks them)
loc: $(STAMP)
	$(PY) benchmarks/loc.py --check

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check winclip_nb tests benchmarks

clean:
	rm -rf $(VENV) results .pytest_cache
