"""Retrieval metrics (P@1, Recall@k, MAP@R, R-precision), hierarchy-level accuracy and Wilson intervals.

Retrieval metrics
-----------------
Embeddings are L2-normalised and compared by cosine similarity.  For each query the references are
ranked by similarity (leave-one-out when no separate database is given: a query never retrieves itself).

* ``precision_at_1`` -- fraction of queries whose nearest reference has the query's class.
* ``recall_at_k`` -- fraction of queries with at least one reference of their class among the top k
  (the metric-learning "Recall@k"; ``recall_at_1 == precision_at_1``).
* ``map_at_r`` (MAP@R, Musgrave et al., "A Metric Learning Reality Check", ECCV 2020) -- for a query
  with ``R`` references of its class (leave-one-out: not counting itself),
  ``AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i)`` where ``rel(i) = 1`` iff the i-th neighbour has the
  query's class and ``P(i)`` is the precision among the first ``i`` neighbours; MAP@R is its mean.
* ``r_precision`` -- mean over queries of (same-class references among the top R) / R.

P@1, MAP@R and R-precision come from ``pytorch_metric_learning``'s ``AccuracyCalculator``, whose
``knn_func`` is the neighbour layer's exact search (:class:`vericar.neighbours.KNNFunc`); Recall@k is
computed here from the very same neighbour lists.  As in pml, queries whose class has no reference
(leave-one-out: no *other* item of the class) are left out of every metric.

Wilson score interval
---------------------
For ``k`` successes in ``n`` trials, ``p = k/n`` and ``z = Phi^{-1}(1 - alpha/2)``:

    centre = (p + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
    interval = [centre - half, centre + half]

(Wilson, 1927; the interval ``statsmodels.stats.proportion.proportion_confint(method="wilson")``
returns).  It stays inside [0, 1] and behaves well for p near 0 or 1 and small n, unlike the normal
approximation.  ``n = 0`` gives ``(nan, nan)``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from statsmodels.stats.proportion import proportion_confint

from .data.hierarchy import LEVELS, level_keys
from .neighbours import KNNFunc

__all__ = [
    "grouped_accuracy",
    "level_accuracy",
    "level_correct",
    "retrieval_metrics",
    "wilson_interval",
]


# ----------------------------------------------------------------------------------------------------
# Retrieval metrics
# ----------------------------------------------------------------------------------------------------


def _labels_to_codes(*arrays) -> list[np.ndarray]:
    """Map labels (any hashable dtype) to shared integer codes that survive pml's float cast."""
    lens = [len(a) for a in arrays]
    codes = pd.factorize(np.concatenate([np.asarray(a) for a in arrays]))[0]
    return np.split(codes.astype(np.int64), np.cumsum(lens)[:-1])


def _unit(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x),
                        dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return torch.nn.functional.normalize(t, dim=1)


