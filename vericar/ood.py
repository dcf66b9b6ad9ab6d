"""Out-of-distribution (OOD) scoring and metrics: KNN+ (Sun et al., ICML 2022) and baselines.

KNN+ ("Out-of-Distribution Detection with Deep Nearest Neighbors", Sun, Ming, Zhu & Li, ICML 2022)
-------------------------------------------------------------------------------------------------
Embeddings of the database (the in-distribution reference set) and of the queries are L2-normalised;
the score of a query ``q`` is minus the Euclidean distance to its ``k``-th nearest database neighbour,

    score(q) = - || q/|q| - x_(k)/|x_(k)| ||_2 ,

so **higher = more in-distribution**.  A query is accepted as in-distribution (ID) when
``score >= threshold``, and the threshold is chosen on ID scores so that 95% of ID queries are accepted
(TPR 95%).  ``normalize=False`` gives the unnormalised baseline (plain Euclidean distance on the raw
embeddings; with ``k=1`` that is the "1-NN distance without normalisation" score).

Conventions used by every metric here
-------------------------------------
* Scores: higher = more in-distribution.  NaN / inf scores are rejected (``ValueError``).
* In-distribution is the **positive** class.  A query is predicted ID iff ``score >= threshold``
  (ties with the threshold count as accepted, for ID and OOD alike).
* ``TPR`` = fraction of ID scores ``>= threshold``; ``FPR`` = fraction of OOD scores ``>= threshold``
  (OOD samples wrongly accepted as ID).
* ``threshold_at_tpr(id_scores, tpr)`` is the **largest** ``t`` with ``mean(id_scores >= t) >= tpr``,
  i.e. the ``ceil(tpr * n)``-th largest ID score.  No interpolation.
* ``FPR95`` = FPR at that threshold with ``tpr=0.95`` (the smallest FPR attainable with TPR >= 95%).
* ``AUROC`` = ``sklearn.metrics.roc_auc_score`` with ID = 1 (= P(score_id > score_ood) + 0.5 P(tie)).
* ``AUPR`` (AUPR-In) = ``sklearn.metrics.average_precision_score`` with ID = 1 and the scores as given;
  ``AUPR-Out`` = the same with OOD = 1 and the negated scores.

The K-NN search is the neighbour layer's exact one (:mod:`vericar.neighbours`: torch or faiss by database
size); the selected neighbours' distances are recomputed directly as ``||q - x||`` (no
``|q|^2 + |x|^2 - 2 q.x`` cancellation), so exact duplicates are at distance exactly 0.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from .neighbours import as_2d_float, knn_search, l2_normalize

__all__ = [
    "fpr_at_tpr",
    "index_knn_scores",
    "knn_distances",
    "knn_scores",
    "max_softmax_scores",
    "ood_metrics",
    "roc_curve_points",
    "sweep_k",
    "threshold_at_tpr",
]

_SWEEP_COLUMNS = ("k", "fpr95", "auroc", "aupr", "aupr_out", "threshold", "tpr")


# ----------------------------------------------------------------------------------------------------
# K-NN distances / scores
# ----------------------------------------------------------------------------------------------------


def knn_distances(
    queries,
    database,
    k: int,
    *,
    normalize: bool = True,
    exclude_self: bool = False,
    chunk_size: int = 4096,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Sorted Euclidean distances from each query to its ``k`` nearest database vectors.

    Parameters
    ----------
    queries, database:
        ``(m, d)`` and ``(n, d)`` arrays (numpy or torch).
    k:
        Number of neighbours, ``1 <= k <= n`` (``<= n - 1`` with ``exclude_self``).
    normalize:
        L2-normalise queries and database first (KNN+).  ``False``: raw Euclidean distance.
        (An all-zero vector stays zero under normalisation, i.e. at distance 1 from every unit vector.)
    exclude_self:
        Leave-one-out: the queries *are* the database (same shape and values, row ``i`` = entry ``i``)
        and each query's own entry ``i`` is excluded **by index**, not by distance, so an exact
        duplicate of the query elsewhere in the database still counts as a neighbour (distance 0).
    chunk_size:
        Queries per matmul block (memory ~ ``chunk_size * n`` floats).
    device, dtype:
        Where / in which precision the search runs.

    The search is the neighbour layer's exact one (:func:`vericar.neighbours.knn_search`, backend ``"auto"``).

    Returns
    -------
    ``(m, k)`` float64 array, each row sorted ascending (column ``j`` = distance to the ``(j+1)``-th NN).
    """
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    q = as_2d_float(queries, "queries", np_dtype)
    x = as_2d_float(database, "database", np_dtype)
    if exclude_self and (q.shape != x.shape or not np.array_equal(q, x)):
        raise ValueError("exclude_self=True needs the queries to be the database itself (same rows, same order)")
    if normalize:
        q, x = l2_normalize(q), l2_normalize(x)
    dist, _ = knn_search(q, x, k, exclude_self=exclude_self, device=device, dtype=dtype, chunk_size=chunk_size)
    return dist.astype(np.float64)


