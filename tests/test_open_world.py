"""Tests for vericar.analyses.open_world: validation k choice, baselines, adding classes without retraining."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vericar.data import Split
from vericar.analyses.open_world import (
    METHODS,
    add_classes_experiment,
    choose_k,
    evaluate_methods,
    method_scores,
    msp_scores,
    nearest_relation,
    softmax_baseline,
    validation_rows,
    validation_sweep,
)


def _clusters(n_classes: int, per_class: int, dim: int = 8, spread: float = 0.05, seed: int = 0):
    """Unit-ish vectors around one orthogonal axis per class (well separated)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:n_classes] * 1.0
    x = np.repeat(centres, per_class, axis=0) + spread * rng.standard_normal((n_classes * per_class, dim))
    y = np.repeat(np.arange(n_classes), per_class)
    return x.astype(np.float32), y


def _toy_split(y: np.ndarray, known: list[int], per_class_db: int) -> Split:
    """Per class: first ``per_class_db`` images = train/database, the rest = queries."""
    rows = np.arange(len(y))
    pos = np.concatenate([np.arange((y == c).sum()) for c in np.unique(y)])
    is_db = pos < per_class_db
    is_known = np.isin(y, known)
    return Split("open-world", train=rows[is_db & is_known], database=rows[is_db & is_known],
                 query=rows[~is_db & is_known], ood_query=rows[~is_db & ~is_known],
                 ood_database=rows[is_db & ~is_known],
                 heldout_class_ids=np.unique(y[~is_known]) + 1)


# ---------------------------------------------------------------------------------------------------
# validation split and k choice
# ---------------------------------------------------------------------------------------------------