def retrieval_metrics(query_embeddings, query_labels, db_embeddings=None, db_labels=None, *,
                      k_values: Sequence[int] = (1, 5, 10), knn: str = "auto") -> dict:
    """P@1, Recall@k, MAP@R and R-precision of cosine K-NN retrieval.

    Parameters
    ----------
    query_embeddings, query_labels : arrays (N, dim), (N,)
    db_embeddings, db_labels : arrays (M, dim), (M,), optional
        The reference set.  If omitted, leave-one-out within the queries (pml's
        ``ref_includes_query=True``: each query is ranked against all other queries).
    k_values : ints
        The k of the ``recall_at_k`` keys.
    knn : "auto", "torch" or "faiss"
        Backend of the exact K-NN search (:class:`vericar.neighbours.KNNFunc`, the neighbour layer; "auto"
        switches to faiss on large databases).

    Returns
    -------
    dict of python floats in [0, 1]: ``precision_at_1``, ``recall_at_<k>`` for each k, ``map_at_r``,
    ``r_precision`` (NaN when no query has a reference of its class).  See the module docstring.
    """
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    if (db_embeddings is None) != (db_labels is None):
        raise ValueError("give both db_embeddings and db_labels, or neither")
    k_values = sorted({int(k) for k in k_values})
    if any(k < 1 for k in k_values):
        raise ValueError(f"k_values must be >= 1, got {k_values}")
    q = _unit(query_embeddings, "query_embeddings")
    loo = db_embeddings is None
    if loo:
        (ql,) = _labels_to_codes(query_labels)
        r, rl = q, ql
    else:
        r = _unit(db_embeddings, "db_embeddings")
        ql, rl = _labels_to_codes(query_labels, db_labels)
        if r.shape[1] != q.shape[1]:
            raise ValueError(f"query dim {q.shape[1]} != db dim {r.shape[1]}")
    if len(ql) != len(q) or len(rl) != len(r):
        raise ValueError("embeddings and labels must have the same length")
    n_ref_avail = len(r) - int(loo)
    if n_ref_avail < 1:
        raise ValueError("need at least one reference per query (2 queries for leave-one-out)")

    # Neighbours needed: R = references of the query's class (MAP@R, R-precision) and max(k_values).
    ref_counts = pd.Series(rl).value_counts()
    max_bin = int(ref_counts.reindex(np.unique(ql)).fillna(0).max())
    need = max(max_bin - int(loo), k_values[-1])
    if need > n_ref_avail:
        raise ValueError(f"max(k_values)={k_values[-1]} exceeds the {n_ref_avail} references available"
                         f"{' (database items)' if not loo else ' (other queries, leave-one-out)'}; pass "
                         f"k_values no larger than {n_ref_avail} (e.g. k_values=(1,)) or use a larger database")
    # "max_bin_count" avoids pml's spurious warning when need == max_bin - 1 (leave-one-out).
    k_arg = "max_bin_count" if need == max_bin - int(loo) else need

    if knn not in ("auto", "torch", "faiss"):
        raise ValueError(f"unknown knn {knn!r}; expected 'auto', 'torch' or 'faiss'")
    knn_func = KNNFunc(knn)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k=k_arg, device=torch.device("cpu"), knn_func=knn_func,
    )
    ql_t, rl_t = torch.from_numpy(ql), torch.from_numpy(rl)
    if loo:
        acc = calc.get_accuracy(q, ql_t)
    else:
        acc = calc.get_accuracy(q, ql_t, r, rl_t, ref_includes_query=False)

    # Recall@k from the same neighbour lists, over the same (non-lone) queries.
    idx = knn_func.indices.cpu().numpy()
    hit = rl[idx] == ql[:, None]
    counts = ref_counts.reindex(ql).fillna(0).to_numpy() - int(loo)
    has_ref = counts > 0
    if not has_ref.all():
        lone = np.unique(np.asarray(query_labels)[~has_ref])
        warnings.warn(f"{int((~has_ref).sum())} of {len(ql)} queries have no possible match: their class "
                      f"({len(lone)} classes, e.g. {', '.join(map(str, lone[:3]))}) has no "
                      f"{'other item' if loo else 'database (e.g. training) item'}. Retrieval metrics leave them "
                      "out; level accuracies count them as misses. Add images of those classes to the database or "
                      "drop their queries.", stacklevel=2)
    out = {"precision_at_1": float(acc["precision_at_1"])}
    for k in k_values:
        out[f"recall_at_{k}"] = float(hit[has_ref, :k].any(axis=1).mean()) if has_ref.any() else float("nan")
    out["map_at_r"] = float(acc["mean_average_precision_at_r"])
    out["r_precision"] = float(acc["r_precision"])
    return out


# ----------------------------------------------------------------------------------------------------
# Hierarchy-level accuracy
# ----------------------------------------------------------------------------------------------------


def _pred_codes(pred: pd.DataFrame, level: str, codes: np.ndarray, uniques) -> np.ndarray:
    """Codes (in the class table's factorisation of ``level``) of pred's label prefixes; -1 if unknown."""
    cols = list(LEVELS[: LEVELS.index(level) + 1])
    if f"{level}_key" in pred.columns:
        keys = pred[f"{level}_key"].to_numpy()
    elif all(c in pred.columns for c in cols):
        keys = level_keys(pred.reset_index(drop=True), level).to_numpy()
    elif "class_index" in pred.columns:
        return codes[pred["class_index"].to_numpy(dtype=np.int64)]
    else:
        raise ValueError(f"pred needs a '{level}_key' column, the columns {cols} or 'class_index'")
    lookup = {key: i for i, key in enumerate(uniques)}
    return np.array([lookup.get(key, -1) for key in keys], dtype=np.int64)


def level_correct(pred: pd.DataFrame, true_class_index, class_table: pd.DataFrame) -> pd.DataFrame:
    """Is each query right at make, type, model and year?  The one per-level correctness of vericar.

    A query is correct at level L when its predicted label prefix down to L equals the truth's:
    make = ``(make,)``, type = ``(make, type)``, model = ``(make, type, model)``, year = the full class
    (see :func:`vericar.data.hierarchy.level_keys`).  The predicted prefix is taken from pred's
    ``<level>_key`` columns (as :func:`vericar.retrieval.hierarchical_predict` writes them), else built
    from its ``make, type, model, year`` columns, else looked up from its ``class_index``.

    Parameters
    ----------
    pred : DataFrame, one row per query.
    true_class_index : int array (N,)
        True 0-based class index of each query.
    class_table : DataFrame
        One row per class (row i = class index i) with make, type, model, year.

    Returns
    -------
    DataFrame of booleans, one row per query (pred's index), columns ``make, type, model, year``.
    """
    truth = np.asarray(true_class_index, dtype=np.int64)
    if len(truth) != len(pred):
        raise ValueError(f"pred has {len(pred)} rows but {len(truth)} true labels were given")
    table = class_table.reset_index(drop=True)
    if len(truth) and (truth.min() < 0 or truth.max() >= len(table)):
        raise ValueError(f"true_class_index must be in 0..{len(table) - 1}")
    out = {}
    for level in LEVELS:
        codes, uniques = pd.factorize(level_keys(table, level))
        out[level] = codes[truth] == _pred_codes(pred, level, codes, uniques)
    return pd.DataFrame(out, index=pred.index)


