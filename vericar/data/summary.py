"""What a dataset looks like: counts per class and level, image sizes, and near-duplicate photos."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .dataset import CarsDataset
from .images import to_rgb


def class_counts(cars: CarsDataset) -> pd.DataFrame:
    """Images per class and split, with the class's hierarchy; one row per class, sorted by class id."""
    counts = cars.table.pivot_table(index="class_id", columns="split", values="filename", aggfunc="count",
                                    fill_value=0)
    for split in ("train", "test"):
        if split not in counts.columns:
            counts[split] = 0
    counts = counts[["train", "test"]].rename(columns={"train": "n_train", "test": "n_test"})
    counts["n_total"] = counts["n_train"] + counts["n_test"]
    return cars.hierarchy.join(counts, on="class_id")


def imbalance(counts: pd.Series) -> dict[str, float]:
    """Min, median, max, max/min ratio and the Gini coefficient of a vector of per-class counts."""
    x = np.sort(np.asarray(counts, dtype=float))
    n = len(x)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum())) if n and x.sum() else 0.0
    return {"min": float(x.min()), "median": float(np.median(x)), "max": float(x.max()),
            "max_over_min": float(x.max() / max(x.min(), 1)), "gini": gini}


def level_counts(cars: CarsDataset) -> dict[str, pd.DataFrame]:
    """Per hierarchy level (make, type, year): number of classes and of images for each value."""
    out = {}
    per_class = class_counts(cars)
    for level in ("make", "type", "year"):
        out[level] = (per_class.groupby(level)
                      .agg(classes=("class_id", "count"), images=("n_total", "sum"))
                      .sort_values("images", ascending=False))
    return out


