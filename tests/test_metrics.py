"""Tests of vericar.metrics: retrieval metrics, hierarchy-level accuracy, Wilson intervals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import unit_circle
from vericar.metrics import grouped_accuracy, level_accuracy, level_correct, retrieval_metrics, wilson_interval
from vericar.retrieval import hierarchical_predict


# ----------------------------------------------------------------------------------------------------
# retrieval metrics
# ----------------------------------------------------------------------------------------------------


def test_retrieval_metrics_by_hand():
    # Points on the unit circle (angles in degrees); the ranking follows the angular distance.
    db = unit_circle([10, 20, 30, 40, 50])
    db_lab = np.array(["A", "B", "A", "B", "A"])
    q = unit_circle([0, 22, 52])
    q_lab = np.array(["A", "B", "B"])
    # q0 (A, R=3): ranking A10 B20 A30 B40 A50 -> rel 1 0 1      AP@R = (1/1 + 2/3)/3 = 5/9, R-prec 2/3
    # q1 (B, R=2): ranking B20 A30 A10 B40 A50 -> rel 1 0        AP@R = (1/1)/2 = 1/2,       R-prec 1/2
    # q2 (B, R=2): ranking A50 B40 A30 B20 A10 -> rel 0 1        AP@R = (1/2)/2 = 1/4,       R-prec 1/2
    # MAP@R = mean over queries of (1/R) * sum_{i<=R} P(i) * rel(i)  (P(i) = precision at rank i).
    m = retrieval_metrics(q, q_lab, db, db_lab, k_values=(1, 2))
    assert set(m) == {"precision_at_1", "recall_at_1", "recall_at_2", "map_at_r", "r_precision"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["precision_at_1"] == pytest.approx(2 / 3)
    assert m["recall_at_1"] == pytest.approx(2 / 3)
    assert m["recall_at_2"] == pytest.approx(1.0)
    assert m["map_at_r"] == pytest.approx((5 / 9 + 1 / 2 + 1 / 4) / 3)
    assert m["r_precision"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)


def test_retrieval_metrics_leave_one_out_by_hand():
    # angles 0 (A), 10 (A), 25 (B), 45 (A), 60 (B); leave-one-out, R = class size - 1
    x = unit_circle([0, 10, 25, 45, 60])
    y = np.array([0, 0, 1, 0, 1])
    # item0 (R=2): 10A 25B 45A -> rel 1 0        AP = 1/2,  P@1 1, R-prec 1/2
    # item1 (R=2): 0A 25B 45A  -> rel 1 0        AP = 1/2,  P@1 1, R-prec 1/2
    # item2 (R=1): 10A         -> rel 0          AP = 0,    P@1 0, R-prec 0   (recall@2: 10A, 0A/45A -> 0)
    # item3 (R=2): 60B 25B     -> rel 0 0        AP = 0,    P@1 0, R-prec 0
    # item4 (R=1): 45A         -> rel 0          AP = 0,    P@1 0            (recall@2: 45A 25B -> 1)
    m = retrieval_metrics(x, y, k_values=(1, 2))
    assert m["precision_at_1"] == pytest.approx(2 / 5)
    assert m["recall_at_2"] == pytest.approx(3 / 5)
    assert m["map_at_r"] == pytest.approx(1 / 5)
    assert m["r_precision"] == pytest.approx(1 / 5)


def _brute_metrics(q, ql, db, dl, ks, loo):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    sim = qn.astype(np.float64) @ dn.T.astype(np.float64)
    if loo:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    rel = dl[order] == ql[:, None]
    if loo:
        rel = rel[:, :-1]
    R = rel.sum(axis=1)
    keep = R > 0
    out = {"precision_at_1": rel[keep, 0].mean()}
    for k in ks:
        out[f"recall_at_{k}"] = rel[keep, :k].any(axis=1).mean()
    aps, rps = [], []
    for row, r in zip(rel[keep], R[keep]):
        top = row[:r]
        prec = np.cumsum(top) / np.arange(1, r + 1)
        aps.append((prec * top).sum() / r)
        rps.append(top.mean())
    out["map_at_r"], out["r_precision"] = np.mean(aps), np.mean(rps)
    return out


@pytest.mark.parametrize("knn", ["torch", "faiss"])
def test_retrieval_metrics_match_bruteforce(knn):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8))
    y = rng.integers(0, 12, 240)
    x = (centres[y] + 1.2 * rng.normal(size=(240, 8))).astype(np.float32)
    y[0] = 99  # a lone query: excluded from every metric, as in pml
    ks = (1, 3, 10)
    with pytest.warns(UserWarning, match="1 of 240 queries have no possible match"):
        got = retrieval_metrics(x, y, k_values=ks, knn=knn)
    want = _brute_metrics(x, y, x, y, ks, loo=True)
    for key, val in want.items():
        assert got[key] == pytest.approx(val, abs=1e-9), key
    with pytest.warns(UserWarning, match="1 of 60 queries have no possible match"):
        got = retrieval_metrics(x[:60], y[:60], x[60:], y[60:], k_values=ks, knn=knn)
    want = _brute_metrics(x[:60], y[:60], x[60:], y[60:], ks, loo=False)
    for key, val in want.items():
        assert got[key] == pytest.approx(val, abs=1e-9), key
    assert 0 < got["map_at_r"] < got["precision_at_1"] < got["recall_at_10"] <= 1


def test_retrieval_metrics_validation():
    x = unit_circle([0, 10, 20])
    with pytest.raises(ValueError):
        retrieval_metrics(x, [0, 0, 1], x, None)
    with pytest.raises(ValueError):
        retrieval_metrics(x, [0, 0, 1], k_values=(5,))
    with pytest.raises(ValueError):
        retrieval_metrics(x, [0, 0, 1], knn="annoy")


# ----------------------------------------------------------------------------------------------------
# level accuracy
# ----------------------------------------------------------------------------------------------------

TOY = pd.DataFrame(
    {
        "make": ["A", "A", "A", "B"],
        "model": ["X Sedan", "X Sedan", "Y SUV", "Z Sedan"],
        "type": ["Sedan", "Sedan", "SUV", "Sedan"],
        "year": [2010, 2012, 2011, 2012],
    }
)


def test_level_accuracy_by_hand():
    nl = np.array([[3, 0, 2], [0, 1, 3], [3, 3, 3]])
    pred = hierarchical_predict(nl, None, TOY)
    truth = np.array([2, 1, 3])
    # q0: make A (right), type (B, Sedan) vs (A, SUV) wrong, model wrong, class 3 vs 2 wrong
    # q1: A / (A, Sedan) / (A, Sedan, X Sedan) right, class 0 vs 1 wrong (year 2010 vs 2012)
    # q2: all right
    acc = level_accuracy(pred, truth, TOY)
    assert acc["accuracy_make"] == pytest.approx(1.0)
    assert acc["accuracy_type"] == pytest.approx(2 / 3)
    assert acc["accuracy_model"] == pytest.approx(2 / 3)
    assert acc["accuracy_year"] == pytest.approx(1 / 3)
    assert acc["n_class_wrong"] == 2 and acc["n_queries"] == 3
    assert acc["make_right_given_class_wrong"] == pytest.approx(1.0)
    assert acc["type_right_given_class_wrong"] == pytest.approx(1 / 2)


def test_level_accuracy_prefix_semantics_from_columns_and_class_index():
    # Same type and model *names* under another make do not count: prefixes are compared.
    table = pd.DataFrame({"make": ["A", "B", "B"], "type": ["Sedan", "Sedan", "Sedan"],
                          "model": ["M Sedan", "M Sedan", "N Sedan"], "year": [2012, 2012, 2012]})
    by_index = pd.DataFrame({"class_index": [1, 2]})
    acc = level_accuracy(by_index, [0, 1], table)
    assert acc["accuracy_make"] == 0.5 and acc["accuracy_type"] == 0.5
    assert acc["accuracy_model"] == 0.0 and acc["accuracy_year"] == 0.0
    assert acc["make_right_given_class_wrong"] == 0.5 and acc["type_right_given_class_wrong"] == 0.5
    by_cols = table.iloc[[1, 2]].reset_index(drop=True)  # only make/type/model/year columns
    assert level_accuracy(by_cols, [0, 1], table) == acc
    perfect = level_accuracy(pd.DataFrame({"class_index": [0, 1]}), [0, 1], table)
    assert perfect["accuracy_year"] == 1.0 and math.isnan(perfect["make_right_given_class_wrong"])
    with pytest.raises(ValueError):
        level_accuracy(by_index, [0], table)


def test_level_correct_is_the_one_per_level_rule():
    table = pd.DataFrame({"make": ["A", "B", "B"], "type": ["Sedan", "Sedan", "Sedan"],
                          "model": ["M Sedan", "M Sedan", "N Sedan"], "year": [2012, 2012, 2012]})
    got = level_correct(pd.DataFrame({"class_index": [1, 2, 0]}, index=[7, 8, 9]), [0, 1, 0], table)
    assert list(got.index) == [7, 8, 9] and list(got.columns) == ["make", "type", "model", "year"]
    assert got.to_numpy().tolist() == [[False, False, False, False], [True, True, False, False],
                                       [True, True, True, True]]
    # a predicted prefix that no class has (a make voted from another class's neighbours) is simply wrong
    keys = pd.DataFrame({"make_key": [("C",)], "type_key": [("B", "Sedan")], "model_key": [("B", "Sedan", "N Sedan")],
                         "year_key": [("B", "Sedan", "N Sedan", 2012)]})
    assert level_correct(keys, [2], table).iloc[0].tolist() == [False, True, True, True]


# ----------------------------------------------------------------------------------------------------
# Wilson interval / grouped accuracy
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, alpha, low, high",
    [
        (8, 10, 0.05, 0.4902, 0.9433),  # textbook value
        (0, 10, 0.05, 0.0, 0.2775),
        (10, 10, 0.05, 0.7225, 1.0),
        (50, 100, 0.05, 0.4038, 0.5962),
        (1, 20, 0.05, 0.0089, 0.2361),
        (1, 20, 0.01, 0.0059, 0.3183),  # z = 2.5758, worked by hand from the formula
    ],
)
def test_wilson_interval_known_values(k, n, alpha, low, high):
    lo, hi = wilson_interval(k, n, alpha)
    assert isinstance(lo, float)
    assert lo == pytest.approx(low, abs=6e-5) and hi == pytest.approx(high, abs=6e-5)


def test_wilson_interval_arrays_symmetry_and_edge_cases():
    k = np.array([0, 3, 7, 10])
    lo, hi = wilson_interval(k, 10)
    lo2, hi2 = wilson_interval(10 - k, 10)
    np.testing.assert_allclose(lo, 1 - hi2, atol=1e-12)
    assert (lo <= k / 10).all() and (k / 10 <= hi).all()
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_grouped_accuracy():
    correct = np.array([True, False, True, True, True, False])
    groups = np.array(["a", "a", "b", "b", "b", "c"])
    df = grouped_accuracy(correct, groups)
    assert list(df.columns) == ["group", "n", "correct", "accuracy", "ci_low", "ci_high"]
    assert list(df["group"]) == ["c", "a", "b"]  # ascending accuracy
    assert list(df["n"]) == [1, 2, 3] and list(df["correct"]) == [0, 1, 3]
    np.testing.assert_allclose(df["accuracy"], [0.0, 0.5, 1.0])
    for _, r in df.iterrows():
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(r["correct"], r["n"]))
    assert grouped_accuracy([1, 0], ["x", "x"])["accuracy"].iloc[0] == 0.5
    with pytest.raises(ValueError):
        grouped_accuracy(correct, groups, ci="clopper-pearson")