def level_accuracy(pred: pd.DataFrame, true_class_index, class_table: pd.DataFrame) -> dict:
    """Accuracy at each hierarchy level, with prefix semantics.

    Correctness is :func:`level_correct`'s (prefix semantics), with the same parameters.

    Returns
    -------
    dict
        ``accuracy_make, accuracy_type, accuracy_model, accuracy_year`` and, among the queries whose
        class is wrong (year level wrong), ``make_right_given_class_wrong`` and
        ``type_right_given_class_wrong`` (make+type right) -- NaN if no class is wrong -- plus the
        counts ``n_queries`` and ``n_class_wrong``.
    """
    correct = {lv: c.to_numpy(bool) for lv, c in level_correct(pred, true_class_index, class_table).items()}
    n = len(pred)
    out = {f"accuracy_{lv}": float(correct[lv].mean()) if n else float("nan") for lv in LEVELS}
    wrong = ~correct["year"]
    nw = int(wrong.sum())
    out["make_right_given_class_wrong"] = float(correct["make"][wrong].mean()) if nw else float("nan")
    out["type_right_given_class_wrong"] = float(correct["type"][wrong].mean()) if nw else float("nan")
    out["n_queries"] = n
    out["n_class_wrong"] = nw
    return out


# ----------------------------------------------------------------------------------------------------
# Confidence intervals
# ----------------------------------------------------------------------------------------------------


def wilson_interval(k, n, alpha: float = 0.05):
    """Wilson score interval for ``k`` successes in ``n`` trials at level ``1 - alpha``.

    Works on scalars (returns a tuple of floats) and on arrays (a tuple of arrays).  ``n = 0`` gives
    NaN.  statsmodels computes it (module docstring); e.g. ``wilson_interval(8, 10) ~= (0.490, 0.943)``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    if (k_arr < 0).any() or (k_arr > n_arr).any():
        raise ValueError("need 0 <= k <= n")
    with np.errstate(invalid="ignore", divide="ignore"):
        low, high = proportion_confint(k_arr, n_arr, alpha=alpha, method="wilson")
    low = np.where(n_arr == 0, np.nan, np.where(k_arr == 0, 0.0, low))
    high = np.where(n_arr == 0, np.nan, np.where(k_arr == n_arr, 1.0, high))
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def grouped_accuracy(correct, groups, *, ci: str = "wilson", alpha: float = 0.05) -> pd.DataFrame:
    """Accuracy per group with a Wilson confidence interval.

    Parameters
    ----------
    correct : bool array (N,)
    groups : array (N,)
        Group of each item (make, body type, ...).
    ci : "wilson"
        Interval method (only Wilson, see :func:`wilson_interval`).
    alpha : float
        1 - confidence level.

    Returns
    -------
    DataFrame with columns ``group, n, correct, accuracy, ci_low, ci_high``, sorted by accuracy
    ascending (worst group first; ties by group).
    """
    if ci != "wilson":
        raise ValueError(f"unknown ci {ci!r}; only 'wilson' is implemented")
    c = np.asarray(correct)
    g = np.asarray(groups)
    if c.ndim != 1 or g.shape != c.shape:
        raise ValueError(f"correct and groups must be 1-D of equal length, got {c.shape} and {g.shape}")
    if c.dtype != bool:
        if not np.isin(c, (0, 1)).all():
            raise ValueError("correct must be boolean (or 0/1)")
        c = c.astype(bool)
    df = (pd.DataFrame({"group": g, "correct": c})
          .groupby("group", sort=True)["correct"].agg(n="size", correct="sum").reset_index())
    df["n"] = df["n"].astype(np.int64)
    df["correct"] = df["correct"].astype(np.int64)
    df["accuracy"] = df["correct"] / df["n"]
    low, high = wilson_interval(df["correct"].to_numpy(), df["n"].to_numpy(), alpha)
    df["ci_low"], df["ci_high"] = low, high
    return df.sort_values(["accuracy", "group"], kind="stable").reset_index(drop=True)