def scan_images(cars: CarsDataset, hash_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """Decode every image once: size, mode, a difference hash (dHash, perceptual) and any decoding error.

    Sizes are those of the image as used (after the bounding-box crop); the hash is computed on the same
    crop. Unreadable images get an ``error`` message and no hash; none is dropped.
    """
    import imagehash  # here, not at module level: training (e.g. on a bare GPU machine) never needs it

    rows = []
    for i in tqdm(range(len(cars)), desc="scanning images", disable=not progress):
        path = cars.path(i)
        try:
            with Image.open(path) as im:
                mode = im.mode
                im.load()
                box = cars.bbox(i)
                if box is not None and box != (0, 0, *im.size):
                    im = im.crop(box)
                im = to_rgb(im)  # upright, as every loader sees it
                h = imagehash.dhash(im.convert("L"), hash_size=hash_size)
                rows.append((im.size[0], im.size[1], mode, int(np.packbits(h.hash.ravel()).view(">u8")[0])
                             if hash_size == 8 else str(h), ""))
        except Exception as err:  # noqa: BLE001 - reported in the table, never swallowed
            rows.append((np.nan, np.nan, None, None, f"{type(err).__name__}: {err}"))
    out = pd.DataFrame(rows, columns=["width", "height", "mode", "dhash", "error"])
    out.insert(0, "filename", cars.table["filename"].to_numpy())
    out["aspect"] = out["width"] / out["height"]
    return out


def near_duplicate_pairs(hashes, max_distance: int = 2, block: int = 2048) -> pd.DataFrame:
    """All pairs ``(i, j)``, ``i < j``, whose 64-bit hashes differ in at most ``max_distance`` bits.

    Brute force over all pairs in blocks (XOR + popcount in numpy): 16k images take about a second. Rows
    with a missing hash (unreadable images) are ignored.
    """
    h = pd.Series(hashes)
    valid = h.notna().to_numpy()
    idx = np.flatnonzero(valid)
    values = np.array([int(v) for v in h[valid]], dtype=np.uint64)
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(values), block):
        a = values[start:start + block]
        dist = np.bitwise_count(a[:, None] ^ values[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        keep = jj > ii + start
        found_i.append(idx[ii[keep] + start])
        found_j.append(idx[jj[keep]])
        found_d.append(dist[ii[keep], jj[keep]])
    return pd.DataFrame({"i": np.concatenate(found_i), "j": np.concatenate(found_j),
                         "distance": np.concatenate(found_d).astype(int)})


def describe_pairs(cars: CarsDataset, pairs: pd.DataFrame) -> pd.DataFrame:
    """Name the images and classes of each pair and whether it crosses train/test or classes."""
    t = cars.table
    out = pairs.copy()
    for side in ("i", "j"):
        rows = t.iloc[out[side].to_numpy()]
        out[f"filename_{side}"] = rows["filename"].to_numpy()
        out[f"class_id_{side}"] = rows["class_id"].to_numpy()
        out[f"split_{side}"] = rows["split"].to_numpy()
    out["cross_split"] = out["split_i"] != out["split_j"]
    out["cross_class"] = out["class_id_i"] != out["class_id_j"]
    return out


def compare_with_reference(found: pd.DataFrame, reference: pd.DataFrame) -> dict[str, int]:
    """How many of a reference list of pairs (columns filename_a, filename_b) ``found`` recovers, and extras."""
    def key(a, b):
        return tuple(sorted((a, b)))

    ref = {key(a, b) for a, b in zip(reference["filename_a"], reference["filename_b"])}
    got = {key(a, b) for a, b in zip(found["filename_i"], found["filename_j"])}
    return {"reference_pairs": len(ref), "found_pairs": len(got), "recovered": len(ref & got),
            "missed": len(ref - got), "extra": len(got - ref)}


def box_stats(cars: CarsDataset) -> pd.DataFrame:
    """Per image: the car's box size and the share of the image it covers, where the source has boxes.

    For the compact Stanford copies the images *are* the devkit crops, so the box in the original photo
    (``orig_bbox_*``) is what tells the resolution of the source crop; coverage in the stored image is 1.
    """
    t = cars.table
    out = pd.DataFrame(index=t.index)
    if {"orig_bbox_x1", "orig_bbox_x2"} <= set(t.columns):
        out["box_width"] = t["orig_bbox_x2"] - t["orig_bbox_x1"]
        out["box_height"] = t["orig_bbox_y2"] - t["orig_bbox_y1"]
        out["box_source"] = "devkit box in the original photo"
    elif {"bbox_x1", "bbox_x2"} <= set(t.columns):
        out["box_width"] = t["bbox_x2"] - t["bbox_x1"]
        out["box_height"] = t["bbox_y2"] - t["bbox_y1"]
        out["box_source"] = "box in the image"
        if {"width", "height"} <= set(t.columns):
            out["coverage"] = out["box_width"] * out["box_height"] / (t["width"] * t["height"])
    return out


def check_images(cars: CarsDataset, progress: bool = True) -> pd.DataFrame:
    """Decode every image once and report it: ``filename``, ``mode``, ``width``, ``height`` and ``error``.

    Use it to find corrupt files before a long run: rows with a non-empty ``error`` are the unreadable
    images (the caller decides what to do; nothing is removed here). The same pass as :func:`scan_images`,
    without the hashes.
    """
    return scan_images(cars, progress=progress)[["filename", "mode", "width", "height", "error"]]


def eda_metrics(cars: CarsDataset, train_imbalance: dict[str, float], scan: pd.DataFrame, pairs: pd.DataFrame,
                agreement: dict[str, int] | None = None) -> dict[str, float]:
    """The numbers of notebook 01's results file (``results/01_eda.json``'s ``metrics``).

    ``train_imbalance``: :func:`imbalance` of the training images per class; ``scan``: :func:`scan_images`
    (rows with a non-empty ``error`` count as unreadable); ``pairs``: :func:`describe_pairs`; ``agreement``:
    :func:`compare_with_reference` when the folder ships a reference list (keys prefixed ``reference_``).
    """
    split = cars.table["split"]
    return {
        "images": len(cars), "train_images": int((split == "train").sum()), "test_images": int((split == "test").sum()),
        "classes": cars.num_classes, "makes": int(cars.hierarchy["make"].nunique()),
        "types": int(cars.hierarchy["type"].nunique()), "years": int(cars.hierarchy["year"].nunique()),
        **{f"train_per_class_{k}": train_imbalance[k] for k in ("min", "median", "max", "gini")},
        "unreadable_images": int((scan["error"] != "").sum()), "median_width": float(scan["width"].median()),
        "median_height": float(scan["height"].median()), "near_duplicate_pairs": len(pairs),
        "near_duplicates_cross_split": int(pairs["cross_split"].sum()),
        "near_duplicates_cross_class": int(pairs["cross_class"].sum()),
        **{f"reference_{k}": v for k, v in (agreement or {}).items()},
    }


def pair_panels(cars: CarsDataset, pairs: pd.DataFrame, n: int = 6) -> tuple[list, list[str]]:
    """The ``n`` near-duplicate pairs to show (cross-class pairs first, then the closest), as ``(image_i,
    image_j)`` tuples and one title per image (class name and file), for :func:`vericar.plots.pair_grid`."""
    shown = pairs.sort_values(["cross_class", "distance"], ascending=[False, True]).head(n)
    images = [(cars.image(int(r.i)), cars.image(int(r.j))) for r in shown.itertuples()]
    titles = [f"{cars.class_names[getattr(r, 'class_id_' + s) - 1][:30]}\n{getattr(r, 'filename_' + s)}"
              for r in shown.itertuples() for s in ("i", "j")]
    return images, titles
