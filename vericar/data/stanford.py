"""Stanford Cars 196 in the layouts real users have, all read into one :class:`CarsDataset`.

Layouts (detected from the folder's contents):

``compact``
    ``labels.csv`` (filename, split, class_id, class_name, optional bbox/size columns) + ``class_names.txt``
    + ``images/``. The shared small copies and SynthCars use it.
``devkit``
    The original release: ``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat``,
    ``devkit/cars_train_annos.mat`` and the *labelled* test file ``cars_test_annos_withlabels.mat`` (in the
    root or in ``devkit/``). The devkit's own ``cars_test_annos.mat`` has no class field and is refused as a
    labelled file (read as if its last field were the class, it gives ~1,100 "classes").
``car_ims``
    The single-file layout of metric-learning repositories: ``car_ims/`` + ``cars_annos.mat``
    (``relative_im_path``, box, ``class``, ``test``).
``folders``
    One folder per class under ``train/`` and ``test/`` (e.g. ``train/BMW M3 Coupe 2012/xyz.jpg``, or deeper in
    subfolders of the class folder); class ids are the sorted class names, 1..C.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from .dataset import CarsDataset, validate_table
from .images import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LABELLED_TEST_FILE = "cars_test_annos_withlabels.mat"


def detect_layout(root: str | Path) -> str:
    """Name the layout of ``root`` (see module docstring) or raise :class:`DataError` saying what was expected."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no data folder at {root}. Pass data_dir= the folder of a Stanford Cars copy "
                        "(see README, 'Real data'), or use dataset='synthetic' for the built-in SynthCars.")
    if (root / "labels.csv").is_file():
        return "compact"
    if _find(root, "cars_meta.mat") is not None and (root / "cars_train").is_dir():
        return "devkit"
    if (root / "cars_annos.mat").is_file() and (root / "car_ims").is_dir():
        return "car_ims"
    if (root / "train").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()):
        return "folders"
    raise DataError(
        f"{root} matches no known Stanford Cars layout. Expected one of: labels.csv + images/ (compact); "
        "cars_train/ + devkit/cars_meta.mat + devkit/cars_train_annos.mat + cars_test_annos_withlabels.mat "
        "(devkit); car_ims/ + cars_annos.mat; or train/<class name>/ and test/<class name>/ folders. See README.")


def load_stanford_cars(root: str | Path, *, crop_to_bbox: bool = True, require_test_labels: bool = True,
                       allow_empty_classes: bool = False, name: str = "Stanford Cars 196") -> CarsDataset:
    """Load Stanford Cars (or anything in one of its layouts) from ``root`` and validate it.

    ``crop_to_bbox`` crops each image to its annotated box where the layout has boxes (the compact copies are
    already crops). With ``require_test_labels=False`` a devkit folder without the labelled test file loads
    its train split only, with a warning, instead of failing.
    """
    root = Path(root)
    layout = detect_layout(root)
    reader = {"compact": _read_compact, "devkit": _read_devkit, "car_ims": _read_car_ims,
              "folders": _read_folders}[layout]
    if layout == "devkit":
        table, class_names = reader(root, require_test_labels=require_test_labels)
    else:
        table, class_names = reader(root)
    table = validate_table(table, class_names, root, allow_empty_classes=allow_empty_classes)
    return CarsDataset(root=root, table=table, class_names=class_names, name=name, layout=layout,
                       crop_to_bbox=crop_to_bbox)


# -- compact -----------------------------------------------------------------------------------------------

def _read_compact(root: Path) -> tuple[pd.DataFrame, list[str]]:
    try:
        table = pd.read_csv(root / "labels.csv")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"cannot read {root / 'labels.csv'}: {err}") from err
    names_file = root / "class_names.txt"
    if names_file.is_file():
        try:
            text = names_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{names_file} is not UTF-8 text ({err}); save it as UTF-8, e.g. "
                            f"iconv -f latin1 -t utf-8 (its names must match labels.csv)") from err
        class_names = [line.strip() for line in text.splitlines() if line.strip()]
    elif {"class_id", "class_name"} <= set(table.columns):
        pairs = table[["class_id", "class_name"]].drop_duplicates().sort_values("class_id")
        if list(pairs["class_id"]) != list(range(1, len(pairs) + 1)):
            raise DataError(f"{root} has no class_names.txt and its labels.csv does not name classes 1..C")
        class_names = list(pairs["class_name"])
    else:
        raise DataError(f"{root} has labels.csv but neither class_names.txt nor a class_name column")
    return table, class_names


# -- devkit ------------------------------------------------------------------------------------------------

def _find(root: Path, filename: str) -> Path | None:
    for candidate in (root / filename, root / "devkit" / filename):
        if candidate.is_file():
            return candidate
    return None


def _loadmat(path: str | Path) -> dict:
    """``scipy.io.loadmat``, with a damaged or foreign file reported by name."""
    try:
        return scipy.io.loadmat(path)
    except Exception as err:  # scipy raises ValueError, TypeError, OSError, MatReadError ... on bad files
        raise DataError(f"cannot read the MATLAB file {path} ({type(err).__name__}: {err}); it is damaged or not "
                        "a Stanford Cars devkit file. Download it again (see README, 'Real data').") from err


def read_class_names(meta_mat: str | Path) -> list[str]:
    """The class names of a devkit ``cars_meta.mat`` (or ``cars_annos.mat``), in class-id order."""
    mat = _loadmat(meta_mat)
    if "class_names" not in mat:
        raise DataError(f"{meta_mat} has no 'class_names' field; is it the devkit's cars_meta.mat?")
    return [str(np.asarray(v).ravel()[0]) for v in mat["class_names"].ravel()]


