"""The GPU-trip script (scripts/gpu_trip.py) rehearsed on CPU with tiny settings: what a GPU run brings home
fits the device's return limits (at most 8 files) and loads back as run folders."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script
from vericar.runs import load_model, load_run


def _script():
    return load_script("scripts/gpu_trip.py")


def test_gpu_trip_rehearsal_returns_loadable_runs(synthcars_tiny, tmp_path):
    trip = _script()
    out = tmp_path / "out"
    trip.main(["--dataset", "synthetic", "--data-dir", str(synthcars_tiny.root), "--synth-preset", "tiny",
               "--backbone", "tiny_cnn", "--image-size", "32", "--epochs", "1", "--batch-size", "16",
               "--seed-budget-s", "2", "--protocols", "seed", "official", "--out", str(out),
               "--work", str(tmp_path / "work")])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_trip.json", "official-model.pt", "official.tar", "seed-model.pt", "seed.tar"]
    # the device returns at most 8 files (gpu_trip.sh adds its log) of at most 16 MiB each
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)
    summary = json.loads((out / "gpu_trip.json").read_text())
    assert summary["seed_probe"]["epochs_in_budget"] == summary["runs"]["seed"]["config"]["epochs"] >= 1
    trip.main(["--unpack", str(out), "--to", str(tmp_path / "home")])
    run = load_run(tmp_path / "home" / "seed", synthcars_tiny)
    assert run.metrics["trained"] == summary["runs"]["seed"]["trained"]
    assert load_model(run).flip_tta
