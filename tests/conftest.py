"""Shared fixtures: small datasets written by the tests themselves, and the real data when it is present."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("MPLBACKEND", "Agg")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
REAL_SMALL = SHARED_DATA / "stanford_cars_small"
REAL_DEVKIT = SHARED_DATA / "stanford_cars_devkit"

CLASS_NAMES = ["Audi TTS Coupe 2012", "Acura TL Sedan 2012", "Dodge Dakota Club Cab 2007"]


def unit_circle(deg) -> np.ndarray:
    """Points on the unit circle at the given angles (degrees): 2-d embeddings whose ranking is easy by hand."""
    r = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def jpeg_bytes(size=(24, 16), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else (color[0] if mode == "L" else (10, 20, 30, 40))).save(
        buf, format="JPEG")
    return buf.getvalue()


def write_compact(root: Path, per_class=(4, 3), class_names=CLASS_NAMES, size=(24, 16)) -> Path:
    """A compact-layout dataset: labels.csv + class_names.txt + images/{train,test}/NNNNN.jpg."""
    rows = []
    data = jpeg_bytes(size)
    for split, n in zip(("train", "test"), per_class):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        k = 0
        for class_id, name in enumerate(class_names, start=1):
            for _ in range(n):
                k += 1
                filename = f"images/{split}/{k:05d}.jpg"
                (root / filename).write_bytes(data)
                rows.append((filename, split, class_id, name, 0, 0, size[0], size[1], size[0], size[1]))
    pd.DataFrame(rows, columns=["filename", "split", "class_id", "class_name", "bbox_x1", "bbox_y1", "bbox_x2",
                                "bbox_y2", "width", "height"]).to_csv(root / "labels.csv", index=False)
    (root / "class_names.txt").write_text("\n".join(class_names) + "\n")
    return root


@pytest.fixture
def compact_dir(tmp_path) -> Path:
    return write_compact(tmp_path / "compact")


def load_script(relative: str):
    """A script of the repository (``scripts/...``, ``benchmarks/...``: not a package) imported as a module."""
    import importlib.util

    path = PROJECT_ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def artifact_path(relative: str, tmp_path: Path) -> Path:
    """Where a test writes a file the repository publishes (the app's screenshot, the load test's latencies).

    Under tmp_path by default, so that `make test` never rewrites tracked files; into the repository only when
    asked: ``VERICAR_PUBLISH_ARTIFACTS=1 pytest tests/test_browser.py tests/test_app.py -k "browser or load"``.
    """
    root = PROJECT_ROOT if os.environ.get("VERICAR_PUBLISH_ARTIFACTS") == "1" else tmp_path
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def synthcars_tiny(tmp_path_factory):
    """The tiny SynthCars preset, generated once per test session."""
    from vericar.data import open_dataset

    return open_dataset("synthetic", tmp_path_factory.mktemp("synth") / "synthcars_tiny", synth_config="tiny",
                        progress=False)


@pytest.fixture(scope="session")
def tiny_open_world_run(synthcars_tiny, tmp_path_factory):
    """A tiny trained open-world run (tiny_cnn, 32 px, flip TTA; some classes in no database), once per session."""
    from vericar.config import TrainConfig
    from vericar.train import train

    config = TrainConfig(protocol="open-world", backbone="tiny_cnn", pretrained=False, image_size=32, epochs=1,
                         batch_size=16, m_per_class=4, device="cpu", holdout_fraction=0.3, flip_tta=True,
                         train_backbone=False, trainable_stages=1)
    root = tmp_path_factory.mktemp("tiny_open_world")
    return train(synthcars_tiny, config, root / "run", progress=False, cache_dir=root / "cache")


def annotation_struct(records: list[dict]) -> np.ndarray:
    """A MATLAB struct array like the devkit's ``annotations`` (fields in the records' key order)."""
    fields = list(records[0].keys())
    arr = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, rec in enumerate(records):
        for f in fields:
            v = rec[f]
            arr[0, i][f] = np.array([v]) if isinstance(v, str) else np.array([[v]])
    return arr


requires_real_data = pytest.mark.skipif(not REAL_SMALL.is_dir(), reason="../shared/data is not present")
requires_devkit = pytest.mark.skipif(not REAL_DEVKIT.is_dir(), reason="../shared/data devkit is not present")


#: A small end-to-end fine-tune with the MS loss: what the unit tests of training, embedding and prediction
#: exercise, independent of the reference recipe that TrainConfig's defaults hold.
FINE_TUNE_MS = dict(train_backbone=True, trainable_stages=0, loss="ms", flip_tta=False, eval_every=1)
