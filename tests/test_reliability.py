"""Hostile but realistic inputs (issue 15): no code runs from a run folder, no run is destroyed by a typo, no
result is paired with other data, no photo is read sideways, and every failure names the file and the fix."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FINE_TUNE_MS
from vericar.data import open_dataset
from vericar.runio import RunFileError, UnsafeCheckpointError, load_checkpoint
from vericar.config import TrainConfig
from vericar.runs import RunConfigError, export_run, load_model, load_run
from vericar.train import main, train

TINY = TrainConfig(**FINE_TUNE_MS, protocol="official", backbone="tiny_cnn", pretrained=False, image_size=32, epochs=2,
                   batch_size=16, m_per_class=4, device="cpu")


@pytest.fixture(scope="module")
def data_copy(synthcars_tiny, tmp_path_factory):
    """A private copy of SynthCars tiny (tests here edit its labels)."""
    root = tmp_path_factory.mktemp("rel") / "cars"
    shutil.copytree(synthcars_tiny.root, root)
    return root


@pytest.fixture(scope="module")
def finished(data_copy, tmp_path_factory):
    """A finished run folder, trained once for the module; tests work on copies of it."""
    cars = open_dataset("stanford_cars", data_copy)
    path = tmp_path_factory.mktemp("rel_runs") / "finished"
    train(cars, TINY, path, progress=False)
    return path


@pytest.fixture
def run_copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def cars(data_copy):
    return open_dataset("stanford_cars", data_copy)


class _Touch:
    """Unpickling it creates a file: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(run: Path, marker: Path) -> None:
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt["history"].append({"note": _Touch(marker)})
    torch.save(ckpt, run / "checkpoint.pt")


# -- 1. loading a run folder runs no code ---------------------------------------------------------------------

def test_a_checkpoint_carrying_a_pickled_callable_is_refused_everywhere(run_copy, cars, tmp_path):
    from vericar.embed_folder import embed_folder
    from vericar.predict import CarIdentifier

    marker = tmp_path / "pwned"
    _plant(run_copy, marker)
    attempts = {
        "load_model": lambda: load_model(run_copy),
        "export_run": lambda: export_run(run_copy, tmp_path / "export"),
        "from_run": lambda: CarIdentifier.from_run(run_copy, cars),
        "embed_folder": lambda: embed_folder(cars.root / "images", run_copy, tmp_path / "e.npz", progress=False),
    }
    for name, attempt in attempts.items():
        with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*checkpoint\.pt.*could run code"):
            attempt()
        assert not marker.exists(), name
    (run_copy / "metrics.json").unlink()  # an interrupted run: resuming reads the checkpoint too
    with pytest.raises(UnsafeCheckpointError):
        train(cars, TINY, run_copy, progress=False)
    assert not marker.exists()


def test_checkpoints_hold_plain_data_only(finished):
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)  # raises on anything but plain data
    assert set(ckpt) == {"model", "optimizer", "scheduler", "epoch", "history", "config", "model_config"}
    assert all(type(v) in (int, float, str) for rec in ckpt["history"] for v in rec.values())


# -- 2. no run destroyed by a typo ------------------------------------------------------------------------------

def test_a_finished_run_is_not_replaced_by_a_rerun_with_another_config(run_copy, cars):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir()}
    with pytest.raises(RunConfigError, match=r"(?s)finished run with another config.*epochs: 2 in the run folder, "
                                             r"1 now.*--overwrite"):
        train(cars, dataclasses.replace(TINY, epochs=1), run_copy, progress=False)
    assert {p.name: p.read_bytes() for p in run_copy.iterdir()} == before  # nothing touched
    with pytest.raises(RunConfigError, match="resume=False would train it again"):
        train(cars, TINY, run_copy, progress=False, resume=False)
    again = train(cars, dataclasses.replace(TINY, epochs=1), run_copy, progress=False, overwrite=True)
    assert again.history["epoch"].tolist() == [1] and again.config.epochs == 1


