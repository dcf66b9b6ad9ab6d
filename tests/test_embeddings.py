"""Tests of vericar.analyses.embeddings: purity, chance, silhouette, labels, sampling, UMAP wrapper."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import unit_circle
from vericar.data.hierarchy import hierarchy_table
from vericar.analyses.embeddings import (chance_purity, embedding_quality, label_table, neighbour_agreement,
                                        neighbourhood_purity, silhouette_cosine, stratified_sample, top_n_labels,
                                        umap_2d)


def test_purity_by_hand():
    # angles 0, 10, 30, 100, 110 with labels A A B B C
    # k=1: 0->10 (A=A), 10->0 (A), 30->10 (B vs A: 0), 100->110 (B vs C: 0), 110->100 (C vs B: 0)  -> 2/5
    # k=2: 0->{10,30}: 1/2; 10->{0,30}: 1/2; 30->{10,0}: 0; 100->{110,30}: 1/2; 110->{100,30}: 0   -> 1.5/5
    x = unit_circle([0, 10, 30, 100, 110])
    lab = np.array(["A", "A", "B", "B", "C"])
    agree = neighbour_agreement(x, lab, k=1)
    assert list(agree["label"]) == [1, 1, 0, 0, 0]
    assert neighbourhood_purity(x, {"c": lab}, k=1)["c"] == pytest.approx(2 / 5)
    agree2 = neighbour_agreement(x, {"c": lab}, k=2)["c"]
    assert list(agree2) == [0.5, 0.5, 0.0, 0.5, 0.0]
    # several columns share one search; k is capped at N - 1
    p = neighbourhood_purity(x, pd.DataFrame({"c": lab, "all": np.zeros(5)}), k=10)
    assert p["all"] == 1.0
    assert p["c"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 4 + 1 / 4 + 0) / 5)


def test_purity_checks():
    x = unit_circle([0, 10, 20])
    with pytest.raises(ValueError):
        neighbour_agreement(x, np.array([0, 1]), k=1)
    with pytest.raises(ValueError):
        neighbour_agreement(x[:1], np.array([0]), k=1)


def test_chance_purity():
    # sizes 2 and 1 among 3: (2/3)(1/2) + (1/3)(0) = 1/3
    assert chance_purity(["a", "a", "b"]) == pytest.approx(1 / 3)
    assert chance_purity([1, 1, 1, 1]) == 1.0
    assert np.isnan(chance_purity([1]))
    # random neighbours reach it on average
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, 400)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    assert neighbourhood_purity(x, lab, k=20)["label"] == pytest.approx(chance_purity(lab), abs=0.03)


def test_silhouette_is_undefined_for_one_cluster():
    x = np.random.default_rng(1).normal(size=(10, 5)).astype(np.float32)
    assert np.isnan(silhouette_cosine(x, np.zeros(10)))
    assert np.isnan(silhouette_cosine(x, np.arange(10)))  # as many clusters as points


def test_silhouette_by_hand():
    # two tight pairs far apart: a = small, b = large -> close to 1
    x = unit_circle([0, 2, 180, 182])
    s = silhouette_cosine(x, [0, 0, 1, 1])
    a = 1 - np.cos(np.deg2rad(2))
    b = np.mean([1 - np.cos(np.deg2rad(180)), 1 - np.cos(np.deg2rad(182))])
    assert s == pytest.approx((b - a) / b, abs=1e-6)


def test_label_table_prefix_semantics():
    h = hierarchy_table(["Audi S4 Sedan 2007", "Audi S4 Sedan 2012", "Audi TTS Coupe 2012", "BMW M3 Coupe 2012"])
    t = label_table(h, [0, 1, 2, 3, 0], extra={"body_only": "type", "year_only": "year"})
    assert list(t.columns) == ["make", "type", "model", "year", "body_only", "year_only"]
    assert list(t["make"]) == [0, 0, 0, 1, 0]
    assert list(t["type"]) == [0, 0, 1, 2, 0]  # (Audi, Coupe) and (BMW, Coupe) differ
    assert list(t["model"]) == [0, 0, 1, 2, 0]
    assert list(t["year"]) == [0, 1, 2, 3, 0]
    assert list(t["body_only"]) == [0, 0, 1, 1, 0]  # Coupe alone: the same
    assert list(t["year_only"]) == [0, 1, 1, 1, 0]


def test_embedding_quality_table():
    x = unit_circle([0, 10, 30, 100, 110])
    labels = pd.DataFrame({"c": ["A", "A", "B", "B", "C"]})
    q = embedding_quality({"before": x, "after": x[::-1].copy()}, labels, k=1)
    assert list(q["stage"]) == ["before", "after"]
    assert q.loc[0, "purity"] == pytest.approx(2 / 5)
    assert q.loc[0, "chance"] == pytest.approx(chance_purity(labels["c"]))
    assert set(q.columns) >= {"stage", "level", "purity", "chance", "silhouette", "k", "n"}


def test_stratified_sample():
    lab = np.repeat([0, 1, 2], [10, 3, 50])
    s = stratified_sample(lab, 20, seed=0)
    counts = np.bincount(lab[s], minlength=3)
    # cap c: 3 + 2c <= 20 -> c = 8: class 0 keeps 8, class 1 all 3, class 2 8  (total 19)
    assert list(counts) == [8, 3, 8]
    assert np.all(np.diff(s) > 0)
    assert np.array_equal(s, stratified_sample(lab, 20, seed=0))
    assert not np.array_equal(s, stratified_sample(lab, 20, seed=1))
    assert np.array_equal(stratified_sample(lab, 100), np.arange(len(lab)))
    # more classes than points: one point of max_points different classes
    s = stratified_sample(np.arange(10), 4, seed=0)
    assert len(s) == 4 and len(set(s)) == 4
    with pytest.raises(ValueError):
        stratified_sample(lab, 0)


def test_top_n_labels():
    values = ["b", "a", "c", "a", "b", "d", "a"]
    out, keep = top_n_labels(values, 2)
    assert keep == ["a", "b"]  # a: 3, b: 2
    assert list(out) == ["b", "a", "other", "a", "b", "other", "a"]
    out, keep = top_n_labels(["x", "y"], 1, other="rest")  # tie broken by value
    assert keep == ["x"] and list(out) == ["x", "rest"]


@pytest.mark.slow
def test_umap_2d_reproducible_with_duplicates():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    x = np.concatenate([c + 0.05 * rng.normal(size=(30, 8)) for c in centres]).astype(np.float32)
    x[5] = x[4]  # an exact duplicate: the point itself must still come first in the kNN graph
    a = umap_2d(x, n_neighbors=10, random_state=0)
    b = umap_2d(x, n_neighbors=10, random_state=0)
    assert a.shape == (90, 2) and a.dtype == np.float32
    assert np.array_equal(a, b)
    # the three blobs stay apart in 2-D: every point's nearest map neighbour is from its own blob
    d = np.linalg.norm(a[:, None] - a[None], axis=2)
    np.fill_diagonal(d, np.inf)
    blob = np.repeat([0, 1, 2], 30)
    assert (blob[d.argmin(axis=1)] == blob).mean() > 0.95
    with pytest.raises(ValueError):
        umap_2d(x[:2])


def test_silhouette_several_columns_at_once():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    cols = pd.DataFrame({"a": rng.integers(0, 3, 50), "b": rng.integers(0, 7, 50), "one": np.zeros(50)})
    out = silhouette_cosine(x, cols)
    assert set(out) == {"a", "b", "one"}
    assert out["a"] == pytest.approx(silhouette_cosine(x, cols["a"]))
    assert out["b"] == pytest.approx(silhouette_cosine(x, cols["b"].to_numpy()))
    assert np.isnan(out["one"])
