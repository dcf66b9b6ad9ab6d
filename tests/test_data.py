"""Data layer: every layout loads into the same form, and every bad input fails with a message naming the fix."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from conftest import (CLASS_NAMES, REAL_DEVKIT, REAL_SMALL, annotation_struct, jpeg_bytes, requires_devkit,
                      requires_real_data, write_compact)
from vericar.data import (CorruptImageError, DataError, check_images, detect_layout, load_image, load_stanford_cars,
                          open_dataset, read_devkit_annotations)

# -- the compact layout ------------------------------------------------------------------------------------


def test_compact_layout_loads_with_hierarchy(compact_dir):
    cars = load_stanford_cars(compact_dir)
    assert cars.layout == "compact" and len(cars) == 21 and cars.num_classes == 3
    row = cars.table.iloc[0]
    assert (row["make"], row["model"], row["type"], row["year"]) == ("Audi", "TTS Coupe", "Coupe", 2012)
    assert set(cars.table["type"]) == {"Coupe", "Sedan", "Pickup"}
    assert list(cars.labels[:4]) == [0, 0, 0, 0]
    image = cars.image(0)
    assert image.mode == "RGB" and image.size == (24, 16)
    assert "3 classes" in repr(cars)


def test_bbox_crop_uses_end_exclusive_boxes(tmp_path):
    root = write_compact(tmp_path / "c", size=(40, 30))
    t = pd.read_csv(root / "labels.csv")
    t[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]] = [5, 4, 25, 14]
    t.to_csv(root / "labels.csv", index=False)
    assert load_stanford_cars(root).image(0).size == (20, 10)
    assert load_stanford_cars(root, crop_to_bbox=False).image(0).size == (40, 30)


def test_unknown_class_id_is_an_error(compact_dir):
    t = pd.read_csv(compact_dir / "labels.csv")
    t.loc[3, "class_id"] = 7
    t.to_csv(compact_dir / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"unknown class id \(valid: 1\.\.3\)"):
        load_stanford_cars(compact_dir)


def test_missing_class_id_is_an_error(compact_dir):
    t = pd.read_csv(compact_dir / "labels.csv")
    t.loc[2, "class_id"] = np.nan
    t.to_csv(compact_dir / "labels.csv", index=False)
    with pytest.raises(DataError, match="missing or unknown class id"):
        load_stanford_cars(compact_dir)


def test_name_disagreeing_with_id_is_an_error(compact_dir):
    t = pd.read_csv(compact_dir / "labels.csv")
    t.loc[0, "class_name"] = CLASS_NAMES[1]
    t.to_csv(compact_dir / "labels.csv", index=False)
    with pytest.raises(DataError, match="disagrees"):
        load_stanford_cars(compact_dir)


def test_listed_but_missing_image_is_an_error(compact_dir):
    (compact_dir / "images" / "train" / "00002.jpg").unlink()
    with pytest.raises(DataError, match=r"1 images listed in the labels are missing.*00002\.jpg"):
        load_stanford_cars(compact_dir)


def test_empty_class_is_an_error_unless_allowed(compact_dir):
    names = CLASS_NAMES + ["Volvo 240 Sedan 1993"]
    (compact_dir / "class_names.txt").write_text("\n".join(names))
    with pytest.raises(DataError, match=r"1 classes have no images.*Volvo 240 Sedan 1993"):
        load_stanford_cars(compact_dir)
    cars = load_stanford_cars(compact_dir, allow_empty_classes=True)
    assert cars.num_classes == 4 and 4 not in set(cars.table["class_id"])


def test_duplicated_rows_are_an_error(compact_dir):
    t = pd.read_csv(compact_dir / "labels.csv")
    pd.concat([t, t.iloc[[0]]]).to_csv(compact_dir / "labels.csv", index=False)
    with pytest.raises(DataError, match="listed twice"):
        load_stanford_cars(compact_dir)


def test_corrupt_image_names_the_file_and_is_reported_not_dropped(compact_dir):
    bad = compact_dir / "images" / "train" / "00003.jpg"
    bad.write_bytes(b"not a jpeg at all")
    cars = load_stanford_cars(compact_dir)  # loading lists files; decoding happens on use
    with pytest.raises(CorruptImageError, match="00003.jpg"):
        cars.image(2)
    report = check_images(cars, progress=False)
    assert len(report) == len(cars)
    assert (report["error"] != "").sum() == 1 and report.loc[2, "error"]


def test_truncated_jpeg_is_corrupt(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes((64, 64))[:100])
    with pytest.raises(CorruptImageError):
        load_image(path)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_non_rgb_images_are_converted(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.png" if mode != "CMYK" else tmp_path / "img.jpg"
    image = Image.new("RGB", (10, 8), (200, 100, 50)).convert(mode) if mode != "I;16" else Image.new(mode, (10, 8))
    image.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (10, 8)
    if mode == "CMYK":
        assert np.abs(np.asarray(out, dtype=int)[0, 0] - [200, 100, 50]).max() < 30


def test_folder_matching_no_layout(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError, match="matches no known Stanford Cars layout"):
        load_stanford_cars(tmp_path)
    with pytest.raises(DataError, match="no data folder at"):
        load_stanford_cars(tmp_path / "nope")


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        open_dataset("imagenet", "x")


# -- devkit layout -----------------------------------------------------------------------------------------


def _write_devkit(root, train_records, test_records, *, labelled_test=True, class_names=CLASS_NAMES):
    (root / "devkit").mkdir(parents=True)
    meta = np.zeros((1, len(class_names)), dtype=object)
    for i, n in enumerate(class_names):
        meta[0, i] = np.array([n])
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": meta})
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": annotation_struct(train_records)})
    unlabelled = [{k: v for k, v in r.items() if k != "class"} for r in test_records]
    scipy.io.savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": annotation_struct(unlabelled)})
    if labelled_test:
        scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": annotation_struct(test_records)})
    for folder, records in (("cars_train", train_records), ("cars_test", test_records)):
        (root / folder).mkdir()
        for r in records:
            Image.new("RGB", (40, 30), (10 * r["class"], 50, 90)).save(root / folder / r["fname"])


def _records(n, n_classes=3):
    return [{"bbox_x1": 3, "bbox_y1": 2, "bbox_x2": 22, "bbox_y2": 11, "class": i % n_classes + 1,
             "fname": f"{i + 1:05d}.jpg"} for i in range(n)]


def test_devkit_layout_with_generated_mat_files(tmp_path):
    _write_devkit(tmp_path, _records(6), _records(3))
    assert detect_layout(tmp_path) == "devkit"
    cars = load_stanford_cars(tmp_path)
    assert len(cars) == 9 and cars.num_classes == 3
    assert cars.table["filename"].iloc[0] == "cars_train/00001.jpg"
    assert cars.table["filename"].iloc[-1] == "cars_test/00003.jpg"  # stems overlap: full relative path is the key
    # devkit boxes are 1-based inclusive: (3,2)-(22,11) is 20 x 10 pixels
    assert tuple(cars.table[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]].iloc[0]) == (2, 1, 22, 11)
    assert cars.image(0).size == (20, 10)


def test_devkit_without_labelled_test_file_is_refused(tmp_path):
    _write_devkit(tmp_path, _records(6), _records(3), labelled_test=False)
    with pytest.raises(DataError, match="cars_test_annos_withlabels.mat"):
        load_stanford_cars(tmp_path)
    with pytest.warns(UserWarning, match="train split only"):
        cars = load_stanford_cars(tmp_path, require_test_labels=False)
    assert set(cars.table["split"]) == {"train"}


def test_unlabelled_annotation_file_is_refused_as_labels(tmp_path):
    _write_devkit(tmp_path, _records(6), _records(3))
    with pytest.raises(DataError, match="has no class labels.*1,100 fake classes"):
        read_devkit_annotations(tmp_path / "devkit" / "cars_test_annos.mat")
    unlabelled = read_devkit_annotations(tmp_path / "devkit" / "cars_test_annos.mat", labelled=False)
    assert "class_id" not in unlabelled.columns and len(unlabelled) == 3


@requires_devkit
def test_real_devkit_mat_files(tmp_path):
    """The real, unmodified devkit .mat files, with tiny stand-in images for every listed file."""
    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    for f in ("cars_meta.mat", "cars_train_annos.mat", "cars_test_annos.mat"):
        shutil.copy(REAL_DEVKIT / f, root / "devkit" / f)
    data = jpeg_bytes((8, 8))
    for folder, mat in (("cars_train", "cars_train_annos.mat"), ("cars_test", "cars_test_annos.mat")):
        (root / folder).mkdir()
        for fname in read_devkit_annotations(REAL_DEVKIT / mat, labelled=False)["fname"]:
            (root / folder / fname).write_bytes(data)
    # the devkit's own test file has no labels: refused, with the fix named
    with pytest.raises(DataError, match="cars_test_annos_withlabels.mat"):
        load_stanford_cars(root)
    shutil.copy(REAL_DEVKIT / "cars_test_annos_withlabels.mat", root / "cars_test_annos_withlabels.mat")
    cars = load_stanford_cars(root)
    counts = cars.table.groupby("split").size().to_dict()
    assert counts == {"train": 8144, "test": 8041}
    assert cars.num_classes == 196 and cars.table["class_id"].nunique() == 196
    assert cars.class_names[0] == "AM General Hummer SUV 2000"
    first = cars.table.iloc[0]
    assert (first["filename"], first["class_id"], first["class_name"]) == (
        "cars_train/00001.jpg", 14, "Audi TTS Coupe 2012")
    # the labels agree with the devkit's train_perfect_preds.txt
    perfect = np.loadtxt(REAL_DEVKIT / "train_perfect_preds.txt", dtype=int)
    assert (cars.table.loc[cars.table["split"] == "train", "class_id"].to_numpy() == perfect).all()
    # and, where the compact copy is present, with its labels for the same devkit files
    if REAL_SMALL.is_dir():
        compact = pd.read_csv(REAL_SMALL / "labels.csv")
        compact_key = compact["split"].map({"train": "cars_train", "test": "cars_test"}) + "/" + compact["orig_filename"]
        merged = cars.table.assign(key=cars.table["filename"]).merge(
            compact.assign(key=compact_key)[["key", "class_id"]], on="key", suffixes=("", "_compact"))
        assert len(merged) == 16185 and (merged["class_id"] == merged["class_id_compact"]).all()


# -- car_ims + cars_annos.mat, and one folder per class --------------------------------------------------


def test_car_ims_layout(tmp_path):
    (tmp_path / "car_ims").mkdir()
    records = []
    for i in range(6):
        name = f"car_ims/{i + 1:06d}.jpg"
        Image.new("RGB", (30, 20)).save(tmp_path / name)
        records.append({"relative_im_path": name, "bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 30, "bbox_y2": 20,
                        "class": i % 3 + 1, "test": int(i >= 3)})
    names = np.zeros((1, 3), dtype=object)
    for i, n in enumerate(CLASS_NAMES):
        names[0, i] = np.array([n])
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": annotation_struct(records), "class_names": names})
    cars = load_stanford_cars(tmp_path)
    assert cars.layout == "car_ims" and len(cars) == 6
    assert list(cars.table["split"]) == ["train"] * 3 + ["test"] * 3
    assert cars.image(0).size == (30, 20)  # a box covering the whole image is no crop


def test_folder_per_class_layout(tmp_path):
    for split in ("train", "test"):
        for name in CLASS_NAMES:
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (12, 9)).save(tmp_path / split / name / f"{k}.png")
    cars = load_stanford_cars(tmp_path)
    assert cars.layout == "folders" and len(cars) == 12
    assert cars.class_names == sorted(CLASS_NAMES)


def test_folder_per_class_with_an_empty_class(tmp_path):
    for name in CLASS_NAMES:
        (tmp_path / "train" / name).mkdir(parents=True)
    Image.new("RGB", (12, 9)).save(tmp_path / "train" / CLASS_NAMES[0] / "a.png")
    with pytest.raises(DataError, match="2 classes have no images"):
        load_stanford_cars(tmp_path)


# -- the real compact copy ---------------------------------------------------------------------------------


@requires_real_data
def test_real_compact_copy():
    cars = load_stanford_cars(REAL_SMALL)
    assert len(cars) == 16185 and cars.num_classes == 196
    assert cars.table.groupby("split").size().to_dict() == {"test": 8041, "train": 8144}
    assert cars.table["make"].nunique() == 49
    assert cars.image(0).mode == "RGB"