def test_validation_rows_partition_and_determinism():
    y = np.repeat(np.arange(10), 6)
    rows = np.arange(len(y))[::1]
    db, q, o = validation_rows(y, rows, pseudo_ood_fraction=0.2, query_fraction=0.2, seed=3)
    assert len(np.intersect1d(db, q)) == len(np.intersect1d(db, o)) == len(np.intersect1d(q, o)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([db, q, o])), rows)
    ood_classes = np.unique(y[o])
    assert len(ood_classes) == 2 and not np.isin(y[db], ood_classes).any()
    assert (np.bincount(y[o]) [ood_classes] == 6).all()  # whole classes
    assert set(np.unique(y[q])) == set(np.unique(y[db]))  # every ID class has queries and database images
    again = validation_rows(y, rows, pseudo_ood_fraction=0.2, query_fraction=0.2, seed=3)
    for a, b in zip((db, q, o), again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        validation_rows(np.zeros(5, dtype=int), np.arange(5))


def test_validation_sweep_drops_too_large_k_and_separates_clusters():
    x, y = _clusters(6, 10)
    sweep = validation_sweep(x, y, np.arange(len(y)), [1, 3, 1000], seed=0)
    assert list(sweep["k"]) == [1, 3]
    assert (sweep["auroc"] == 1.0).all() and (sweep["fpr95"] == 0.0).all()
    assert {"n_database", "n_id", "n_ood"} <= set(sweep.columns)


def test_choose_k_rules():
    sweep = pd.DataFrame({"k": [1, 5, 10, 20], "fpr95": [0.3, 0.2, 0.2, 0.25], "auroc": [0.9, 0.93, 0.95, 0.94],
                          "aupr": [0.5, 0.6, 0.7, 0.9]})
    assert choose_k(sweep) == 10  # fpr95 tie -> higher AUROC
    assert choose_k(sweep, "auroc") == 10
    assert choose_k(sweep, "aupr") == 20
    tie = pd.DataFrame({"k": [5, 2], "fpr95": [0.1, 0.1], "auroc": [0.9, 0.9], "aupr": [0.5, 0.5]})
    assert choose_k(tie) == 2  # full tie -> smaller k
    with pytest.raises(ValueError):
        choose_k(sweep, "bogus")


# ---------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------


def test_msp_baseline_confident_on_known_and_binary_case():
    x, y = _clusters(3, 20, spread=0.02)
    clf = softmax_baseline(x, y)
    s_known = msp_scores(clf, x)
    uniform = np.full((5, x.shape[1]), 0.0, dtype=np.float32)  # the origin: equally far from every class
    assert s_known.min() > 0.9
    assert msp_scores(clf, uniform).max() < s_known.min()
    assert np.all((s_known > 0) & (s_known <= 1))
    # binary: decision_function is 1-D; MSP must equal predict_proba's max
    xb, yb = _clusters(2, 15, spread=0.3)
    clf2 = softmax_baseline(xb, yb)
    np.testing.assert_allclose(msp_scores(clf2, xb), clf2.predict_proba(xb).max(axis=1), rtol=1e-6)


def test_method_scores_and_metrics_on_separated_toy():
    x, y = _clusters(6, 10, dim=8)
    split = _toy_split(y, known=[0, 1, 2, 3], per_class_db=6)
    frozen = x + 0.01
    scores = method_scores(x, frozen, y, split, k=2, k_frozen=1)
    assert list(scores) == list(METHODS)
    assert scores["knn_plus"]["k"] == 2 and scores["nn1_raw"]["k"] == 1 and scores["msp_frozen"]["k"] is None
    for s in scores.values():
        assert len(s["id"]) == len(split.query) and len(s["ood"]) == len(split.ood_query)
    table = evaluate_methods(scores)
    knn = table.set_index("method").loc["knn_plus"]
    assert knn["auroc"] == 1.0 and knn["fpr95"] == 0.0 and knn["fpr95_lo"] == 0.0 and knn["fpr95_hi"] > 0
    assert knn["n_ood"] == len(split.ood_query)


def test_nn1_raw_is_unnormalised():
    # scaling the database changes raw distances but not KNN+'s
    x, y = _clusters(4, 8)
    split = _toy_split(y, known=[0, 1, 2], per_class_db=5)
    scaled = x.copy()
    scaled[split.database] *= 3.0
    a = method_scores(x, x, y, split, k=1, k_frozen=1, methods=["knn_plus", "nn1_raw"])
    b = method_scores(scaled, x, y, split, k=1, k_frozen=1, methods=["knn_plus", "nn1_raw"])
    np.testing.assert_allclose(a["knn_plus"]["id"], b["knn_plus"]["id"], atol=1e-5)
    assert not np.allclose(a["nn1_raw"]["id"], b["nn1_raw"]["id"])
    with pytest.raises(ValueError):
        method_scores(x, x, y, split, k=1, k_frozen=1, methods=["nope"])


def test_nearest_relation():
    hierarchy = pd.DataFrame({"class_id": [1, 2, 3, 4], "make": ["A", "A", "A", "B"],
                              "model": ["m1", "m1", "m2", "m3"], "year": [2001, 2002, 2001, 2001]})
    emb = np.array([[1, 0], [0, 1], [1, 0.01], [0.01, 1], [-1, 0], [-1, 0.02]], dtype=np.float32)
    labels = np.array([0, 2, 1, 3, 3, 1])
    # database: rows 0 (class 0 = A m1 2001) and 1 (class 2 = A m2); OOD queries rows 2 (A m1 2002 -> nearest
    # row 0: same model), 3 (B -> nearest row 1: other make); row 4 known-like; row 5 (class 1) far from both
    split = Split("open-world", train=np.array([0, 1]), database=np.array([0, 1]), query=np.array([4]),
                  ood_query=np.array([2, 3]), ood_database=np.array([5]))
    rel = nearest_relation(emb, split, hierarchy, labels)
    assert list(rel) == ["same model, other year", "other make"]
    assert list(rel.index) == [2, 3]


# ---------------------------------------------------------------------------------------------------
# adding classes without retraining
# ---------------------------------------------------------------------------------------------------


def test_add_classes_separated_clusters():
    x, y = _clusters(6, 10, dim=8)
    split = _toy_split(y, known=[0, 1, 2, 3], per_class_db=6)
    df = add_classes_experiment(x, y, split, shots=(1, 5, None), seeds=(0, 1), k=1)
    assert list(df["shots"]) == [1, 1, 5, 5, "all"]
    assert list(df["n_added"]) == [2, 2, 10, 10, 12]
    assert (df["known_p1_before"] == 1.0).all() and (df["known_p1_after"] == 1.0).all()
    assert (df["new_p1"] == 1.0).all()
    # one shot is farther from a query than the nearest of several: fewer held-out queries accepted
    by_shots = df.groupby("shots", sort=False)["new_accepted"].mean()
    assert 0 < by_shots[1] <= by_shots[5] == by_shots["all"] == 1.0
    assert (df["known_accepted"] >= 0.95).all()
    assert (df["new_accepted_before"] == 0.0).all()  # far-away clusters: all flagged before adding
    # k=3 needs 3 shots per class before a held-out query's 3rd neighbour is its own class
    df3 = add_classes_experiment(x, y, split, shots=(1, None), seeds=(0,), k=3)
    assert df3.set_index("shots").loc[1, "new_accepted"] < 1.0
    assert df3.set_index("shots").loc["all", "new_accepted"] == 1.0


def test_add_classes_can_steal_known_neighbours_hand_computed():
    # 1-D toy: known class 0 at 0.0, class 1 at 10; new class 2 has a database image at 0.9.
    # ID query of class 0 at 1.0 -> nearest known image 0.0 (right); after adding 0.9 -> wrong.
    # Embeddings are 2-D (x, 1) to keep them off the origin; normalisation would distort the 1-D picture,
    # so the coordinates are chosen such that the angular order is the same as the Euclidean one.
    pts = np.array([[0.0], [0.1], [10.0], [10.1], [0.9], [0.95], [1.0], [10.05], [0.92]])
    emb = np.hstack([np.cos(pts / 20), np.sin(pts / 20)]).astype(np.float32)  # angle = coordinate / 20
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2])
    split = Split("open-world", train=np.array([0, 1, 2, 3]), database=np.array([0, 1, 2, 3]),
                  query=np.array([6, 7]), ood_query=np.array([8]), ood_database=np.array([4, 5]))
    df = add_classes_experiment(emb, labels, split, shots=(None,), k=1)
    row = df.iloc[0]
    assert row["known_p1_before"] == 1.0
    assert row["known_p1_after"] == 0.5  # query 6 (class 0 at 1.0) now retrieves 0.95 (class 2)
    assert row["new_p1"] == 1.0
    assert row["n_added"] == 2 and row["shots"] == "all"


