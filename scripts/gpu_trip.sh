#!/usr/bin/env bash
# The one command of a GPU trip (run by the device tool from the repository root, with carry: ["carry"]).
# carry/ is made here by `make gpu-carry`: the GPU copy of the data as one .tar.gz and the wheels the device lacks.
set -euo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python -m pip install --no-index --no-deps --quiet carry/wheels/*.whl
mkdir -p /tmp/cars && tar -xzf carry/stanford_cars_small_gpu.tar.gz -C /tmp/cars
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python scripts/gpu_trip.py --data-dir /tmp/cars/stanford_cars_small_gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_trip.log"
