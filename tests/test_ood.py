"""Tests for vericar.ood: KNN+ scores, FPR95 / AUROC / AUPR conventions, k sweep, MSP baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vericar.ood import (
    fpr_at_tpr,
    knn_distances,
    knn_scores,
    max_softmax_scores,
    ood_metrics,
    roc_curve_points,
    sweep_k,
    threshold_at_tpr,
)

ID20 = np.arange(1, 21) / 20.0  # 0.05, 0.10, ..., 1.00


# ----------------------------------------------------------------------------------------------------
# threshold_at_tpr / fpr_at_tpr
# ----------------------------------------------------------------------------------------------------


def test_threshold_hand_computed():
    # 19 of 20 must be accepted -> the 19th largest score = 0.10; 0.15 would accept only 18.
    assert threshold_at_tpr(ID20, 0.95) == pytest.approx(0.10)
    assert threshold_at_tpr(ID20, 0.90) == pytest.approx(0.15)  # 18 of 20
    assert threshold_at_tpr(ID20, 0.91) == pytest.approx(0.10)  # 18.2 -> need 19
    assert threshold_at_tpr(ID20, 1.0) == pytest.approx(0.05)  # all accepted
    assert threshold_at_tpr(ID20, 0.05) == pytest.approx(1.00)  # 1 of 20


@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 7, 20, 100, 333])
def test_threshold_is_largest_with_tpr(tpr, n):
    rng = np.random.default_rng(n)
    s = np.round(rng.normal(size=n), 1)  # rounding creates ties
    t = threshold_at_tpr(s, tpr)
    assert t in s
    assert np.mean(s >= t) >= tpr  # achieves the target
    larger = s[s > t]
    if larger.size:  # the next larger candidate no longer does
        assert np.mean(s >= larger.min()) < tpr


def test_threshold_ties_and_validation():
    assert threshold_at_tpr([1.0] * 10, 0.95) == 1.0
    # 5 tied at 0 and 15 at 1: 95% needs 19 -> threshold 0, which accepts all 20.
    s = np.r_[np.zeros(5), np.ones(15)]
    assert threshold_at_tpr(s, 0.95) == 0.0
    assert threshold_at_tpr(s, 0.75) == 1.0
    with pytest.raises(ValueError):
        threshold_at_tpr(ID20, 0.0)
    with pytest.raises(ValueError):
        threshold_at_tpr(ID20, 1.01)
    with pytest.raises(ValueError):
        threshold_at_tpr([], 0.95)
    with pytest.raises(ValueError):
        threshold_at_tpr([0.1, np.nan], 0.95)


def test_fpr_hand_computed_boundary():
    # Threshold 0.10; OOD scores >= 0.10 count as false positives (0.10 itself included).
    ood = np.array([0.0, 0.05, 0.0999, 0.10, 0.12, 0.5])
    assert fpr_at_tpr(ID20, ood, 0.95) == pytest.approx(3 / 6)
    assert fpr_at_tpr(ID20, ood, 0.90) == pytest.approx(1 / 6)  # threshold 0.15: only 0.5
    m = ood_metrics(ID20, ood)
    assert m["fpr95"] == pytest.approx(0.5)
    assert m["threshold"] == pytest.approx(0.10)
    assert m["tpr"] == pytest.approx(0.95)
    assert m["tpr_target"] == 0.95
    assert (m["n_id"], m["n_ood"]) == (20, 6)


def _fpr_bruteforce(id_s, ood_s, tpr):
    best = 1.0
    for t in np.concatenate([id_s, ood_s, [-np.inf, np.inf]]):
        if np.mean(id_s >= t) >= tpr:
            best = min(best, np.mean(ood_s >= t))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_fpr_vs_bruteforce(seed):
    rng = np.random.default_rng(seed)
    id_s = np.round(rng.normal(1.0, 1.0, size=rng.integers(5, 120)), 1)
    ood_s = np.round(rng.normal(0.0, 1.0, size=rng.integers(5, 120)), 1)
    for tpr in (0.95, 0.9, 0.8):
        assert fpr_at_tpr(id_s, ood_s, tpr) == pytest.approx(_fpr_bruteforce(id_s, ood_s, tpr))
    assert ood_metrics(id_s, ood_s)["fpr95"] == pytest.approx(_fpr_bruteforce(id_s, ood_s, 0.95))


# ----------------------------------------------------------------------------------------------------
# ood_metrics
# ----------------------------------------------------------------------------------------------------


def test_metrics_perfect_and_reversed():
    ood = ID20 - 2.0
    m = ood_metrics(ID20, ood)
    assert m["fpr95"] == 0.0
    assert m["auroc"] == 1.0 and m["aupr"] == 1.0 and m["aupr_out"] == 1.0
    r = ood_metrics(ID20, ID20 + 2.0)
    assert r["auroc"] == 0.0
    assert r["fpr95"] == 1.0


def test_metrics_hand_computed_auroc():
    # Pairs (id > ood): 0.9>0.85, 0.9>0.1, 0.8<0.85, 0.8>0.1 -> 3/4; a tie counts 1/2.
    assert ood_metrics([0.9, 0.8], [0.85, 0.1])["auroc"] == pytest.approx(0.75)
    assert ood_metrics([0.9, 0.5], [0.5, 0.1])["auroc"] == pytest.approx(3.5 / 4)
    # AUPR-In, ranking ID,OOD,ID,OOD: precision at the ID hits = 1, 2/3 -> AP = (1 + 2/3) / 2.
    m = ood_metrics([0.9, 0.7], [0.8, 0.1])
    assert m["aupr"] == pytest.approx((1 + 2 / 3) / 2)
    # AUPR-Out, ranking by -score: OOD(0.1) first, ID(0.7), OOD(0.8): AP = (1 + 2/3) / 2.
    assert m["aupr_out"] == pytest.approx((1 + 2 / 3) / 2)


def test_metrics_identical_distributions():
    rng = np.random.default_rng(0)
    m = ood_metrics(rng.normal(size=20000), rng.normal(size=20000))
    assert m["auroc"] == pytest.approx(0.5, abs=0.01)
    assert m["fpr95"] == pytest.approx(0.95, abs=0.01)
    assert m["aupr"] == pytest.approx(0.5, abs=0.01)


def test_roc_curve_points():
    fpr, tpr = roc_curve_points([0.9, 0.8], [0.85, 0.1])
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and fpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


# ----------------------------------------------------------------------------------------------------
# knn_scores / knn_distances
# ----------------------------------------------------------------------------------------------------


def _kth_bruteforce(q, x, k, normalize=True, exclude_self=False):
    if normalize:
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(q[:, None, :] - x[None, :, :], axis=2)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_knn_scores_vs_bruteforce(normalize, k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(60, 8)) * rng.uniform(0.5, 3.0, size=(60, 1))  # varied norms
    q = rng.normal(size=(25, 8)) * 2.0
    s = knn_scores(q, x, k, normalize=normalize, chunk_size=7)  # several chunks
    np.testing.assert_allclose(-s, _kth_bruteforce(q, x, k, normalize), rtol=1e-5, atol=1e-5)
    s64 = knn_scores(torch.as_tensor(q), torch.as_tensor(x), k, normalize=normalize, dtype=torch.float64)
    np.testing.assert_allclose(-s64, _kth_bruteforce(q, x, k, normalize), rtol=1e-10, atol=1e-12)
    assert s.shape == (25,) and s.dtype == np.float64


def test_knn_normalize_matters():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    q = np.array([[10.0, 0.0]])
    assert knn_scores(q, x, 1, normalize=True)[0] == pytest.approx(0.0, abs=1e-6)
    assert knn_scores(q, x, 1, normalize=False)[0] == pytest.approx(-9.0)
    # scaling a query leaves the KNN+ score unchanged but not the raw distance
    assert knn_scores(3 * q, x, 2)[0] == pytest.approx(knn_scores(q, x, 2)[0])


def test_knn_distances_sorted():
    rng = np.random.default_rng(1)
    x, q = rng.normal(size=(40, 5)), rng.normal(size=(9, 5))
    d = knn_distances(q, x, 12, chunk_size=4)
    assert d.shape == (9, 12)
    assert np.all(np.diff(d, axis=1) >= 0)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = np.sort(np.linalg.norm(qn[:, None] - xn[None], axis=2), axis=1)[:, :12]
    np.testing.assert_allclose(d, full, atol=1e-5)


def test_exclude_self_with_duplicates():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 6))
    x[7] = x[3]  # exact duplicate pair (3, 7)
    x[20] = x[21] = x[22] = x[5]  # four identical rows
    s1 = knn_scores(x, x, 1, exclude_self=True, chunk_size=8)
    # the duplicate still counts: distance exactly 0 for rows in a duplicate group
    for i in (3, 7, 5, 20, 21, 22):
        assert s1[i] == 0.0
    # a group of 4 identical rows: the 3 others are at distance 0, the 4th neighbour is not
    d = knn_distances(x, x, 4, exclude_self=True)
    assert np.all(d[[5, 20, 21, 22], :3] == 0.0) and np.all(d[[5, 20, 21, 22], 3] > 0)
    # a unique row is not at distance 0 (only itself was)
    assert s1[0] < 0
    for k in (1, 2, 5):
        np.testing.assert_allclose(
            -knn_scores(x, x, k, exclude_self=True), _kth_bruteforce(x, x, k, exclude_self=True), atol=1e-5
        )
    # without exclusion, every query finds itself at distance 0
    assert np.all(knn_scores(x, x, 1) == 0.0)


def test_knn_validation():
    rng = np.random.default_rng(3)
    x, q = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    knn_scores(q, x, 5)  # k == n is fine
    with pytest.raises(ValueError, match="k=6 is larger"):
        knn_scores(q, x, 6)
    with pytest.raises(ValueError, match="k=5 is larger"):
        knn_scores(x, x, 5, exclude_self=True)  # only 4 others
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_scores(q, x, 0)
    with pytest.raises(ValueError, match="exclude_self"):
        knn_scores(q, x, 1, exclude_self=True)
    with pytest.raises(ValueError, match="dim"):
        knn_scores(rng.normal(size=(3, 5)), x, 1)
    with pytest.raises(ValueError, match="empty"):
        knn_scores(q, np.zeros((0, 4)), 1)


# ----------------------------------------------------------------------------------------------------
# sweep_k
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude_self", [False, True])
def test_sweep_k_matches_individual_calls(exclude_self):
    rng = np.random.default_rng(4)
    db = rng.normal(size=(80, 6)) + np.repeat(rng.normal(size=(8, 6)) * 3, 10, axis=0)
    q_id = db if exclude_self else db[::2] + 0.1 * rng.normal(size=(40, 6))
    q_ood = rng.normal(size=(30, 6)) * 3
    ks = (1, 2, 5, 10)
    df = sweep_k(q_id, q_ood, db, ks, exclude_self=exclude_self, chunk_size=16)
    assert isinstance(df, pd.DataFrame)
    assert list(df["k"]) == list(ks)
    assert {"k", "fpr95", "auroc", "aupr"} <= set(df.columns)
    for row in df.itertuples():
        m = ood_metrics(
            knn_scores(q_id, db, row.k, exclude_self=exclude_self),
            knn_scores(q_ood, db, row.k),
        )
        assert row.fpr95 == pytest.approx(m["fpr95"])
        assert row.auroc == pytest.approx(m["auroc"])
        assert row.aupr == pytest.approx(m["aupr"])
        assert row.threshold == pytest.approx(m["threshold"], abs=1e-6)
    with pytest.raises(ValueError):
        sweep_k(q_id, q_ood, db, (1, 500))


# ----------------------------------------------------------------------------------------------------
# max softmax probability
# ----------------------------------------------------------------------------------------------------


def test_max_softmax_scores():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0], [1000.0, 0.0], [0.0, 0.0]])
    s = max_softmax_scores(logits)
    np.testing.assert_allclose(s, [0.5, 0.75, 1.0, 0.5])
    t = torch.randn(10, 7)
    np.testing.assert_allclose(max_softmax_scores(t), torch.softmax(t.double(), 1).max(1).values.numpy())
    assert max_softmax_scores(logits, temperature=1000.0)[1] < 0.51
    with pytest.raises(ValueError):
        max_softmax_scores(np.zeros(3))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_knn_scores_match_exact_knn_plus(kind):
    """KNN+ through the faiss indexes gives the exact scores (flat) or nearly (IVF, HNSW at these settings)."""
    from vericar.index import build_index
    from vericar.ood import index_knn_scores
    from vericar.retrieval import KNNIndex

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    db = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 16))
    q = np.concatenate([centres[rng.integers(0, 20, 100)] + 0.3 * rng.normal(size=(100, 16)),
                        rng.normal(size=(50, 16)) * 2])  # 50 queries far from every cluster
    exact = knn_scores(q, db, 5)
    index = build_index(db, np.zeros(len(db)), kind, nprobe=16)
    got = index_knn_scores(q, index, 5)
    assert got.shape == exact.shape
    close = np.isclose(got, exact, atol=1e-4).mean()
    assert close == 1.0 if kind == "flat" else close > 0.9
    np.testing.assert_allclose(index_knn_scores(q, KNNIndex(db, np.zeros(len(db))), 5), exact, atol=1e-4)
    assert ood_metrics(got[:100], got[100:])["auroc"] == pytest.approx(ood_metrics(exact[:100], exact[100:])["auroc"],
                                                                       abs=0.02)