def test_add_classes_needs_ood_database():
    x, y = _clusters(3, 4)
    split = Split("official", train=np.arange(6), database=np.arange(6), query=np.arange(6, 12))
    with pytest.raises(ValueError, match="ood_database"):
        add_classes_experiment(x, y, split)


# ---------------------------------------------------------------------------------------------------
# figures (smoke: every figure renders from the shapes the notebook passes)
# ---------------------------------------------------------------------------------------------------


def test_figures_render():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vericar import plots
    from vericar.ood import roc_curve_points

    x, y = _clusters(6, 10, dim=8, spread=0.5)
    split = _toy_split(y, known=[0, 1, 2, 3], per_class_db=6)
    scores = method_scores(x, x, y, split, k=2, k_frozen=1)
    table = evaluate_methods(scores).assign(holdout="model")
    sweep = pd.concat([validation_sweep(x, y, split.database, [1, 2, 3]).assign(holdout="model", on="validation"),
                       validation_sweep(x, y, split.database, [1, 2]).assign(holdout="model", on="test")])
    add = add_classes_experiment(x, y, split, shots=(1, None), seeds=(0, 1)).assign(holdout="model")
    figs = [
        plots.k_sweep_figure(sweep, {"model": 2}),
        plots.roc_figure({"model": {m: roc_curve_points(s["id"], s["ood"]) for m, s in scores.items()}},
                         {("model", r.method): r.auroc for r in table.itertuples()}, names=METHODS),
        plots.score_histogram_figure({"model": (scores["knn_plus"]["id"], scores["knn_plus"]["ood"], -0.5)}),
        plots.method_comparison_figure(table, names=METHODS, references={"target": (0.2, 0.95)}),
        plots.add_classes_figure(add),
        plots.neighbour_pairs_figure([np.zeros((4, 6, 3))] * 3, [np.ones((4, 6, 3))] * 3, ["a"] * 3, ["b"] * 3),
    ]
    for f in figs:
        assert f.axes
        plt.close(f)
