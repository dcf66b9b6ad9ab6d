"""Data: one in-memory form (:class:`CarsDataset`) read from several on-disk sources.

>>> cars = open_dataset("synthetic", "data/synthcars")          # generated on first use
>>> cars = open_dataset("stanford_cars", "../shared/data/stanford_cars_small")
>>> split = make_split(cars, "official")
"""

from __future__ import annotations

from pathlib import Path

from .dataset import CarsDataset, validate_table
from .hierarchy import BODY_TYPES, LEVELS, CarLabel, hierarchy_table, level_keys, parse_class_name
from .images import CorruptImageError, DataError, load_image
from .splits import HOLDOUT_UNITS, PROTOCOLS, SSB_DIFFICULTIES, Split, make_split, ssb_class_split, validation_split
from .summary import check_images
from .stanford import detect_layout, load_stanford_cars, read_class_names, read_devkit_annotations

DATASETS = ("synthetic", "stanford_cars")


def open_dataset(dataset: str, data_dir: str | Path, *, synth_config="default", progress: bool = True,
                 **load_kwargs) -> CarsDataset:
    """Open ``dataset`` (``"synthetic"`` or ``"stanford_cars"``) from ``data_dir``.

    ``synthetic`` generates SynthCars into ``data_dir`` on first use (deterministic from its config: a
    ``SynthCarsConfig`` or a preset name, ``"default"`` or ``"tiny"``) and reuses it afterwards;
    ``stanford_cars`` reads any supported layout (see :mod:`vericar.data.stanford`).
    """
    if dataset == "synthetic":
        from .synthetic import SynthCarsConfig, make_synthcars

        if isinstance(synth_config, str):
            presets = {"default": SynthCarsConfig, "tiny": SynthCarsConfig.tiny}
            if synth_config not in presets:
                raise ValueError(f"unknown SynthCars preset {synth_config!r}; choose one of {sorted(presets)}")
            synth_config = presets[synth_config]()
        root = make_synthcars(data_dir, synth_config, progress=progress)
        return load_stanford_cars(root, name="SynthCars", **load_kwargs)
    if dataset == "stanford_cars":
        return load_stanford_cars(data_dir, **load_kwargs)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")


__all__ = [
    "BODY_TYPES", "CarLabel", "CarsDataset", "CorruptImageError", "DATASETS", "DataError", "HOLDOUT_UNITS",
    "LEVELS", "PROTOCOLS", "Split", "check_images", "detect_layout", "hierarchy_table",
    "level_keys", "load_image", "load_stanford_cars", "make_split", "open_dataset", "parse_class_name",
    "read_class_names", "read_devkit_annotations", "SSB_DIFFICULTIES", "ssb_class_split", "validate_table",
    "validation_split",
]
