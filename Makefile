# Two entry points, both set up the environment when it is missing:
#   make study   run every notebook through papermill (quick profile, SynthCars) into runs/quick/
#   make test    run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= quick

.PHONY: study test reference setup clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

study: $(VENV)/.installed
	$(PY) -m vericar.study --profile $(PROFILE)

# The reference run whose figures/ and results/ are committed (real data; see README).
reference: $(VENV)/.installed
	$(PY) -m vericar.study --profile full --publish

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