def test_an_interrupted_run_is_not_restarted_under_another_config(run_copy, cars):
    (run_copy / "metrics.json").unlink()
    ckpt = (run_copy / "checkpoint.pt").read_bytes()
    with pytest.raises(RunConfigError, match=r"(?s)interrupted run with another config.*batch_size: 16 .* 32 now"):
        train(cars, dataclasses.replace(TINY, batch_size=32, epochs=3), run_copy, progress=False)
    assert (run_copy / "checkpoint.pt").read_bytes() == ckpt
    # the same config resumes it: all epochs were done, only the final evaluation is left
    resumed = train(cars, TINY, run_copy, progress=False, callback=lambda *a: pytest.fail("retrained"))
    assert resumed.history["epoch"].tolist() == [1, 2]


def test_command_line_overwrite_flag(run_copy, data_copy):
    args = ["--dataset", "stanford_cars", "--data-dir", str(data_copy), "--run-dir", str(run_copy),
            "--backbone", "tiny_cnn", "--pretrained", "false", "--image-size", "32", "--epochs", "1",
            "--batch-size", "16", "--device", "cpu"]
    with pytest.raises(RunConfigError, match="epochs: 2 in the run folder, 1 now"):
        main(args)
    assert main(args + ["--overwrite"]) == 0
    assert load_run(run_copy).config.epochs == 1


# -- 3. results are not paired with other data ------------------------------------------------------------------

def _relabel(root: Path, tmp_path: Path) -> Path:
    """A copy of the data with one training image's label changed (class 1 -> class 2)."""
    edited = tmp_path / "edited"
    shutil.copytree(root, edited)
    labels = pd.read_csv(edited / "labels.csv")
    names = (edited / "class_names.txt").read_text().splitlines()
    row = labels.index[labels["class_id"] == 1][0]
    labels.loc[row, ["class_id", "class_name"]] = [2, names[1]]
    labels.to_csv(edited / "labels.csv", index=False)
    return edited


def test_a_run_refuses_data_whose_labels_changed(finished, data_copy, tmp_path):
    from vericar.predict import CarIdentifier

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    edited_root = _relabel(data_copy, tmp_path)
    edited = open_dataset("stanford_cars", edited_root)
    assert len(edited) == len(load_run(run).embeddings)  # the image count alone cannot tell
    with pytest.raises(RunConfigError, match=r"trained on other data .*1 of \d+ labels differ.*overwrite"):
        load_run(run, edited)
    with pytest.raises(RunConfigError, match=r"(?s)finished run with another config.*data: the file list or labels"):
        train(edited, TINY, run, progress=False)
    with pytest.raises(RunConfigError, match="trained on other data"):
        CarIdentifier.from_run(load_run(run), edited)
    # the same data at another path is the same data: a run travels between machines
    same = tmp_path / "same"
    shutil.copytree(data_copy, same)
    assert len(load_run(run, open_dataset("stanford_cars", same)).embeddings) == len(edited)


# -- 9. crash-safe writes, damaged files named with the fix ------------------------------------------------

def test_damaged_run_files_are_named_with_the_fix(run_copy, cars):
    ckpt = run_copy / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(RunFileError, match=r"checkpoint\.pt is damaged.*overwrite"):
        load_model(run_copy)
    ckpt.unlink()
    with pytest.raises(RunFileError, match="no checkpoint.pt .* nor model.pt"):
        load_model(run_copy)
    emb = run_copy / "embeddings.npz"
    good = emb.read_bytes()
    emb.write_bytes(good[:200])
    with pytest.raises(RunFileError, match=r"embeddings\.npz is damaged.*copy the run folder again"):
        load_run(run_copy)
    emb.write_bytes(good)
    (run_copy / "metrics.json").write_text('{"frozen": ')
    with pytest.raises(RunFileError, match=r"metrics\.json .* damaged"):
        load_run(run_copy)


def test_an_interrupted_run_with_a_damaged_checkpoint_says_so(run_copy, cars):
    (run_copy / "metrics.json").unlink()
    (run_copy / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RunFileError, match=r"checkpoint\.pt is damaged.*--overwrite"):
        train(cars, TINY, run_copy, progress=False)


