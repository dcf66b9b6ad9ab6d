"""Tests of vericar.analyses.errors on a hand-built dataset whose every number is worked out below."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vericar.data.dataset import CarsDataset
from vericar.data.splits import Split
from vericar.analyses.errors import (CONFUSION_KINDS, binned_accuracy, check_claims, class_size_table, confused_pairs,
                                    confusion_kind, confusion_structure, group_accuracy_tables, image_widths,
                                    level_table, near_duplicate_errors, nearest_neighbour_table,
                                    pair_examples, similar_model_classes, spearman, verdict)
from vericar.metrics import level_correct, wilson_interval

# class index: name                      make   family  model          type
# 0: Audi S4 Sedan 2007                  Audi   S4      S4 Sedan       Sedan
# 1: Audi S4 Sedan 2012                  Audi   S4      S4 Sedan       Sedan
# 2: Audi TTS Coupe 2012                 Audi   TTS     TTS Coupe      Coupe
# 3: Honda Accord Coupe 2012             Honda  Accord  Accord Coupe   Coupe
# 4: Honda Accord Sedan 2012             Honda  Accord  Accord Sedan   Sedan
# 5: BMW M3 Coupe 2012                   BMW    M3      M3 Coupe       Coupe
NAMES = ["Audi S4 Sedan 2007", "Audi S4 Sedan 2012", "Audi TTS Coupe 2012", "Honda Accord Coupe 2012",
         "Honda Accord Sedan 2012", "BMW M3 Coupe 2012"]
# (image row, class index, split, angle in degrees on the unit circle)
ROWS = [
    (0, 0, "train", 0), (1, 1, "train", 10), (2, 2, "train", 30), (3, 3, "train", 80), (4, 4, "train", 90),
    (5, 5, "train", 150), (6, 0, "train", 335),
    # queries and their nearest database image:
    (7, 0, "test", 1),     # -> row 0 (class 0): correct
    (8, 0, "test", 9),     # -> row 1 (class 1): same model, other year
    (9, 4, "test", 82),    # -> row 3 (class 3): same family, other body
    (10, 1, "test", 38),   # -> row 2 (class 2): same make, other model
    (11, 5, "test", 88),   # -> row 4 (class 4): other make
    (12, 3, "test", 79),   # -> row 3 (class 3): correct
    (13, 1, "test", 11),   # -> row 1 (class 1): correct
    (14, 3, "test", 89),   # -> row 4 (class 4): same family, other body
]


@pytest.fixture
def world(tmp_path):
    table = pd.DataFrame({
        "filename": [f"images/{s}/{r:05d}.jpg" for r, _, s, _ in ROWS],
        "split": [s for _, _, s, _ in ROWS],
        "class_id": [c + 1 for _, c, _, _ in ROWS],
        "class_name": [NAMES[c] for _, c, _, _ in ROWS],
    })
    cars = CarsDataset(root=tmp_path, table=table, class_names=NAMES)
    ang = np.deg2rad([a for *_, a in ROWS])
    emb = np.stack([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    split = Split("official", train=np.arange(7), database=np.arange(7), query=np.arange(7, 15))
    nn = nearest_neighbour_table(emb, cars, split)
    return cars, split, emb, nn


def test_confusion_kind_by_hand():
    truth = pd.DataFrame({"make": ["Audi", "Audi", "Honda", "Audi", "Honda"],
                          "family": ["S4", "S4", "Accord", "S4", "Accord"],
                          "model": ["S4 Sedan", "S4 Sedan", "Accord Sedan", "S4 Sedan", "Accord Sedan"],
                          "year": [2007, 2007, 2012, 2007, 2012]})
    pred = pd.DataFrame({"make": ["Audi", "Audi", "Honda", "Audi", "Audi"],
                         "family": ["S4", "S4", "Accord", "TTS", "S4"],
                         "model": ["S4 Sedan", "S4 Sedan", "Accord Coupe", "TTS Coupe", "S4 Sedan"],
                         "year": [2007, 2012, 2012, 2012, 2007]}, index=[10, 11, 12, 13, 14])  # index ignored
    assert list(confusion_kind(truth, pred)) == ["correct", "same model, other year", "same family, other body",
                                                 "same make, other model", "other make"]
    with pytest.raises(ValueError):
        confusion_kind(truth, pred.iloc[:2])


def test_nearest_neighbour_table(world):
    cars, split, emb, nn = world
    assert list(nn["query"]) == list(range(7, 15))
    assert list(nn["neighbour"]) == [0, 1, 3, 2, 4, 3, 1, 4]
    assert list(nn["correct"]) == [True, False, False, False, False, True, True, False]
    assert list(nn["kind"]) == ["correct", "same model, other year", "same family, other body",
                                "same make, other model", "other make", "correct", "correct",
                                "same family, other body"]
    assert nn.loc[0, "true_class_name"] == "Audi S4 Sedan 2007"
    assert nn.loc[1, "pred_class_name"] == "Audi S4 Sedan 2012"
    # distance between unit vectors at 1 and 0 degrees: 2 sin(0.5 deg)
    assert nn.loc[0, "distance"] == pytest.approx(2 * np.sin(np.deg2rad(0.5)), abs=1e-5)


def test_level_table_counts_and_wilson(world):
    cars, _, _, nn = world
    lc = level_correct(pd.DataFrame({"class_index": nn["pred_class"]}), nn["true_class"], cars.hierarchy)
    # make: only query 11 (BMW -> Honda) is wrong; type = make + body: 8, 9, 10... see ROWS
    assert list(lc["make"]) == [True, True, True, True, False, True, True, True]
    assert list(lc["type"]) == [True, True, False, False, False, True, True, False]
    assert list(lc["model"]) == list(lc["type"])
    assert list(lc["year"]) == list(nn["correct"])
    t = level_table(nn, cars.hierarchy).set_index("level")
    assert list(t["correct"]) == [7, 4, 4, 3]
    assert (t["n"] == 8).all()
    assert t.loc["make", "accuracy"] == pytest.approx(7 / 8)
    assert t.loc["year", "accuracy"] == pytest.approx(3 / 8)
    low, high = wilson_interval(4, 8)
    assert t.loc["type", "ci_low"] == pytest.approx(low)
    assert t.loc["type", "ci_high"] == pytest.approx(high)


def test_group_accuracy_tables(world):
    _, _, _, nn = world
    g = group_accuracy_tables(nn)
    make = g["make"]
    assert list(make["group"]) == ["BMW", "Honda", "Audi"]  # worst first
    assert list(make["n"]) == [1, 3, 4]
    assert list(make["correct"]) == [0, 1, 2]
    model = g["model"].set_index("group")
    assert model.loc["Audi S4 Sedan", "n"] == 4  # both years pooled
    assert model.loc["Audi S4 Sedan", "correct"] == 2
    assert set(g["class"]["group"]) == {NAMES[i] for i in (0, 1, 3, 4, 5)}
    assert list(g["type"].set_index("group").loc[["Coupe", "Sedan"], "n"]) == [3, 5]


def test_confusion_structure(world):
    _, _, _, nn = world
    s = confusion_structure(nn).set_index("kind")
    assert list(s.index) == list(CONFUSION_KINDS)
    assert list(s["errors"]) == [1, 2, 1, 1]
    assert s["share_of_errors"].sum() == pytest.approx(1.0)
    assert s.loc["same family, other body", "share_of_errors"] == pytest.approx(2 / 5)
    assert s.loc["other make", "share_of_queries"] == pytest.approx(1 / 8)


def test_confused_pairs_and_examples(world):
    cars, split, emb, nn = world
    p = confused_pairs(nn)
    # (3, 4): Accord Coupe <-> Accord Sedan, one error each way -> the top pair; then ties by class index
    assert list(zip(p["class_a"], p["class_b"])) == [(3, 4), (0, 1), (1, 2), (4, 5)]
    top = p.iloc[0]
    assert (top["a_as_b"], top["b_as_a"], top["errors"]) == (1, 1, 2)
    assert top["kind"] == "same family, other body"
    assert top["share"] == pytest.approx(2 / 3)  # 2 errors among the 2 + 1 queries of classes 3 and 4
    assert p.iloc[1]["share"] == pytest.approx(1 / 4)
    assert len(confused_pairs(nn, top=2)) == 2
    ex = pair_examples(nn, p.head(1), emb, split.database, cars.labels).iloc[0]
    # direction a -> b on ties: the query of class 3 (row 14 at 89 deg) retrieved row 4 (class 4, 90 deg);
    # the nearest database image of its own class is row 3 (80 deg)
    assert (ex["query"], ex["neighbour"], ex["true_example"]) == (14, 4, 3)
    assert (ex["true_class"], ex["pred_class"]) == (3, 4)
    assert ex["true_distance"] == pytest.approx(2 * np.sin(np.deg2rad(4.5)), abs=1e-5)


def test_class_size_and_bins(world):
    cars, split, _, nn = world
    cs = class_size_table(nn, cars, split).set_index("class_index")
    assert 2 not in cs.index  # no query
    assert cs.loc[0, "n_train"] == 2 and cs.loc[3, "n_train"] == 1
    assert (cs.loc[0, "n_query"], cs.loc[0, "correct"]) == (2, 1)
    assert cs.loc[3, "accuracy"] == pytest.approx(1 / 2)
    b = binned_accuracy([1, 0, 1, 1, 0, 0], [1, 2, 3, 4, 5, 6], bins=3)
    assert list(b["label"]) == ["1-2", "3-4", "5-6"]
    assert list(b["accuracy"]) == [0.5, 1.0, 0.0]
    assert list(b["n"]) == [2, 2, 2]
    low, high = wilson_interval(1, 2)
    assert (b.loc[0, "ci_low"], b.loc[0, "ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # duplicate edges merge; NaN values are ignored
    b = binned_accuracy([1, 1, 0, 0], [5, 5, 5, np.nan], bins=4)
    assert len(b) == 1 and b.loc[0, "n"] == 3


def test_image_widths_prefers_original_box(world):
    cars, *_ = world
    cars.table["orig_bbox_x1"] = 10
    cars.table["orig_bbox_x2"] = np.arange(len(cars.table)) + 100
    cars.table["bbox_x1"], cars.table["bbox_x2"] = 0, 50
    w, what = image_widths(cars, [0, 3])
    assert list(w) == [90, 93] and "original" in what
    cars.table = cars.table.drop(columns=["orig_bbox_x1", "orig_bbox_x2"])
    w, what = image_widths(cars, [0])
    assert list(w) == [50] and "box" in what


def test_near_duplicate_errors(world):
    cars, split, _, nn = world
    fn = cars.table["filename"]
    reference = pd.DataFrame({"filename_a": [fn[14], fn[9], fn[12]], "filename_b": [fn[4], fn[5], fn[3]]})
    summary, explained = near_duplicate_errors(nn, cars, reference, database=split.database)
    # query 14 retrieved row 4, its listed duplicate under another class; query 9 has one (row 5) but retrieved
    # row 3; query 12's listed duplicate (row 3) has its own class.
    assert summary["errors"] == 5
    assert summary["errors_explained"] == 1
    assert summary["explained_share"] == pytest.approx(1 / 5)
    assert summary["accuracy_without_explained"] == pytest.approx(4 / 8)
    assert summary["queries_with_cross_class_duplicate"] == 2
    assert summary["of_which_wrong"] == 2
    assert list(explained["query"]) == [14]


def test_similar_model_classes(world):
    cars, split, emb, _ = world
    s = similar_model_classes(cars.hierarchy, emb[split.database], cars.labels[split.database])
    assert list(s["has_family_sibling"]) == [True, True, False, True, True, False]
    # centroids (deg): 0 -> 347.5, 1 -> 10, 2 -> 30, 3 -> 80, 4 -> 90, 5 -> 150; class 1 is nearer class 2 (20 deg)
    # than its own family's class 0 (22.5 deg)
    assert list(s["nearest_class"]) == [1, 2, 1, 4, 3, 4]
    assert list(s["nearest_in_family"]) == [True, False, False, True, True, False]


def test_verdict():
    assert verdict(0.9, 0.86, 0.93, 0.85, "at least").startswith("holds (whole CI")
    assert verdict(0.86, 0.80, 0.90, 0.85, "at least") == "holds (CI straddles the claim)"
    assert verdict(0.80, 0.75, 0.86, 0.85, "at least") == "does not hold (CI straddles the claim)"
    assert verdict(0.7, 0.6, 0.8, 0.85, "at least").startswith("does not hold (whole CI")
    assert verdict(0.5, 0.4, 0.6, 0.45, "about").startswith("consistent")
    assert verdict(0.7, 0.6, 0.8, 0.45, "about") == "higher here"
    assert verdict(0.2, 0.1, 0.3, 0.45, "about") == "lower here"
    assert verdict(float("nan"), float("nan"), float("nan"), 0.45, "about").startswith("not measurable")
    with pytest.raises(ValueError):
        verdict(0.5, 0.4, 0.6, 0.45, "roughly")


def test_check_claims(world):
    cars, split, emb, nn = world
    cs = class_size_table(nn, cars, split)
    sim = similar_model_classes(cars.hierarchy, emb[split.database], cars.labels[split.database])
    c = check_claims(nn, cars, cs, sim, popular_top_n=1, small_threshold=2).set_index("key")
    # images per make: Audi 8, Honda 5, BMW 2 -> top 1 = Audi; its queries 7, 8, 10, 13: 2 correct
    assert (c.loc["popular_makes", "queries"], c.loc["popular_makes", "accuracy"]) == (4, 0.5)
    assert "top 1 makes" in c.loc["popular_makes", "definition"]
    # siblings: classes 0, 1, 3, 4 -> queries 7, 8, 9, 10, 12, 13, 14: 3 correct
    assert (c.loc["similar_models_sibling", "queries"], c.loc["similar_models_sibling", "classes"]) == (7, 4)
    assert c.loc["similar_models_sibling", "accuracy"] == pytest.approx(3 / 7)
    # nearest centroid in family: classes 0, 3, 4 -> queries 7, 8, 9, 12, 14: 2 correct
    assert c.loc["similar_models_centroid", "accuracy"] == pytest.approx(2 / 5)
    # < 2 training images: classes 1, 3, 4, 5 (class 0 has 2) -> queries 9..14: 2 correct
    assert c.loc["small_classes", "accuracy"] == pytest.approx(2 / 6)
    assert c.loc["small_classes", "claim"] == "55% on classes with <2 training samples"
    low, high = wilson_interval(2, 6)
    assert (c.loc["small_classes", "ci_low"], c.loc["small_classes", "ci_high"]) == (pytest.approx(low),
                                                                                      pytest.approx(high))


def test_check_claims_smallest_bin_when_no_class_is_small(world):
    cars, split, emb, nn = world
    cs = class_size_table(nn, cars, split)
    cs["n_train"] = cs["class_index"].map({0: 30, 1: 40, 3: 50, 4: 60, 5: 70})
    sim = similar_model_classes(cars.hierarchy, emb[split.database], cars.labels[split.database])
    c = check_claims(nn, cars, cs, sim, small_threshold=20, size_bins=5).set_index("key")
    row = c.loc["small_classes"]
    assert "no class has < 20 training images (smallest: 30)" in row["definition"]
    assert "30-30" in row["definition"]
    assert (row["classes"], row["queries"], row["accuracy"]) == (1, 2, 0.5)  # class 0: queries 7 (ok), 8


def test_spearman():
    assert spearman([1, 2, 3, 4], [2, 4, 6, 9])[0] == pytest.approx(1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])[0])


def test_pair_examples_pick():
    emb = np.eye(6, dtype=np.float32)
    nn = pd.DataFrame({"query": [3, 4, 5, 2], "neighbour": [0, 0, 0, 1], "distance": [0.9, 0.1, 0.5, 0.3],
                       "true_class": [1, 1, 1, 0], "pred_class": [0, 0, 0, 1], "correct": False})
    pairs = confused_pairs(nn.assign(kind="other make", true_class_name="x", pred_class_name="y"))
    assert (pairs.loc[0, "a_as_b"], pairs.loc[0, "b_as_a"]) == (1, 3)
    labels = np.array([0, 1, 0, 1, 1, 1])
    med = pair_examples(nn, pairs, emb, np.array([0, 1]), labels).iloc[0]
    assert (med["query"], med["distance"], med["true_class"]) == (5, 0.5, 1)  # 0.1, 0.5, 0.9 -> 0.5
    assert med["true_example"] == 1
    close = pair_examples(nn, pairs, emb, np.array([0, 1]), labels, pick="closest").iloc[0]
    assert (close["query"], close["distance"]) == (4, 0.1)
    with pytest.raises(ValueError):
        pair_examples(nn, pairs, emb, np.array([0, 1]), labels, pick="first")
