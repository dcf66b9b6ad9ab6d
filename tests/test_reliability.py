"""Hostile but realistic inputs (issue 15): no code runs from a run folder, no run is destroyed by a typo, no
result is paired with other data, no photo is read sideways, and every failure names the file and the fix."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vericar.data import open_dataset
from vericar.runio import RunFileError, UnsafeCheckpointError, load_checkpoint
from vericar.train import RunConfigError, TrainConfig, export_run, load_model, load_run, main, train

TINY = TrainConfig(protocol="official", backbone="tiny_cnn", pretrained=False, image_size=32, epochs=2,
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