def knn_scores(queries, database, k: int, **kwargs) -> np.ndarray:
    """KNN+ score: minus the distance to the ``k``-th nearest database neighbour (higher = more ID).

    With ``normalize=True`` (default) this is KNN+ of Sun et al. (2022); ``normalize=False, k=1`` is the
    unnormalised 1-NN distance baseline.  Keyword arguments as :func:`knn_distances`.

    Returns a float64 array of shape ``(m,)``.
    """
    return -knn_distances(queries, database, k, **kwargs)[:, int(k) - 1]


def index_knn_scores(queries, index, k: int) -> np.ndarray:
    """KNN+ scores through a built K-NN index: minus the distance to each query's ``k``-th neighbour.

    ``index`` is anything with ``search(queries, k) -> (distances, ids)`` over L2-normalised vectors: a
    :class:`vericar.retrieval.KNNIndex` (exact, torch or faiss) or a :class:`vericar.index.VectorIndex`
    (faiss flat, IVF or HNSW), so that scoring against a million-image database runs at the index's speed.
    An approximate index may return fewer than ``k`` neighbours (id ``-1``); such a query gets the score of
    the farthest possible unit vector, ``-2``. Queries are L2-normalised here; the index normalises its own.
    """
    q = np.asarray(queries, dtype=np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    distances, ids = index.search(q, int(k))
    kth = np.asarray(distances, dtype=np.float64)[:, int(k) - 1]
    return -np.where(np.asarray(ids)[:, int(k) - 1] < 0, 2.0, np.minimum(kth, 2.0))


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def _as_scores(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    s = np.asarray(a, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if s.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or inf")
    return s


def _check_tpr(tpr: float) -> float:
    tpr = float(tpr)
    if not (0.0 < tpr <= 1.0):
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    return tpr


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """The largest threshold ``t`` such that ``mean(id_scores >= t) >= tpr``.

    Equivalently the ``ceil(tpr * n)``-th largest ID score (``n = len(id_scores)``; ``tpr * n`` is
    rounded to 9 decimals first so that e.g. ``0.95 * 20`` is exactly 19).  Accepting ``score >= t``
    then keeps at least a fraction ``tpr`` of the ID scores (more when scores tie at ``t``), and any
    larger threshold keeps fewer than ``tpr``.  Example: ``id_scores = [1, ..., 20] / 20`` and
    ``tpr=0.95`` gives ``t = 0.10`` (19 of 20 accepted).  ``tpr`` must be in ``(0, 1]``;
    ``tpr=1`` gives ``min(id_scores)``.
    """
    s = _as_scores(id_scores, "id_scores")
    tpr = _check_tpr(tpr)
    n = s.size
    need = int(math.ceil(round(tpr * n, 9)))
    need = min(max(need, 1), n)
    # need-th largest = element (n - need) of the ascending order.
    return float(np.partition(s, n - need)[n - need])


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD scores ``>= threshold_at_tpr(id_scores, tpr)`` (OOD accepted as ID).

    With ``tpr=0.95`` this is FPR95 in the convention of Sun et al. (2022): the smallest FPR attainable
    by any threshold that keeps at least 95% of the ID queries.
    """
    o = _as_scores(ood_scores, "ood_scores")
    t = threshold_at_tpr(id_scores, tpr)
    return float(np.mean(o >= t))


def ood_metrics(id_scores, ood_scores, tpr: float = 0.95) -> dict:
    """OOD-detection metrics, ID = positive class, higher score = more ID.

    Returns a dict with

    ``fpr95``      fraction of OOD scores ``>= threshold`` (FPR at the target ``tpr``; the key keeps its
                   name for other ``tpr`` values too, ``tpr_target`` records the target)
    ``auroc``      ``roc_auc_score(y, s)`` with ``y = 1`` for ID, ``0`` for OOD
    ``aupr``       AUPR-In: ``average_precision_score(y, s)`` (ID positive)
    ``aupr_out``   AUPR-Out: ``average_precision_score(1 - y, -s)`` (OOD positive)
    ``threshold``  :func:`threshold_at_tpr` of the ID scores
    ``tpr``        fraction of ID scores ``>= threshold`` actually achieved (``>= tpr_target``)
    ``tpr_target`` the requested ``tpr``
    ``n_id``, ``n_ood``
    """
    i = _as_scores(id_scores, "id_scores")
    o = _as_scores(ood_scores, "ood_scores")
    tpr = _check_tpr(tpr)
    t = threshold_at_tpr(i, tpr)
    y = np.concatenate([np.ones(i.size, dtype=np.int64), np.zeros(o.size, dtype=np.int64)])
    s = np.concatenate([i, o])
    return {
        "fpr95": float(np.mean(o >= t)),
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
        "threshold": t,
        "tpr": float(np.mean(i >= t)),
        "tpr_target": tpr,
        "n_id": int(i.size),
        "n_ood": int(o.size),
    }


def roc_curve_points(
    id_scores, ood_scores, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of the ROC curve (ID positive, higher = ID) via ``sklearn.metrics.roc_curve``."""
    i = _as_scores(id_scores, "id_scores")
    o = _as_scores(ood_scores, "ood_scores")
    y = np.concatenate([np.ones(i.size, dtype=np.int64), np.zeros(o.size, dtype=np.int64)])
    fpr, tpr, _ = roc_curve(y, np.concatenate([i, o]), drop_intermediate=drop_intermediate)
    return fpr, tpr


def sweep_k(
    queries_id,
    queries_ood,
    database,
    ks: Iterable[int] = (1, 2, 5, 10, 20, 50),
    *,
    tpr: float = 0.95,
    exclude_self: bool = False,
    **kwargs,
) -> pd.DataFrame:
    """KNN+ metrics for several ``k``; the sorted neighbour distances are computed once for ``max(ks)``.

    ``exclude_self`` applies to ``queries_id`` only (leave-one-out: they must be the database itself);
    OOD queries are never in the database. Other keyword arguments (``normalize``, ``chunk_size``,
    ``device``, ``dtype``) as :func:`knn_distances`.  Returns a DataFrame with one row per ``k`` (in the order
    given) and columns ``k, fpr95, auroc, aupr, aupr_out, threshold, tpr``.
    """
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks is empty")
    kmax = max(ks)
    if min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {ks}")
    d_id = knn_distances(queries_id, database, kmax, exclude_self=exclude_self, **kwargs)
    d_ood = knn_distances(queries_ood, database, kmax, exclude_self=False, **kwargs)
    rows = []
    for k in ks:
        m = ood_metrics(-d_id[:, k - 1], -d_ood[:, k - 1], tpr=tpr)
        rows.append({"k": k} | {c: m[c] for c in _SWEEP_COLUMNS[1:]})
    return pd.DataFrame(rows, columns=list(_SWEEP_COLUMNS))


# ----------------------------------------------------------------------------------------------------
# Classifier baseline
# ----------------------------------------------------------------------------------------------------


def max_softmax_scores(logits, temperature: float = 1.0) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): ``max_c softmax(logits / T)_c``.

    ``logits`` is ``(n, num_classes)`` (numpy or torch); returns float64 ``(n,)``, higher = more ID.
    ``temperature=1`` is the original baseline (scipy.special.softmax, stable in float64).
    """
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"logits must be 2-D (n, num_classes) with num_classes >= 1, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or inf")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(z / float(temperature), axis=1).max(axis=1)
