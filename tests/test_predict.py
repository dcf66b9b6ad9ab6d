"""The user-facing identifier: per-level answers with confidences, KNN+ unknown flag, adding cars without retraining."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from conftest import FINE_TUNE_MS
from vericar.predict import CarIdentifier
from vericar.config import TrainConfig
from vericar.train import train

CLASSES = pd.DataFrame({
    "class_name": ["Zentra Volo Sedan 2010", "Zentra Volo Sedan 2012", "Krato Baja Pickup 2011"],
    "make": ["Zentra", "Zentra", "Krato"], "type": ["Sedan", "Sedan", "Pickup"],
    "model": ["Volo Sedan", "Volo Sedan", "Baja Pickup"], "year": [2010, 2012, 2011]})


def clusters(centres, n, rng, spread=0.05):
    x = np.concatenate([c + spread * rng.standard_normal((n, len(c))) for c in centres])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def identifier():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3]
    db = clusters(centres, 10, rng)
    return CarIdentifier(None, 32, db, np.repeat([0, 1, 2], 10), CLASSES, k=5), rng


def test_identify_names_every_level_with_confidence(identifier):
    ident, rng = identifier
    out = ident.identify(clusters(np.eye(8)[[0, 2]], 1, rng))
    assert list(out["class_name"]) == ["Zentra Volo Sedan 2010", "Krato Baja Pickup 2011"]
    assert list(out["make"]) == ["Zentra", "Krato"] and list(out["year"]) == [2010, 2011]
    assert (out["make_confidence"] >= out["year_confidence"]).all()
    assert out["known"].all()


def test_unknown_car_is_flagged_then_recognised_after_adding(identifier):
    ident, rng = identifier
    new_centre = np.eye(8)[5]
    new_cars = clusters([new_centre], 20, rng)
    before = ident.identify(new_cars[:10])
    assert not before["known"].any()
    index = ident.add(new_cars[10:], "Lumen Arko Wagon 2014")
    assert index == 3 and ident.class_table.loc[3, "type"] == "Wagon"
    out = ident.identify(new_cars[:10], k=1)
    assert (out["class_name"] == "Lumen Arko Wagon 2014").all()
    assert (out["score"] > before["score"] + 0.5).all() and out["known"].mean() >= 0.7
    # the known classes are still recognised
    assert ident.identify(clusters(np.eye(8)[[1]], 1, rng), k=1)["class_name"].iat[0] == "Zentra Volo Sedan 2012"


def test_threshold_accepts_the_requested_share_of_the_database(identifier):
    from vericar.ood import knn_scores
    ident, _ = identifier
    scores = knn_scores(ident.index.embeddings, ident.index.embeddings, 1, exclude_self=True)
    assert (scores >= ident.threshold).mean() >= 0.95


def test_from_run_identifies_photos(synthcars_tiny, tmp_path):
    config = TrainConfig(**FINE_TUNE_MS, protocol="open-world", backbone="tiny_cnn", pretrained=False, image_size=32, epochs=1,
                         batch_size=16, m_per_class=4, device="cpu", holdout_fraction=0.3)
    run = train(synthcars_tiny, config, tmp_path / "run", progress=False)
    ident = CarIdentifier.from_run(run, synthcars_tiny, k=3)
    rows = run.split.query[:4]
    out = ident.identify([synthcars_tiny.image(int(r)) for r in rows])
    assert len(out) == 4 and set(out["make"]) <= set(synthcars_tiny.hierarchy["make"])
    # the images give the same answer as their stored embeddings
    again = ident.identify(run.embeddings[rows])
    assert list(out["class_name"]) == list(again["class_name"])


def test_threshold_set_on_held_out_photos_accepts_new_photos():
    # the trained-on photos sit tight around their centre (spread 0.02), held-out and new photos wider (0.15),
    # as after training: set on all, the threshold rejects most new photos; set on the held-out, it accepts ~95%
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:3]
    trained, held = clusters(centres, 200, rng, spread=0.02), clusters(centres, 50, rng, spread=0.15)  # 80/20
    db, labels = np.concatenate([trained, held]), np.concatenate([np.repeat([0, 1, 2], 200), np.repeat([0, 1, 2], 50)])
    mask = np.arange(len(db)) >= len(trained)
    new = clusters(centres, 200, rng, spread=0.15)
    every = CarIdentifier(None, 32, db, labels, CLASSES)
    heldout = CarIdentifier(None, 32, db, labels, CLASSES, heldout=mask)
    assert heldout.threshold < every.threshold
    assert every.identify(new)["known"].mean() < 0.85 and heldout.identify(new)["known"].mean() > 0.88
    assert "never trained on" in heldout.calibration and "too strict" in every.calibration
    before = heldout.threshold
    heldout.add(clusters([np.eye(8)[5]], 3, rng), "Lumen Arko Wagon 2014", recalibrate=True)  # added: not held out
    assert heldout.threshold == pytest.approx(before, abs=0.05)  # still set on the held-out photos
    with pytest.raises(ValueError, match="boolean mask over the 750 database photos"):
        CarIdentifier(None, 32, db, labels, CLASSES, heldout=mask[:10])


def test_from_run_on_a_seed_run_holds_every_training_photo_and_calibrates_on_the_held_out(synthcars_tiny, tmp_path):
    from vericar.identify import calibration_check, test_photo_rows
    from vericar.predict import database_rows

    config = TrainConfig(**FINE_TUNE_MS, protocol="seed", backbone="tiny_cnn", pretrained=False, image_size=32,
                         epochs=1, batch_size=16, m_per_class=4, device="cpu")
    run = train(synthcars_tiny, config, tmp_path / "run", progress=False)
    rows, heldout = database_rows(run)
    train_images = np.flatnonzero((synthcars_tiny.table["split"] == "train").to_numpy())
    np.testing.assert_array_equal(rows, train_images)
    np.testing.assert_array_equal(rows[heldout], run.split.query)
    ident = CarIdentifier.from_run(run, synthcars_tiny)
    assert len(ident.index) == len(train_images) and int(ident.heldout.sum()) == len(run.split.query)
    test = test_photo_rows(run, synthcars_tiny)
    assert not np.isin(test, train_images).any() and len(test) == (synthcars_tiny.table["split"] == "test").sum()
    no_test = copy.copy(synthcars_tiny)
    no_test.table = synthcars_tiny.table.assign(split="train")
    with pytest.raises(ValueError, match="no test photos of known cars"):
        test_photo_rows(run, no_test)
    table = calibration_check(run, synthcars_tiny)
    assert list(table["calibration_photos"]) == [len(train_images), len(run.split.query)]
    assert table.loc[1, "threshold"] == pytest.approx(ident.threshold)
    assert (table["accepted_low"] <= table["accepted"]).all() and (table["accepted"] <= table["accepted_high"]).all()
