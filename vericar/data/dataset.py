"""The one in-memory form of a car dataset, whatever its source: a table of images with labels and hierarchy."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .hierarchy import hierarchy_table
from .images import DataError, load_image

#: Columns every source provides (bbox and size columns are optional).
REQUIRED_COLUMNS = ("filename", "split", "class_id", "class_name")
BBOX_COLUMNS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


@dataclass
class CarsDataset:
    """Images with class labels and their make / type / model / year hierarchy.

    ``table`` has one row per image: ``filename`` (relative to ``root``), ``split`` (``train``/``test``),
    ``class_id`` (1..C, as in the devkit), ``class_name``, the hierarchy columns ``make``, ``model``,
    ``family``, ``type``, ``year``, and, where the source has them, ``bbox_x1..bbox_y2`` (Pillow convention,
    end exclusive) used to crop each image, and ``width``/``height``. Row positions are the image indices that
    the split protocols and every later step use.
    """

    root: Path
    table: pd.DataFrame
    class_names: list[str]
    name: str = "cars"
    layout: str = "compact"
    crop_to_bbox: bool = True
    hierarchy: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.hierarchy = hierarchy_table(self.class_names)
        self.hierarchy.insert(0, "class_id", np.arange(1, len(self.class_names) + 1))
        levels = self.hierarchy.set_index("class_id")[["make", "model", "family", "type", "year"]]
        table = self.table.drop(columns=[c for c in levels.columns if c in self.table.columns])
        self.table = table.join(levels, on="class_id").reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        splits = ", ".join(f"{k}={v}" for k, v in self.table["split"].value_counts().sort_index().items())
        return (f"CarsDataset({self.name!r}, {len(self)} images ({splits}), {self.num_classes} classes, "
                f"{self.table['make'].nunique()} makes, layout={self.layout!r}, root={str(self.root)!r})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        """0-based class index of every image (``class_id - 1``)."""
        return self.table["class_id"].to_numpy() - 1

    def path(self, index: int) -> Path:
        return self.root / self.table["filename"].iat[index]

    def bbox(self, index: int) -> tuple[int, int, int, int] | None:
        if not self.crop_to_bbox or not all(c in self.table.columns for c in BBOX_COLUMNS):
            return None
        row = self.table.iloc[index]
        return tuple(int(row[c]) for c in BBOX_COLUMNS)

    def image(self, index: int):
        """The image at row ``index`` as an RGB PIL image, cropped to its box when the source has one."""
        return load_image(self.path(index), self.bbox(index))


def validate_table(table: pd.DataFrame, class_names: list[str], root: Path, *,
                   allow_empty_classes: bool = False, check_files: bool = True) -> pd.DataFrame:
    """Check a label table against its class list and the files on disk; raise :class:`DataError` on problems.

    Nothing is dropped or relabelled silently: unknown or missing class ids, names that disagree with
    ``class_names``, duplicated or missing files, paths leading outside ``root`` (absolute, or climbing out
    with ``..``) and classes without any image are all errors.
    """
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing_cols:
        raise DataError(f"labels for {root} lack the columns {missing_cols}; expected at least {list(REQUIRED_COLUMNS)}")
    n = len(class_names)
    ids = pd.to_numeric(table["class_id"], errors="coerce")
    bad = table[ids.isna() | (ids < 1) | (ids > n) | (ids != ids.round())]
    if len(bad):
        examples = ", ".join(f"{f} -> {c!r}" for f, c in zip(bad["filename"][:5], bad["class_id"][:5]))
        raise DataError(f"{len(bad)} images under {root} have a missing or unknown class id (valid: 1..{n}), "
                        f"e.g. {examples}. Fix the labels; no image is dropped silently.")
    table = table.assign(class_id=ids.astype(int))
    expected = np.asarray(class_names, dtype=object)[table["class_id"].to_numpy() - 1]
    mismatch = table["class_name"].astype(str).to_numpy() != expected
    if mismatch.any():
        row = table[mismatch].iloc[0]
        raise DataError(f"{mismatch.sum()} rows have a class_name that disagrees with class id's name, e.g. "
                        f"{row['filename']}: id {row['class_id']} is {class_names[row['class_id'] - 1]!r} but the "
                        f"row says {row['class_name']!r}. The labels and the class list do not belong together.")
    bad_split = ~table["split"].isin(["train", "test"])
    if bad_split.any():
        raise DataError(f"split must be 'train' or 'test'; found {sorted(table['split'][bad_split].unique())[:5]}")
    outside = _outside_root(table["filename"])
    if outside.any():
        bad_names = ", ".join(repr(f) for f in table["filename"][outside][:5])
        raise DataError(f"{outside.sum()} paths in the labels for {root} point outside the data folder, e.g. "
                        f"{bad_names}; they are not read. Give every filename relative to {root}, inside it "
                        "(no absolute paths, no '..').")
    dup = table["filename"].duplicated()
    if dup.any():
        raise DataError(f"{dup.sum()} files are listed twice, e.g. {table['filename'][dup].iloc[0]}")
    if check_files:
        exists = np.fromiter(((root / f).is_file() for f in table["filename"]), bool, len(table))
        if not exists.all():
            missing = table["filename"][~exists]
            raise DataError(f"{len(missing)} images listed in the labels are missing under {root}, e.g. "
                            f"{', '.join(missing[:5])}. Restore them or remove their rows.")
    counts = table["class_id"].value_counts()
    empty = [i for i in range(1, n + 1) if i not in counts.index]
    if empty and not allow_empty_classes:
        names = ", ".join(f"{i} {class_names[i - 1]!r}" for i in empty[:5])
        raise DataError(f"{len(empty)} classes have no images under {root}: {names}. Add images, drop those "
                        "classes from the class list, or pass allow_empty_classes=True.")
    return table


def _outside_root(filenames: pd.Series) -> np.ndarray:
    """Which relative paths leave their folder: absolute, or climbing above it with ``..`` (checked on the
    names, without touching the disk; a symbolic link inside the folder is the owner's choice and is followed)."""
    def leaves(name: str) -> bool:
        norm = os.path.normpath(str(name))
        return (os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep)
                or bool(re.match(r"^[A-Za-z]:", norm)))  # a Windows drive
    return np.fromiter((leaves(f) for f in filenames), bool, len(filenames))
