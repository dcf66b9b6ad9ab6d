"""vericar.index: exact / IVF / HNSW indexes, their recall against exact search, add / remove, save / load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vericar.index import (AUTO_FLAT_MAX, VectorIndex, build_index, choose_kind, default_nlist, load_index,
                           recall_vs_exact)
from vericar.retrieval import KNNIndex, hierarchical_predict


def clustered(n: int, dim: int = 32, classes: int = 20, seed: int = 0, noise: float = 0.5):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    x = centres[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def data():
    x, y = clustered(3000)
    q, qy = clustered(200, seed=1)
    return x, y, q, qy


CLASS_TABLE = pd.DataFrame({"make": [f"M{i // 4}" for i in range(20)], "type": ["Sedan"] * 20,
                            "model": [f"m{i // 2}" for i in range(20)], "year": [2000 + i % 2 for i in range(20)]})


def test_auto_kind_and_nlist():
    assert choose_kind(1000) == "flat" and choose_kind(AUTO_FLAT_MAX + 1) == "ivf"
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(3000) == 76  # 3000 / 39: every centroid gets its training points
    assert default_nlist(10) == 1


def test_flat_is_the_exact_knn_index(data):
    x, y, q, _ = data
    index = build_index(x, y, "auto")
    assert index.kind == "flat"
    d, ids = index.search(q, 5)
    d_ref, i_ref = KNNIndex(x, y).search(q, 5)
    np.testing.assert_array_equal(ids, i_ref)  # ids default to row numbers
    np.testing.assert_allclose(d, d_ref)
    assert recall_vs_exact(index, q, k=10)["recall_at_k"] == 1.0


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall(data, kind):
    x, y, q, qy = data
    index = build_index(x, y, kind, nprobe=8, ef_search=64)
    r = recall_vs_exact(index, q, k=10)
    assert r["n_queries"] == len(q) and r["k"] == 10
    assert r["recall_at_1"] >= 0.9 and r["recall_at_k"] >= 0.85 and r["top1_in_k"] >= 0.9
    # predictions agree with exact K-NN almost everywhere
    exact_pred = KNNIndex(x, y).predict(q, 5)[0]
    assert (index.predict(q, 5)[0] == exact_pred).mean() >= 0.9
    d, ids = index.search(q, 5)
    assert (np.diff(d, axis=1) >= -1e-6).all() and (ids >= 0).all()


def test_ivf_recall_grows_with_nprobe(data):
    x, y, q, _ = data
    index = build_index(x, y, "ivf", nlist=64)
    index.nprobe = 1
    low = recall_vs_exact(index, q, k=10)["recall_at_k"]
    index.nprobe = 64  # every cell: exact
    assert recall_vs_exact(index, q, k=10)["recall_at_k"] == 1.0
    assert low < 1.0


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_and_remove_without_rebuilding(data, kind):
    x, y, q, _ = data
    index = build_index(x[:2000], y[:2000], kind, nprobe=16)
    new = index.add(x[2000:], y[2000:])
    assert new.tolist() == list(range(2000, 3000)) and len(index) == 3000
    # a query that is an item finds that item first (exactly, at distance ~0)
    d, ids = index.search(x[2500:2510], 1)
    assert ids[:, 0].tolist() == list(range(2500, 2510)) and (d[:, 0] < 1e-3).all()
    removed = index.remove(np.arange(2500, 2510))
    assert removed == 10 and len(index) == 2990 and index.remove([2500, 99999]) == 0
    d, ids = index.search(x[2500:2510], 5)
    assert not np.isin(ids, np.arange(2500, 2510)).any()
    assert not np.isin(index.ids, np.arange(2500, 2510)).any()
    assert recall_vs_exact(index, q, k=10)["recall_at_1"] >= 0.9  # exact reference over the live items
    # removal of many (flat compacts itself; hnsw compacts on demand): ids and labels survive
    index.remove(np.arange(0, 1000))
    index.compact()
    assert len(index) == 1990 and index.ids.min() == 1000
    d, ids = index.search(x[1500:1505], 1)
    assert ids[:, 0].tolist() == list(range(1500, 1505))
    np.testing.assert_array_equal(index.label_of(ids[:, 0]), y[1500:1505])
    # explicit ids, reserved forever
    assert index.add(x[:2], y[:2], ids=[10_000, 10_001]).tolist() == [10_000, 10_001]
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:1], y[:1], ids=[10_000])
    assert index.add(x[:1], y[:1]).tolist() == [10_002]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(data, tmp_path, kind):
    x, y, q, _ = data
    names = np.array([f"class {c}" for c in y])  # string labels survive too
    index = build_index(x, names, kind, class_table=CLASS_TABLE, nprobe=4, ef_search=32)
    index.remove([3, 4, 5])
    path = index.save(tmp_path / "idx")
    loaded = load_index(path)
    assert (loaded.kind, len(loaded), loaded.dim) == (kind, 2997, 32)
    assert loaded.nprobe == 4 and loaded.ef_search == 32
    pd.testing.assert_frame_equal(loaded.class_table, CLASS_TABLE)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.labels, index.labels)
    d0, i0 = index.search(q, 5)
    d1, i1 = loaded.search(q, 5)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1, atol=1e-6)
    assert loaded.add(x[:1], names[:1]).tolist() == [3000]  # ids continue after a reload
    assert loaded.remove([6]) == 1
    with pytest.raises(FileNotFoundError, match="save_index"):
        load_index(tmp_path / "nothing")


def test_hierarchical_predict_uses_the_saved_class_table(data, tmp_path):
    x, y, q, _ = data
    index = load_index(build_index(x, y, "hnsw", class_table=CLASS_TABLE).save(tmp_path / "h"))
    pred = index.hierarchical_predict(q, k=5)
    d, ids = index.search(q, 5)
    pd.testing.assert_frame_equal(pred, hierarchical_predict(index.label_of(ids), d, CLASS_TABLE))
    d, rows = KNNIndex(x, y).search(q, 5)  # and it agrees with the exact neighbours' votes
    exact = hierarchical_predict(y[rows], d, CLASS_TABLE)
    for level in ("class_index", "make"):
        assert (pred[level].to_numpy() == exact[level].to_numpy()).mean() >= 0.9
    with pytest.raises(ValueError, match="class_table"):
        build_index(x, y, "flat").hierarchical_predict(q)


def test_errors_name_the_problem(data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(x, y, "annoy")
    index = build_index(x, y, "flat")
    with pytest.raises(ValueError, match="dim"):
        index.search(x[:2, :8], 1)
    with pytest.raises(KeyError, match="unknown ids"):
        index.label_of([123456])
    with pytest.raises(ValueError, match="empty"):
        VectorIndex(32, "hnsw").search(x[:1], 1)


def test_removal_filter_survives_faiss_torch_utils(data):
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which patches Index.search (no `params`)."""
    import faiss.contrib.torch_utils  # noqa: F401

    x, y, q, _ = data
    index = build_index(x, y, "hnsw")
    index.remove([0, 1])
    _, ids = index.search(x[:2], 3)
    assert not np.isin(ids, [0, 1]).any()