def test_writes_are_atomic(tmp_path, monkeypatch):
    from vericar.runio import write_json

    target = tmp_path / "metrics.json"
    write_json(target, {"a": 1})

    def crash(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("json.dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json(target, {"a": 2})
    assert target.read_text() == '{\n  "a": 1\n}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    (tmp_path / "plain.txt").write_text("x")  # the renamed file has the permissions of any new file, not 0600
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


# -- 4. a car added from a few photos is recognised -----------------------------------------------------------

def _unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("shots", [1, 2, 5])
def test_a_car_added_from_few_photos_is_recognised(shots):
    from vericar.predict import CarIdentifier
    from test_predict import CLASSES

    rng = np.random.default_rng(shots)
    db = _unit_rows(np.repeat(np.eye(8)[:3], 10, axis=0) + 0.05 * rng.standard_normal((30, 8)))
    ident = CarIdentifier(None, 32, db, np.repeat([0, 1, 2], 10), CLASSES, k=5)
    photos = _unit_rows(np.eye(8)[5] + 0.05 * rng.standard_normal((shots + 5, 8)))
    index = ident.add(photos[:shots], "Lumen Arko Wagon 2014")
    out = ident.identify(photos)  # the photos just added (distance 0) and five new photos of the same car
    assert (out["class_name"] == "Lumen Arko Wagon 2014").all() and (out["make"] == "Lumen").all()
    assert out["known"][:shots].all() and index == 3  # the photos just added are in the database
    assert ident.identify(db[:1])["class_name"].iat[0] == "Zentra Volo Sedan 2010"  # the old ones still are


def test_identifier_refuses_k_0_and_bad_inputs(tmp_path):
    from vericar.predict import CarIdentifier
    from test_predict import CLASSES

    db = _unit_rows(np.eye(8)[np.repeat([0, 1, 2], 4)] + 0.01)
    with pytest.raises(ValueError, match="k must be a whole number >= 1"):
        CarIdentifier(None, 32, db, np.repeat([0, 1, 2], 4), CLASSES, k=0)
    ident = CarIdentifier(None, 32, db, np.repeat([0, 1, 2], 4), CLASSES, k=3)
    with pytest.raises(ValueError, match="k must be a whole number >= 1"):
        ident.identify(db[:1], k=0)
    assert len(ident.identify(db[0])) == 1  # one embedding alone
    for bad, match in [([], "list of images is empty"), (None, "got None"),
                       (np.zeros((16, 16)), r"must be float \(N, 8\)"), (np.zeros((0, 8)), "array is empty"),
                       (np.full((8, 8), 0.5), "rows are not unit length .* An image\\?")]:  # a float 2-D image
        with pytest.raises(ValueError, match=match):
            ident.identify(bad)
    with pytest.raises(TypeError, match="item 1 of the batch is NoneType"):
        ident._embeddings([np.zeros((8, 8, 3), np.uint8), None])
    with pytest.raises(ValueError, match="differs from the existing class 'Krato Baja Pickup 2011' only in case"):
        ident.add(db[:1], "krato baja pickup 2011")
    index = ident.add(db[:1], "krato Zuma Wagon 2013")
    assert ident.class_table.loc[index, "make"] == "Krato"  # a new model of the existing make


def test_identifier_accepts_a_path_a_single_image_and_pixel_arrays(run_copy, cars):
    from PIL import Image

    from vericar.predict import CarIdentifier

    ident = CarIdentifier.from_run(run_copy, cars)
    path = cars.path(0)
    image = Image.open(path)
    pixels = np.asarray(image.convert("RGB"))
    answers = [ident.identify(x)["class_name"].tolist() for x in
               (str(path), path, image, [image], pixels, [pixels])]
    assert all(a == answers[0] and len(a) == 1 for a in answers)
    gray = ident.identify(np.asarray(image.convert("L")))  # a 2-D uint8 array is one grayscale image
    assert len(gray) == 1


# -- 5. images decoded as they are meant to be seen ------------------------------------------------------------

def test_exif_orientation_is_applied_everywhere(tmp_path):
    from PIL import Image

    from vericar.data import load_image
    from vericar.embed import square_tensor

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # stored: red left half, blue right half
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone held upright
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    upright = load_image(tmp_path / "phone.png")
    assert upright.size == (20, 40)  # portrait, as displayed
    top, bottom = np.asarray(upright)[2, 10], np.asarray(upright)[-3, 10]
    assert top[0] > 200 and bottom[2] > 200  # red on top, blue below
    t = square_tensor(Image.open(tmp_path / "phone.png"), 8)  # a photo handed to CarIdentifier as it is opened
    assert t[0, 0, 4] > 200 and t[2, -1, 4] > 200
    # a devkit box is in the stored pixels' coordinates: crop the blue half, then turn it upright
    crop = load_image(tmp_path / "phone.png", bbox=(20, 0, 40, 10))  # 20 wide, 10 high as stored
    assert crop.size == (10, 20) and (np.asarray(crop)[..., 2] > 200).all()  # upright: 10 wide, 20 high


def test_alpha_16_bit_and_float_images_keep_their_appearance(tmp_path):
    from PIL import Image

    from vericar.data import load_image

    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black: shows as the background, white
    rgba[:4, :, :] = (10, 200, 10, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = np.asarray(load_image(tmp_path / "alpha.png"))
    assert (out[-1] == 255).all() and tuple(out[0, 0]) == (10, 200, 10)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "deep.png")  # 16-bit mid-grey
    assert abs(int(np.asarray(load_image(tmp_path / "deep.png"))[0, 0, 0]) - 128) <= 1
    Image.fromarray(np.full((8, 8), 0.5, np.float32), "F").save(tmp_path / "float.tif")
    assert abs(int(np.asarray(load_image(tmp_path / "float.tif"))[0, 0, 0]) - 128) <= 1
    palette = Image.new("P", (4, 4), 0)  # index 0 (black) is transparent
    palette.putpalette([0, 0, 0, 10, 200, 10])
    palette.save(tmp_path / "palette.png", transparency=0)
    assert (np.asarray(load_image(tmp_path / "palette.png")) == 255).all()


# -- 6. one huge image does not kill the folder embedder; 7. non-UTF-8 names; 9. damaged shards ----------------

@pytest.fixture
def photos(cars, tmp_path):
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        shutil.copy(cars.path(i), folder / f"car{i}.jpg")
    from PIL import Image
    Image.new("RGB", (200, 200), (1, 2, 3)).save(folder / "huge.png")
    (folder / os.fsdecode(b"caf\xe9 broken.jpg")).write_bytes(b"not a jpeg")  # a Latin-1 name, unreadable
    return folder


def test_a_decompression_bomb_is_reported_like_any_unreadable_image(finished, photos, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import vericar.embed_folder as ef
    from vericar.data import CorruptImageError, load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 200 x 200 is over twice that: DecompressionBombError
    with pytest.raises(CorruptImageError, match=r"refused image .*huge\.png.*MAX_IMAGE_PIXELS"):
        load_image(photos / "huge.png")
    code = ef.main([str(photos), "--checkpoint", str(finished), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "4 images embedded" in err and "huge.png" in err and "caf\\xe9 broken.jpg" in err
    report = pd.read_csv(tmp_path / "out.failed.csv", encoding="utf-8", encoding_errors="surrogateescape")
    assert sorted(report["file"]) == sorted(["huge.png", os.fsdecode(b"caf\xe9 broken.jpg")])
    assert not (tmp_path / "out.npz.parts").exists()
    loaded = ef.load_folder_embeddings(tmp_path / "out.npz")
    assert loaded.files.tolist() == [f"car{i}.jpg" for i in range(4)]


def test_a_damaged_shard_is_embedded_again_and_valid_shards_kept(finished, photos, tmp_path, monkeypatch):
    import vericar.embed_folder as ef
    from vericar.runio import RunFileError

    (photos / "huge.png").unlink()
    (photos / os.fsdecode(b"caf\xe9 broken.jpg")).unlink()
    out = tmp_path / "out.npz"
    real, calls = ef.embed_batches, []

    def dies_on_third_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ef, "embed_batches", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        ef.embed_folder(photos, finished, out, batch_size=1, shard_size=1, progress=False)
    shards = sorted((tmp_path / "out.npz.parts").glob("shard-*.npz"))
    assert len(shards) == 2
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # e.g. a full disk
    monkeypatch.setattr(ef, "embed_batches", real)
    with pytest.warns(UserWarning, match=r"shard-00001\.npz is damaged.*embedded again"):
        result = ef.embed_folder(photos, finished, out, progress=False)
    assert (result.reused, result.embedded) == (1, 3) and len(result.files) == 4
    out.write_bytes(out.read_bytes()[:100])
    with pytest.raises(RunFileError, match=r"out\.npz is damaged.*Run the folder embedder again"):
        ef.load_folder_embeddings(out)


# -- 7. non-UTF-8 names in datasets; 8. paths outside the data folder -----------------------------------------

def test_non_utf8_file_names_and_nested_folders_are_read(cars, tmp_path):
    from vericar.embed import dataset_fingerprint
    from vericar.runio import data_fingerprint

    root = tmp_path / "folders"
    names = cars.class_names[:2]
    for split in ("train", "test"):
        for j, name in enumerate(names):
            (root / split / name / "more").mkdir(parents=True)
            shutil.copy(cars.path(j), root / split / name / os.fsdecode(b"caf\xe9.jpg"))
            shutil.copy(cars.path(j), root / split / name / "more" / "nested.jpg")
    folders = open_dataset("stanford_cars", root)
    assert len(folders) == 8  # the nested images are read too
    assert dataset_fingerprint(folders) and data_fingerprint(folders)
    assert np.asarray(folders.image(0)).shape[2] == 3


@pytest.mark.parametrize("bad", ["../secret.jpg", "/etc/passwd", "images/../../secret.jpg"])
def test_paths_outside_the_data_folder_are_refused(compact_dir, bad):
    from vericar.data import DataError

    (compact_dir.parent / "secret.jpg").write_bytes((compact_dir / "images/train/00001.jpg").read_bytes())
    labels = pd.read_csv(compact_dir / "labels.csv")
    labels.loc[0, "filename"] = bad
    labels.to_csv(compact_dir / "labels.csv", index=False)
    with pytest.raises(DataError, match="point outside the data folder"):
        open_dataset("stanford_cars", compact_dir)


# -- 10. silent or poor cases made clear --------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("epochs", 0), ("image_size", 0)])
def test_sizes_that_cannot_train_are_refused_before_anything_is_written(cars, tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field} must be a whole number >= "):
        train(cars, dataclasses.replace(TINY, **{field: value}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_queries_without_a_possible_match_are_counted_and_small_databases_explained():
    from vericar.metrics import retrieval_metrics

    q = _unit_rows(np.eye(4)[[0, 1, 2, 2]] + 0.1)
    db = _unit_rows(np.eye(4)[[0, 1]] + 0.1)
    with pytest.warns(UserWarning, match=r"2 of 4 queries have no possible match.*1 classes, e\.g\. 7.*no database"):
        out = retrieval_metrics(q, [5, 6, 7, 7], db, [5, 6], k_values=(1,))
    assert out["precision_at_1"] == 1.0  # over the queries that can be matched
    with pytest.raises(ValueError, match=r"exceeds the 2 references available \(database items\); pass k_values no "
                                         r"larger than 2"):
        retrieval_metrics(q[:2], [5, 6], db, [5, 6], k_values=(1, 5))


def test_index_refuses_the_not_found_id_and_unit_less_vectors_where_distances_need_units():
    from vericar.index import VectorIndex

    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    flat = VectorIndex(8, "flat")
    with pytest.raises(ValueError, match="ids must be >= 0: -1 marks 'not found'"):
        flat.add(x[:2], [0, 1], ids=[-1, 5])
    hnsw = VectorIndex(8, "hnsw", normalize=False)
    with pytest.raises(ValueError, match="not unit length, but a hnsw index ranks by inner product"):
        hnsw.add(3 * x, np.zeros(40, int))
    hnsw.add(_unit_rows(x), np.zeros(40, int))
    dist, _ = hnsw.search(_unit_rows(x[:3]), 2)
    assert dist[:, 0] == pytest.approx(0, abs=1e-3) and (dist[:, 1] > 0.1).all()


def test_damaged_devkit_files_and_latin1_class_names_are_named(compact_dir, tmp_path):
    from vericar.data import DataError, read_class_names, read_devkit_annotations

    (tmp_path / "cars_meta.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage" + bytes(200))
    with pytest.raises(DataError, match=r"cannot read the MATLAB file .*cars_meta\.mat.*Download it again"):
        read_class_names(tmp_path / "cars_meta.mat")
    (tmp_path / "annos.mat").write_bytes(b"")
    with pytest.raises(DataError, match=r"annos\.mat"):
        read_devkit_annotations(tmp_path / "annos.mat")
    names = (compact_dir / "class_names.txt").read_text().replace("Audi", "Audí")
    (compact_dir / "class_names.txt").write_bytes(names.encode("latin-1"))
    with pytest.raises(DataError, match=r"class_names\.txt is not UTF-8 text.*iconv -f latin1"):
        open_dataset("stanford_cars", compact_dir)
