"""Tests of vericar.retrieval: KNNIndex (torch / faiss backends), voting and hierarchical_predict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vericar import neighbours
from vericar.retrieval import WEIGHT_EPS, KNNIndex, hierarchical_predict, vote


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n, dim=16, n_clusters=8, dup=0):
    """Clustered random embeddings; the last `dup` rows are exact copies of earlier rows."""
    centres = rng.normal(size=(n_clusters, dim))
    lab = rng.integers(0, n_clusters, n)
    x = centres[lab] + 0.7 * rng.normal(size=(n, dim))
    if dup:
        src = rng.choice(n - dup, dup, replace=False)
        x[n - dup:] = x[src]
        lab[n - dup:] = lab[src]
    return _unit(x).astype(np.float32), lab


def _brute(q, db, exclude_self=False):
    """Brute-force float64 distances between unit vectors (N, M)."""
    qn, dbn = _unit(q), _unit(db)
    d = np.sqrt(np.maximum(0.0, ((qn[:, None, :] - dbn[None, :, :]) ** 2).sum(-1)))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d


def assert_knn_ok(dist, idx, ref, k, tol=1e-5):
    """Tie-aware check of a K-NN result against the brute-force distance matrix `ref`."""
    n = len(ref)
    assert dist.shape == idx.shape == (n, k)
    assert (np.diff(dist, axis=1) >= -tol).all(), "rows must be sorted ascending"
    want = np.sort(ref, axis=1)[:, :k]
    np.testing.assert_allclose(dist, want, atol=tol)
    # each returned neighbour really is at the reported distance, and no index repeats
    np.testing.assert_allclose(np.take_along_axis(ref, idx, 1), dist, atol=tol)
    assert all(len(set(r)) == k for r in idx)


def _assert_same_up_to_ties(d1, i1, d2, i2, tol=1e-5):
    np.testing.assert_allclose(d1, d2, atol=tol)
    for r in range(len(i1)):
        diff = set(i1[r]) ^ set(i2[r])
        # items may differ only where they tie with the k-th distance
        assert all(abs(d1[r, -1] - d) <= tol for d in d1[r][np.isin(i1[r], list(diff))])


# ----------------------------------------------------------------------------------------------------
# search
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_matches_bruteforce_with_duplicates(backend):
    rng = np.random.default_rng(0)
    db, lab = _clustered(rng, 300, dup=40)
    q = np.concatenate([db[:20], _clustered(rng, 30)[0]]) * 3.0  # copies of db rows + fresh queries
    index = KNNIndex(db * 3.0, lab, backend=backend)  # normalize=True undoes the scaling
    dist, idx = index.search(q, 7)
    assert dist.dtype == np.float32 and idx.dtype == np.int64
    assert_knn_ok(dist, idx, _brute(q, db), 7)
    # a query that is a database row finds it at distance exactly 0
    assert (dist[:20, 0] == 0).all()


def test_distance_is_sqrt_2_minus_2cos():
    rng = np.random.default_rng(1)
    db, lab = _clustered(rng, 50)
    q = _clustered(rng, 5)[0]
    dist, idx = KNNIndex(db, lab).search(q, 4)
    cos = np.einsum("nd,nkd->nk", q.astype(np.float64), db[idx].astype(np.float64))
    np.testing.assert_allclose(dist, np.sqrt(np.maximum(0, 2 - 2 * cos)), atol=1e-5)


def test_torch_and_faiss_agree_and_small_chunks():
    rng = np.random.default_rng(2)
    db, lab = _clustered(rng, 400, dup=60)
    q = np.concatenate([db[::7], _clustered(rng, 40)[0]])
    dt, it = KNNIndex(db, lab, backend="torch").search(q, 10)
    df, i_f = KNNIndex(db, lab, backend="faiss").search(q, 10)
    dc, ic = KNNIndex(db, lab, backend="torch").search(q, 10, chunk_size=7)
    _assert_same_up_to_ties(dt, it, df, i_f)
    _assert_same_up_to_ties(dt, it, dc, ic)
    for ex in (True,):
        a = KNNIndex(db, lab, backend="torch").search(db, 5, exclude_self=ex)
        b = KNNIndex(db, lab, backend="faiss").search(db, 5, exclude_self=ex)
        _assert_same_up_to_ties(*a, *b)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_exclude_self_with_duplicates(backend):
    rng = np.random.default_rng(3)
    db, lab = _clustered(rng, 200, dup=50)
    # many copies of row 0: 0 must be dropped even when a duplicate outranks it
    db = np.concatenate([db, np.repeat(db[:1], 6, axis=0)])
    lab = np.concatenate([lab, np.repeat(lab[:1], 6)])
    index = KNNIndex(db, lab, backend=backend)
    dist, idx = index.search(db, 5, exclude_self=True)
    assert not (idx == np.arange(len(db))[:, None]).any()
    assert_knn_ok(dist, idx, _brute(db, db, exclude_self=True), 5)
    assert (dist[0] == 0).all()  # row 0 has 6 exact duplicates
    with pytest.raises(ValueError):
        index.search(db[:10], 3, exclude_self=True)
    with pytest.raises(ValueError):
        index.search(db, len(db), exclude_self=True)


def test_auto_backend_rule(monkeypatch):
    rng = np.random.default_rng(4)
    db, lab = _clustered(rng, 100)
    index = KNNIndex(db, lab)
    assert index.resolved_backend == "torch"
    monkeypatch.setattr(neighbours, "FAISS_AUTO_THRESHOLD", 50)
    assert index.resolved_backend == "faiss"
    assert_knn_ok(*index.search(db[:10], 3), _brute(db[:10], db), 3)
    assert KNNIndex(db, lab, backend="torch").resolved_backend == "torch"


def test_input_validation():
    with pytest.raises(ValueError):
        KNNIndex(backend="annoy")
    with pytest.raises(ValueError):
        KNNIndex().search(np.ones((1, 3)), 1)
    index = KNNIndex(np.eye(3), [0, 1, 2])
    with pytest.raises(ValueError):
        index.search(np.ones((1, 4)), 1)
    with pytest.raises(ValueError):
        index.search(np.ones((1, 3)), 4)
    with pytest.raises(ValueError):
        index.add(np.ones((2, 3)), [0])
    with pytest.raises(ValueError):
        index.search(np.array([[np.nan, 0, 0]]), 1)


# ----------------------------------------------------------------------------------------------------
# add / save / load
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_add_new_classes_without_rebuilding(backend):
    rng = np.random.default_rng(5)
    db, lab = _clustered(rng, 120, n_clusters=4)
    index = KNNIndex(db, lab, backend=backend)
    new_centre = _unit(rng.normal(size=(1, db.shape[1])))
    new = _unit(new_centre + 0.05 * rng.normal(size=(10, db.shape[1]))).astype(np.float32)
    q_new = _unit(new_centre + 0.05 * rng.normal(size=(5, db.shape[1]))).astype(np.float32)
    assert not (index.predict(q_new, k=3)[0] == 99).any()  # searched (and cached) before the add
    index.add(new, np.full(10, 99))
    assert len(index) == 130 and index.labels[-1] == 99
    pred, conf = index.predict(q_new, k=3)
    assert (pred == 99).all() and (conf == 1).all()
    assert_knn_ok(*index.search(q_new, 4), _brute(q_new, index.embeddings), 4)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    db, _ = _clustered(rng, 60)
    lab = np.array([f"class {i % 7}" for i in range(60)])
    index = KNNIndex(db, lab)
    path = index.save(tmp_path / "idx")
    assert path.suffix == ".npz" and path.exists()
    loaded = KNNIndex.load(path, backend="faiss")
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    np.testing.assert_array_equal(loaded.labels, index.labels)
    assert loaded.normalize and len(loaded) == 60
    q = _clustered(rng, 8)[0]
    _assert_same_up_to_ties(*index.search(q, 5), *loaded.search(q, 5))
    np.testing.assert_array_equal(index.predict(q, 3)[0], loaded.predict(q, 3)[0])


def test_accepts_torch_tensors():
    rng = np.random.default_rng(7)
    db, lab = _clustered(rng, 40)
    index = KNNIndex(torch.from_numpy(db), torch.from_numpy(lab))
    d, i = index.search(torch.from_numpy(db[:3]), 1)
    np.testing.assert_array_equal(i[:, 0], [0, 1, 2])


# ----------------------------------------------------------------------------------------------------
# voting
# ----------------------------------------------------------------------------------------------------


def _circle(deg):
    r = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_predict_majority_and_weighted_by_hand():
    # query at 0 deg; database at 10 (x), 20 (y), 30 (y), 40 (x), 90 (z) degrees
    index = KNNIndex(_circle([10, 20, 30, 40, 90]), np.array(["x", "y", "y", "x", "z"]))
    q = _circle([0])
    assert index.predict(q, k=1)[0][0] == "x"
    lab, conf = index.predict(q, k=3)
    assert lab[0] == "y" and conf[0] == pytest.approx(2 / 3)
    lab, conf = index.predict(q, k=4)  # 2-2 tie -> the nearest neighbour's label
    assert lab[0] == "x" and conf[0] == pytest.approx(0.5)
    # weighted k=3: weights 1/(d + eps), d = 2 sin(theta/2)
    w = 1 / (2 * np.sin(np.deg2rad([10, 20, 30]) / 2) + WEIGHT_EPS)
    lab, conf = index.predict(q, k=3, weighted=True)
    assert lab[0] == "x" and conf[0] == pytest.approx(w[0] / w.sum(), rel=1e-4)
    lab, conf = index.predict(q, k=5)
    assert lab[0] == "x" and conf[0] == pytest.approx(0.4)


def test_predict_leave_one_out():
    db = _circle([0, 1, 3, 50, 51, 52])
    index = KNNIndex(db, [0, 0, 1, 1, 1, 1])
    lab, _ = index.predict(db, k=1, exclude_self=True)
    np.testing.assert_array_equal(lab, [0, 0, 0, 1, 1, 1])  # item 2 (class 1) is nearest to class 0


def test_vote_tie_goes_to_nearest_tied_label():
    codes = np.array([[5, 1, 2, 2, 1], [3, 3, 4, 4, 4], [7, 8, 9, 9, 8]])
    pos, share = vote(codes)
    # row 0: 1 and 2 tie at 2 votes, 1 is nearer; row 1: 4 wins; row 2: 8 and 9 tie, 8 nearer
    np.testing.assert_array_equal(codes[np.arange(3), pos], [1, 4, 8])
    np.testing.assert_allclose(share, [0.4, 0.6, 0.4])


# ----------------------------------------------------------------------------------------------------
# hierarchical_predict
# ----------------------------------------------------------------------------------------------------

TOY = pd.DataFrame(
    {
        "class_id": [1, 2, 3, 4],
        "make": ["A", "A", "A", "B"],
        "model": ["X Sedan", "X Sedan", "Y SUV", "Z Sedan"],
        "type": ["Sedan", "Sedan", "SUV", "Sedan"],
        "year": [2010, 2012, 2011, 2012],
    }
)


def test_hierarchical_predict_by_hand():
    nl = np.array([[3, 0, 2], [0, 1, 3], [3, 0, 1]])
    out = hierarchical_predict(nl, None, TOY)
    assert list(out.columns[:9]) == ["make", "type", "model", "year", "class_index", "make_confidence",
                                     "type_confidence", "model_confidence", "year_confidence"]
    # row 0: make A has 2 votes (from two different models) and wins, although every class,
    # every (make, type) and every model has one vote -> those ties go to the nearest (class 3, make B)
    r = out.iloc[0]
    assert r["make"] == "A" and r["make_confidence"] == pytest.approx(2 / 3)
    assert r["type_key"] == ("B", "Sedan") and r["model_key"] == ("B", "Sedan", "Z Sedan")
    assert r["class_index"] == 3 and r["year"] == 2012 and r["year_confidence"] == pytest.approx(1 / 3)
    # row 1: A / (A, Sedan) / (A, Sedan, X Sedan) with 2 of 3; the class is a 3-way tie -> class 0
    r = out.iloc[1]
    assert (r["make"], r["type"], r["model"]) == ("A", "Sedan", "X Sedan")
    assert r["model_confidence"] == pytest.approx(2 / 3) and r["type_confidence"] == pytest.approx(2 / 3)
    assert r["class_index"] == 0 and r["year"] == 2010
    # row 2: model X Sedan (classes 0 and 1) gets 2 votes, class ties -> nearest class 3
    r = out.iloc[2]
    assert r["model_key"] == ("A", "Sedan", "X Sedan") and r["class_index"] == 3


def test_hierarchical_predict_weighted_and_k1():
    nl = np.array([[3, 0, 1]])
    d = np.array([[0.1, 0.5, 0.5]])
    assert hierarchical_predict(nl, d, TOY).iloc[0]["make"] == "A"  # 2 votes vs 1
    out = hierarchical_predict(nl, d, TOY, weighted=True).iloc[0]
    w = 1 / (d[0] + WEIGHT_EPS)
    assert out["make"] == "B" and out["make_confidence"] == pytest.approx(w[0] / w.sum())
    # k = 1 copies the nearest neighbour's labels with confidence 1
    out = hierarchical_predict(np.array([[2], [1]]), None, TOY)
    np.testing.assert_array_equal(out["class_index"], [2, 1])
    assert list(out["model"]) == ["Y SUV", "X Sedan"] and list(out["year"]) == [2011, 2012]
    assert (out.filter(like="confidence") == 1).all().all()
    with pytest.raises(ValueError):
        hierarchical_predict(np.array([[4]]), None, TOY)
    with pytest.raises(ValueError):
        hierarchical_predict(nl, None, TOY, weighted=True)