def read_devkit_annotations(annos_mat: str | Path, *, labelled: bool = True) -> pd.DataFrame:
    """Read a devkit annotation file: ``fname``, the box (converted to end-exclusive) and ``class_id``.

    With ``labelled=True`` (the default) a file without a ``class`` field is refused: the devkit's
    ``cars_test_annos.mat`` has five fields (box + fname) and no label.
    """
    mat = _loadmat(annos_mat)
    if "annotations" not in mat:
        raise DataError(f"{annos_mat} has no 'annotations' field; is it a Stanford Cars devkit annotation file?")
    annos = mat["annotations"].ravel()
    fields = annos.dtype.names or ()
    if labelled and "class" not in fields:
        raise DataError(
            f"{annos_mat} has no class labels (fields: {', '.join(fields)}). The devkit's cars_test_annos.mat "
            f"is unlabelled; reading its last field as the class makes ~1,100 fake classes. Use "
            f"{LABELLED_TEST_FILE} (the labelled test annotations) instead, or load the train split only "
            "(require_test_labels=False).")

    def column(name):
        return [np.asarray(a[name]).ravel()[0] for a in annos]

    table = pd.DataFrame({"fname": [str(v) for v in column("fname")]})
    table = table.join(_devkit_boxes(column))
    if "class" in fields:
        table["class_id"] = np.asarray(column("class"), dtype=np.int64)
    return table


def _devkit_boxes(column) -> pd.DataFrame:
    """Devkit boxes are 1-based and inclusive (MATLAB); return them 0-based with an exclusive end (Pillow)."""
    x1, y1, x2, y2 = (np.asarray(column(f"bbox_{s}"), dtype=np.int64) for s in ("x1", "y1", "x2", "y2"))
    return pd.DataFrame({"bbox_x1": x1 - 1, "bbox_y1": y1 - 1, "bbox_x2": x2, "bbox_y2": y2})


def _read_devkit(root: Path, *, require_test_labels: bool) -> tuple[pd.DataFrame, list[str]]:
    class_names = read_class_names(_find(root, "cars_meta.mat"))
    train_annos = _find(root, "cars_train_annos.mat")
    if train_annos is None:
        raise DataError(f"{root} looks like the devkit layout but devkit/cars_train_annos.mat is missing")
    parts = [read_devkit_annotations(train_annos).assign(split="train", folder="cars_train")]
    test_annos = _find(root, LABELLED_TEST_FILE)
    if test_annos is not None:
        parts.append(read_devkit_annotations(test_annos).assign(split="test", folder="cars_test"))
    elif require_test_labels:
        raise DataError(
            f"{root} has no {LABELLED_TEST_FILE} (the devkit ships test annotations without labels). Put the "
            f"labelled file in {root} or {root / 'devkit'}, or pass require_test_labels=False to load the "
            "train split only.")
    else:
        import warnings
        warnings.warn(f"{root}: no {LABELLED_TEST_FILE}; loading the train split only", stacklevel=3)
    table = pd.concat(parts, ignore_index=True)
    table["filename"] = table["folder"] + "/" + table["fname"]
    table["class_name"] = _names_for(table["class_id"], class_names)
    return table.drop(columns=["fname", "folder"]), class_names


def _names_for(class_ids: pd.Series, class_names: list[str]) -> list[str]:
    n = len(class_names)
    return [class_names[i - 1] if 1 <= i <= n else f"<unknown class {i}>" for i in class_ids]


# -- car_ims + cars_annos.mat ------------------------------------------------------------------------------

def _read_car_ims(root: Path) -> tuple[pd.DataFrame, list[str]]:
    mat_path = root / "cars_annos.mat"
    class_names = read_class_names(mat_path)
    mat = _loadmat(mat_path)
    if "annotations" not in mat:
        raise DataError(f"{mat_path} has no 'annotations' field; is it the cars_annos.mat of the car_ims layout?")
    annos = mat["annotations"].ravel()
    fields = annos.dtype.names or ()
    needed = {"relative_im_path", "class", "test"}
    if not needed <= set(fields):
        raise DataError(f"{mat_path} lacks the fields {sorted(needed - set(fields))}; expected relative_im_path, "
                        "bbox_x1..bbox_y2, class, test")

    def column(name):
        return [np.asarray(a[name]).ravel()[0] for a in annos]

    table = pd.DataFrame({
        "filename": [str(v) for v in column("relative_im_path")],
        "split": np.where(np.asarray(column("test"), dtype=int) == 1, "test", "train"),
        "class_id": np.asarray(column("class"), dtype=np.int64),
    })
    if {"bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"} <= set(fields):
        table = table.join(_devkit_boxes(column))
    table["class_name"] = _names_for(table["class_id"], class_names)
    return table, class_names


# -- one folder per class ----------------------------------------------------------------------------------

def _read_folders(root: Path) -> tuple[pd.DataFrame, list[str]]:
    splits = [s for s in ("train", "test") if (root / s).is_dir()]
    class_names = sorted({p.name for s in splits for p in (root / s).iterdir() if p.is_dir()})
    rows = []
    for split in splits:
        for class_id, name in enumerate(class_names, start=1):
            folder = root / split / name
            if not folder.is_dir():
                continue
            for f in sorted(folder.rglob("*")):  # images in subfolders of a class folder belong to it
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    rows.append((f.relative_to(root).as_posix(), split, class_id, name))
    table = pd.DataFrame(rows, columns=["filename", "split", "class_id", "class_name"])
    return table, class_names
