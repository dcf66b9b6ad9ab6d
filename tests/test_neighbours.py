"""vericar.neighbours: the one neighbour layer -- exact search against numpy brute force, approximate against exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vericar import neighbours
from vericar.neighbours import ExactSearch, FaissIndex, KNNFunc, knn_search, l2_normalize, search_recall


def _brute(q, x, exclude_self=False):
    d = np.linalg.norm(q[:, None, :].astype(np.float64) - x[None, :, :].astype(np.float64), axis=2)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_exact_search_is_numpy_brute_force(backend, exclude_self):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(120, 6)) * rng.uniform(0.5, 3, size=(120, 1))).astype(np.float32)  # raw, varied norms
    q = x if exclude_self else rng.normal(size=(30, 6)).astype(np.float32)
    dist, rows = knn_search(q, x, 7, exclude_self=exclude_self, backend=backend, chunk_size=8)
    full = _brute(q, x, exclude_self)
    np.testing.assert_array_equal(rows, np.argsort(full, axis=1, kind="stable")[:, :7])  # no ties in random data
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :7], rtol=1e-5, atol=1e-5)


def test_auto_backend_is_one_threshold(monkeypatch):
    x = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    index = ExactSearch(x)
    assert index.resolved_backend == "torch"
    monkeypatch.setattr(neighbours, "FAISS_AUTO_THRESHOLD", 10)
    assert index.resolved_backend == "faiss" and ExactSearch(x, device="cpu", backend="torch").resolved_backend == "torch"
    d, r = index.search(x[:5], 3)
    assert (r[:, 0] == np.arange(5)).all() and (d[:, 0] == 0).all()


def test_pml_knn_func_leaves_the_query_out():
    x = torch.as_tensor(l2_normalize(np.random.default_rng(2).normal(size=(40, 5))))
    knn = KNNFunc("torch")
    d, i = knn(x, 3, x, True)
    assert i.shape == (40, 3) and not (i == torch.arange(40)[:, None]).any()
    assert knn.indices is i and torch.all(d[:, 1:] >= d[:, :-1])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_index_recall_against_exact(kind):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 16))
    x = l2_normalize(centres[rng.integers(0, 20, 2000)] + 0.4 * rng.normal(size=(2000, 16)))
    q = l2_normalize(centres[rng.integers(0, 20, 100)] + 0.4 * rng.normal(size=(100, 16)))
    ids = np.arange(2000, dtype=np.int64) * 3 + 7  # faiss keeps arbitrary ids
    index = FaissIndex(16, kind, nprobe=8)
    index.add(x, ids)
    exact = ExactSearch(x)

    def exact_search(queries, k):
        d, rows = exact.search(queries, k)
        return d, ids[rows]

    r = search_recall(index.search, exact_search, q, 10)
    if kind == "flat":
        assert r["recall_at_1"] == 1.0 and r["recall_at_k"] == 1.0
    else:
        assert r["recall_at_1"] >= 0.9 and r["recall_at_k"] >= 0.85
    index.remove(ids[:5])
    _, found = index.search(x[:5], 3)
    assert not np.isin(found, ids[:5]).any()
