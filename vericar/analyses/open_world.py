"""Open-world evaluation beyond the scores of :mod:`vericar.ood`: choosing k without the OOD test set, the
baselines beside KNN+, and adding new classes to the database without retraining.

Everything works on row indices into one embedding matrix (one row per image of the dataset, as in a
:class:`~vericar.runs.TrainedRun`) and a :class:`~vericar.data.Split` of protocol ``open-world``:
``split.query`` are the in-distribution (ID) queries, ``split.ood_query`` the queries of held-out classes,
``split.database`` the labelled known images and ``split.ood_database`` the labelled images of the held-out
classes that can be added later.

Choosing k honestly
-------------------
:func:`validation_rows` builds a *pseudo*-open-world split from the known classes' database images only:
some known classes play the unknowns (``pseudo_ood_fraction`` of the classes), a share of each remaining
class's images are the ID queries, the rest is the database.  :func:`validation_sweep` runs the KNN+ k
sweep on it and :func:`choose_k` picks the k with the lowest FPR95 there (ties: higher AUROC, then smaller
k).  No held-out (test OOD) image is used.  The pseudo-unknowns were seen in training, which makes them
easier to reject than truly unseen cars, so the validation numbers are optimistic; only the *choice of k*
is taken from them.  The validation database holds ``(1 - query_fraction)`` of each class's images, so the
k chosen there is for a slightly sparser database than the test one.

Baselines
---------
``knn_plus``         KNN+ on the trained embeddings (L2-normalised, k-th neighbour distance)
``nn1_raw``          1-NN Euclidean distance without normalisation (k=1, ``normalize=False``)
``knn_plus_frozen``  KNN+ on the frozen backbone's features
``msp_frozen``       max softmax probability of a logistic-regression classifier trained on the frozen
                     features of the known training images (Hendrycks & Gimpel 2017)

Adding classes without retraining
---------------------------------
:func:`add_classes_experiment`: for each shot count and seed, ``shots`` labelled images per held-out
class (drawn from ``split.ood_database``) are appended to the database of known images; then

``known_p1_before`` / ``known_p1_after``  1-NN accuracy of the ID queries against the known database /
                                          the union database (adding classes can only steal neighbours)
``new_p1``                                1-NN accuracy of the held-out queries against the union database
``new_accepted``                          fraction of held-out queries whose KNN+ score against the union
                                          reaches the ID threshold fixed *before* adding (they are no
                                          longer flagged as unknown)
``new_accepted_before``                   the same against the known database alone (= FPR at that
                                          threshold: unknown cars wrongly accepted before they were added)
``known_accepted``                        the same for the ID queries (stays >= 95% by construction)
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..metrics import wilson_interval
from ..ood import knn_distances, knn_scores, max_softmax_scores, ood_metrics, sweep_k, threshold_at_tpr
from ..results import results_entry
from ..retrieval import KNNIndex

__all__ = [
    "METHODS",
    "add_classes_all",
    "add_classes_experiment",
    "add_classes_summary",
    "against_bars",
    "compare_methods",
    "holdout_summary",
    "k_selection",
    "most_familiar_unknowns",
    "ood_results_entries",
    "relation_acceptance",
    "choose_k",
    "evaluate_methods",
    "method_scores",
    "msp_scores",
    "nearest_relation",
    "softmax_baseline",
    "validation_rows",
    "validation_sweep",
]

#: Method key -> readable name (the order the notebook reports them in).
METHODS = {
    "knn_plus": "KNN+ (trained embeddings)",
    "nn1_raw": "1-NN distance, unnormalised (trained embeddings)",
    "knn_plus_frozen": "KNN+ (frozen backbone)",
    "msp_frozen": "max softmax (logistic regression on frozen backbone)",
}


# ----------------------------------------------------------------------------------------------------
# k chosen on a validation split of the known classes
# ----------------------------------------------------------------------------------------------------


def validation_rows(labels, database_rows, *, pseudo_ood_fraction: float = 0.2, query_fraction: float = 0.2,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(database, id_queries, pseudo_ood_queries)`` row arrays, all drawn from ``database_rows``.

    ``pseudo_ood_fraction`` of the classes present in ``database_rows`` (at least one, and at least one
    left) become pseudo-unknown: all their images are pseudo-OOD queries.  Of every other class,
    ``query_fraction`` of its images (at least one when the class has two or more) are ID queries; the
    rest form the database.  Deterministic in ``seed``.
    """
    labels = np.asarray(labels)
    rows = np.asarray(database_rows, dtype=np.int64)
    if not 0 < pseudo_ood_fraction < 1 or not 0 < query_fraction < 1:
        raise ValueError("pseudo_ood_fraction and query_fraction must be in (0, 1)")
    classes = np.unique(labels[rows])
    if len(classes) < 2:
        raise ValueError(f"a validation split needs at least 2 known classes, got {len(classes)}")
    rng = np.random.default_rng(seed)
    n_ood = min(len(classes) - 1, max(1, int(round(pseudo_ood_fraction * len(classes)))))
    ood_classes = rng.choice(classes, n_ood, replace=False)
    is_ood = np.isin(labels[rows], ood_classes)
    database, queries = [], []
    for c in classes[~np.isin(classes, ood_classes)]:
        members = rng.permutation(rows[labels[rows] == c])
        n_q = min(len(members) - 1, max(1, int(round(query_fraction * len(members))))) if len(members) > 1 else 0
        queries.append(members[:n_q])
        database.append(members[n_q:])
    database, queries = np.sort(np.concatenate(database)), np.sort(np.concatenate(queries))
    if len(queries) == 0:
        raise ValueError("no known class has two images; cannot build validation queries")
    return database, queries, np.sort(rows[is_ood])


def validation_sweep(embeddings, labels, database_rows, ks: Iterable[int], *, normalize: bool = True,
                     pseudo_ood_fraction: float = 0.2, query_fraction: float = 0.2, seed: int = 0,
                     device="cpu") -> pd.DataFrame:
    """KNN+ k sweep (:func:`vericar.ood.sweep_k`) on :func:`validation_rows`' pseudo-open-world split.

    ``ks`` larger than the validation database are dropped.  Adds columns ``n_database``, ``n_id``,
    ``n_ood``.
    """
    db, q_id, q_ood = validation_rows(labels, database_rows, pseudo_ood_fraction=pseudo_ood_fraction,
                                      query_fraction=query_fraction, seed=seed)
    emb = np.asarray(embeddings)
    ks = [int(k) for k in ks if int(k) <= len(db)]
    if not ks:
        raise ValueError(f"every k exceeds the validation database ({len(db)} images)")
    sweep = sweep_k(emb[q_id], emb[q_ood], emb[db], ks, normalize=normalize, device=device)
    return sweep.assign(n_database=len(db), n_id=len(q_id), n_ood=len(q_ood))


def choose_k(sweep: pd.DataFrame, metric: str = "fpr95") -> int:
    """The k of ``sweep`` with the best ``metric`` (``fpr95``: lowest; ``auroc``/``aupr``: highest).

    Ties go to the higher AUROC, then to the smaller k.
    """
    if metric not in ("fpr95", "auroc", "aupr"):
        raise ValueError(f"metric must be fpr95, auroc or aupr, got {metric!r}")
    if sweep.empty:
        raise ValueError("empty sweep")
    sign = 1.0 if metric == "fpr95" else -1.0
    order = sweep.assign(_key=sign * sweep[metric], _auroc=-sweep["auroc"]).sort_values(
        ["_key", "_auroc", "k"], kind="mergesort")
    return int(order["k"].iloc[0])


# ----------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------


def softmax_baseline(features, labels, *, C: float = 1.0, max_iter: int = 300, seed: int = 0):
    """A linear classifier (standardised features -> multinomial logistic regression) on known classes.

    Returns the fitted sklearn pipeline; :func:`msp_scores` turns it into OOD scores.  A contrast baseline
    with a fixed budget: lbfgs stopping at ``max_iter`` without converging is accepted silently (the
    iterations used are in ``pipeline[-1].n_iter_``).
    """
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("the softmax baseline needs at least 2 known classes")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(np.asarray(features, dtype=np.float32), labels)


def msp_scores(classifier, features) -> np.ndarray:
    """Maximum softmax probability of ``classifier``'s logits (higher = more ID)."""
    logits = np.asarray(classifier.decision_function(np.asarray(features, dtype=np.float32)), dtype=np.float64)
    if logits.ndim == 1:  # binary: sklearn returns the logit of class 1 against class 0
        logits = np.stack([np.zeros_like(logits), logits], axis=1)
    return max_softmax_scores(logits)


def method_scores(embeddings, frozen, labels, split, *, k: int, k_frozen: int,
                  methods: Sequence[str] = tuple(METHODS), msp_max_iter: int = 300, seed: int = 0,
                  device="cpu") -> dict[str, dict]:
    """ID and OOD scores of each method on ``split``: ``{method: {"id", "ood", "k"}}`` (higher = more ID).

    ``embeddings`` are the trained embeddings, ``frozen`` the frozen backbone's features (one row per image
    each), ``labels`` the class index of every image.  ``k`` / ``k_frozen`` are the KNN+ neighbours for the
    trained / frozen features; ``nn1_raw`` always uses k=1 without normalisation; ``msp_frozen`` fits
    :func:`softmax_baseline` on ``frozen[split.train]`` (``k`` is None for it).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if len(split.ood_query) == 0:
        raise ValueError("the split has no OOD queries (use protocol 'open-world')")
    emb, fro, labels = np.asarray(embeddings), np.asarray(frozen), np.asarray(labels)
    q, o, db = split.query, split.ood_query, split.database
    out: dict[str, dict] = {}
    for m in methods:
        if m == "knn_plus":
            out[m] = {"id": knn_scores(emb[q], emb[db], k, device=device),
                      "ood": knn_scores(emb[o], emb[db], k, device=device), "k": int(k)}
        elif m == "nn1_raw":
            out[m] = {"id": knn_scores(emb[q], emb[db], 1, normalize=False, device=device),
                      "ood": knn_scores(emb[o], emb[db], 1, normalize=False, device=device), "k": 1}
        elif m == "knn_plus_frozen":
            out[m] = {"id": knn_scores(fro[q], fro[db], k_frozen, device=device),
                      "ood": knn_scores(fro[o], fro[db], k_frozen, device=device), "k": int(k_frozen)}
        else:
            clf = softmax_baseline(fro[split.train], labels[split.train], max_iter=msp_max_iter, seed=seed)
            out[m] = {"id": msp_scores(clf, fro[q]), "ood": msp_scores(clf, fro[o]), "k": None}
    return out


def evaluate_methods(scores: dict[str, dict], tpr: float = 0.95) -> pd.DataFrame:
    """One row per method of :func:`method_scores`' output: FPR95 (with its Wilson 95% interval), AUROC,
    AUPR (ID positive), AUPR-Out, threshold, k, n_id, n_ood."""
    rows = []
    for m, s in scores.items():
        r = ood_metrics(s["id"], s["ood"], tpr=tpr)
        lo, hi = wilson_interval(int(round(r["fpr95"] * r["n_ood"])), r["n_ood"])
        rows.append({"method": m, "name": METHODS.get(m, m), "k": s["k"], "fpr95": r["fpr95"], "fpr95_lo": lo,
                     "fpr95_hi": hi, "auroc": r["auroc"], "aupr": r["aupr"], "aupr_out": r["aupr_out"],
                     "threshold": r["threshold"], "n_id": r["n_id"], "n_ood": r["n_ood"]})
    return pd.DataFrame(rows)


def nearest_relation(embeddings, split, hierarchy: pd.DataFrame, labels) -> pd.Series:
    """For each OOD query: how its nearest known database image relates to it, one of
    ``"same model, other year"``, ``"same make, other model"``, ``"other make"`` (by the hierarchy's
    ``make`` / ``model`` columns; ``labels`` are 0-based class indices into ``hierarchy``'s rows)."""
    emb, labels = np.asarray(embeddings), np.asarray(labels)
    idx = KNNIndex(emb[split.database], np.asarray(split.database)).search(emb[split.ood_query], 1)[1][:, 0]
    nn_rows = split.database[idx]
    h = hierarchy.reset_index(drop=True)
    q_h, n_h = h.iloc[labels[split.ood_query]], h.iloc[labels[nn_rows]]
    same_make = q_h["make"].to_numpy() == n_h["make"].to_numpy()
    same_model = same_make & (q_h["model"].to_numpy() == n_h["model"].to_numpy())
    rel = np.where(same_model, "same model, other year", np.where(same_make, "same make, other model", "other make"))
    return pd.Series(rel, index=split.ood_query, name="nearest_known")


# ----------------------------------------------------------------------------------------------------
# Adding classes without retraining
# ----------------------------------------------------------------------------------------------------


def _sample_shots(labels: np.ndarray, rows: np.ndarray, shots: int | None, rng) -> np.ndarray:
    if shots is None:
        return np.sort(rows)
    picked = []
    for c in np.unique(labels[rows]):
        members = rows[labels[rows] == c]
        picked.append(rng.choice(members, min(int(shots), len(members)), replace=False))
    return np.sort(np.concatenate(picked))


def _p1(index: KNNIndex, queries: np.ndarray, truth: np.ndarray) -> float:
    if len(queries) == 0:
        return float("nan")
    pred, _ = index.predict(queries, 1)
    return float(np.mean(pred == truth))


def add_classes_experiment(embeddings, labels, split, *, shots: Sequence[int | None] = (1, 5, None),
                           seeds: Sequence[int] = (0, 1, 2), k: int = 1, tpr: float = 0.95,
                           device="cpu") -> pd.DataFrame:
    """Label the held-out classes by adding their database images, without retraining; measure retrieval.

    For each entry of ``shots`` (images per held-out class; ``None`` = all of ``split.ood_database``) and
    each seed (one run only for ``None``), returns a row with ``shots`` (``"all"`` for ``None``), ``seed``,
    ``n_added``, ``known_p1_before``, ``known_p1_after``, ``new_p1``, ``new_accepted_before``,
    ``new_accepted``, ``known_accepted``
    (see the module docstring; acceptance uses KNN+ with ``k`` and the ID threshold at ``tpr`` fixed on the
    known database before adding).
    """
    emb, labels = np.asarray(embeddings, dtype=np.float32), np.asarray(labels)
    q, o, db, extra = (np.asarray(a, dtype=np.int64) for a in (split.query, split.ood_query, split.database,
                                                                 split.ood_database))
    if len(extra) == 0:
        raise ValueError("the split has no ood_database images to add (use protocol 'open-world')")
    known = KNNIndex(emb[db], labels[db], device=device)
    before = _p1(known, emb[q], labels[q])
    # the same (index-normalised) database vectors before and after, so known scores can only rise
    threshold = threshold_at_tpr(knn_scores(emb[q], known.embeddings, k, device=device), tpr)
    accepted_before = (float(np.mean(knn_scores(emb[o], known.embeddings, k, device=device) >= threshold))
                       if len(o) else float("nan"))
    rows = []
    for s in shots:
        for seed in ([None] if s is None else seeds):
            added = _sample_shots(labels, extra, s, np.random.default_rng(seed))
            union = KNNIndex(emb[db], labels[db], device=device).add(emb[added], labels[added])
            new_scores = -knn_distances(emb[o], union.embeddings, k, device=device)[:, -1] if len(o) else np.zeros(0)
            known_scores = -knn_distances(emb[q], union.embeddings, k, device=device)[:, -1]
            rows.append({"shots": "all" if s is None else int(s), "seed": seed, "n_added": len(added),
                         "known_p1_before": before, "known_p1_after": _p1(union, emb[q], labels[q]),
                         "new_p1": _p1(union, emb[o], labels[o]), "new_accepted_before": accepted_before,
                         "new_accepted": float(np.mean(new_scores >= threshold)) if len(o) else float("nan"),
                         "known_accepted": float(np.mean(known_scores >= threshold))})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Notebook 06, one function per step: every holdout's run at once
# ----------------------------------------------------------------------------------------------------
# ``runs`` maps a holdout ("year", "model", "make") to a trained run: anything with ``embeddings``, ``frozen``
# (one row per image), ``split`` (open-world) and ``metrics`` (``{"trained": {...}, "frozen": {...}}``).


def holdout_summary(runs: dict, hierarchy: pd.DataFrame, examples: int = 4) -> pd.DataFrame:
    """One row per holdout: the split's sizes, known-class P@1 of the trained and the frozen features, and
    ``examples`` names of held-out classes (``hierarchy``: ``class_id`` and ``class_name`` columns)."""
    names = hierarchy.set_index("class_id")["class_name"]
    rows = {}
    for h, r in runs.items():
        row = r.split.summary().drop("protocol").to_dict()
        row["known P@1 (trained)"] = r.metrics["trained"]["precision_at_1"]
        row["known P@1 (frozen)"] = r.metrics["frozen"]["precision_at_1"]
        row["held out, e.g."] = "; ".join(names.loc[np.asarray(r.split.heldout_class_ids)[:examples]])
        rows[h] = row
    return pd.DataFrame(rows).T


def k_selection(runs: dict, labels, ks: Sequence[int], *, pseudo_ood_fraction: float = 0.2, seed: int = 0,
                device="cpu") -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    """KNN+ k chosen on a validation split of the known classes, per holdout, for the trained embeddings and
    the frozen features (:func:`validation_sweep`, :func:`choose_k`); the test sweep is computed beside it
    but chooses nothing.

    Returns ``(sweeps, chosen, chosen_frozen)``: ``sweeps`` has one row per holdout x features x
    ``on`` ("validation" / "test") x k (columns of :func:`vericar.ood.sweep_k` plus ``holdout``, ``on``,
    ``features``); ``chosen`` / ``chosen_frozen`` map a holdout to its k.
    """
    sweeps, chosen, chosen_frozen = [], {}, {}
    for h, r in runs.items():
        s = r.split
        test_ks = [k for k in ks if k <= len(s.database)]
        for feats, name, store in ((r.embeddings, "trained", chosen), (r.frozen, "frozen", chosen_frozen)):
            feats = np.asarray(feats)
            val = validation_sweep(feats, labels, s.database, ks, pseudo_ood_fraction=pseudo_ood_fraction,
                                   seed=seed, device=device)
            store[h] = choose_k(val)
            test = sweep_k(feats[s.query], feats[s.ood_query], feats[s.database], test_ks, device=device)
            sweeps += [val.assign(holdout=h, on="validation", features=name),
                       test.assign(holdout=h, on="test", features=name)]
    return pd.concat(sweeps, ignore_index=True), chosen, chosen_frozen


def compare_methods(runs: dict, labels, chosen: dict[str, int], chosen_frozen: dict[str, int], *, seed: int = 0,
                    device="cpu") -> tuple[pd.DataFrame, dict[str, dict]]:
    """Every method of :data:`METHODS` on every holdout: ``(table, scores)``, ``table`` being
    :func:`evaluate_methods`' rows with a ``holdout`` column and ``scores[holdout]`` :func:`method_scores`."""
    tables, all_scores = [], {}
    for h, r in runs.items():
        all_scores[h] = method_scores(r.embeddings, r.frozen, labels, r.split, k=chosen[h],
                                      k_frozen=chosen_frozen[h], seed=seed, device=device)
        tables.append(evaluate_methods(all_scores[h]).assign(holdout=h))
    return pd.concat(tables, ignore_index=True), all_scores


def against_bars(table: pd.DataFrame, sweeps: pd.DataFrame, holdout: str, seed_claim: dict, target: dict
                 ) -> tuple[pd.DataFrame, dict]:
    """KNN+ on ``holdout`` against the seed's claim and the target (both ``{"fpr95", "auroc"}``).

    Returns ``(bars, verdict)``: ``bars`` one row each for the claim, the target, KNN+ with k chosen on
    validation, the hindsight best k of the test sweep (bounds what tuning k could add; not a result) and
    KNN+ on the frozen backbone; ``verdict`` has ``beats_claim`` / ``meets_target`` (both FPR95 and AUROC
    at least as good), ``k``, ``fpr95``, ``auroc``, ``hindsight_k``, ``hindsight_fpr95`` and
    ``validation_fpr95`` (the chosen k on the validation split, whose pseudo-unknowns were seen in training).
    """
    t = table.set_index(["holdout", "method"])
    best, frozen = t.loc[(holdout, "knn_plus")], t.loc[(holdout, "knn_plus_frozen")]
    trained = sweeps[(sweeps["holdout"] == holdout) & (sweeps["features"] == "trained")]
    test = trained[trained["on"] == "test"]
    oracle = test.loc[test["fpr95"].idxmin()]
    val = trained[(trained["on"] == "validation") & (trained["k"] == best["k"])]["fpr95"]
    rows = [("seed's claim", seed_claim["fpr95"], seed_claim["auroc"], 1), ("target", target["fpr95"], target["auroc"], None),
            (f"KNN+ trained, k on validation ({holdout})", best["fpr95"], best["auroc"], best["k"]),
            (f"KNN+ trained, hindsight best k on test ({holdout})", oracle["fpr95"], oracle["auroc"], oracle["k"]),
            (f"KNN+ frozen backbone ({holdout})", frozen["fpr95"], frozen["auroc"], frozen["k"])]
    bars = pd.DataFrame(rows, columns=["", "fpr95", "auroc", "k"]).set_index("")
    verdict = {"beats_claim": bool(best["fpr95"] <= seed_claim["fpr95"] and best["auroc"] >= seed_claim["auroc"]),
               "meets_target": bool(best["fpr95"] <= target["fpr95"] and best["auroc"] >= target["auroc"]),
               "k": int(best["k"]), "fpr95": float(best["fpr95"]), "auroc": float(best["auroc"]),
               "hindsight_k": int(oracle["k"]), "hindsight_fpr95": float(oracle["fpr95"]),
               "validation_fpr95": float(val.iloc[0]) if len(val) else float("nan")}
    return bars, verdict


def relation_acceptance(runs: dict, table: pd.DataFrame, scores: dict[str, dict], hierarchy: pd.DataFrame,
                        labels) -> pd.DataFrame:
    """How many unknown queries KNN+ accepts as known, by how their nearest known image relates to them
    (:func:`nearest_relation`): one row per holdout x relation with ``queries`` and ``accepted_share``."""
    t = table.set_index(["holdout", "method"])
    parts = []
    for h, r in runs.items():
        rel = nearest_relation(r.embeddings, r.split, hierarchy, labels)
        accepted = np.asarray(scores[h]["knn_plus"]["ood"]) >= t.loc[(h, "knn_plus"), "threshold"]
        parts.append(pd.DataFrame({"holdout": h, "nearest known image": rel.to_numpy(), "accepted": accepted}))
    return (pd.concat(parts).groupby(["holdout", "nearest known image"], sort=False)["accepted"]
            .agg(queries="size", accepted_share="mean"))


def most_familiar_unknowns(embeddings, split, ood_scores, n: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``n`` unknown queries with the highest KNN+ score (``ood_scores``, aligned with
    ``split.ood_query``): ``(query_rows, nearest_known_rows, scores)``, most familiar first."""
    emb, ood_scores = np.asarray(embeddings), np.asarray(ood_scores)
    worst = np.argsort(-ood_scores, kind="stable")[:n]
    q_rows = np.asarray(split.ood_query)[worst]
    nn = KNNIndex(emb[split.database], np.asarray(split.database)).search(emb[q_rows], 1)[1][:, 0]
    return q_rows, np.asarray(split.database)[nn], ood_scores[worst]


def add_classes_all(runs: dict, labels, chosen: dict[str, int], *, shots: Sequence[int | None] = (1, 5, None),
                    seeds: Sequence[int] = (0, 1, 2), device="cpu") -> pd.DataFrame:
    """:func:`add_classes_experiment` on every holdout (with its chosen KNN+ k), one ``holdout`` column."""
    return pd.concat([add_classes_experiment(r.embeddings, labels, r.split, shots=shots, seeds=seeds, k=chosen[h],
                                             device=device).assign(holdout=h) for h, r in runs.items()],
                     ignore_index=True)


def add_classes_summary(add: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation (over the sampling seeds) of :func:`add_classes_all`'s measures per
    holdout x shot count."""
    cols = ["n_added", "known_p1_before", "known_p1_after", "new_p1", "new_accepted_before", "new_accepted",
            "known_accepted"]
    return (add.assign(shots=add["shots"].astype(str)).groupby(["holdout", "shots"], sort=False)[cols]
            .agg(["mean", "std"]))


def ood_results_entries(common: dict, runs: dict, table: pd.DataFrame, add: pd.DataFrame,
                        chosen: dict[str, int]) -> list[dict]:
    """``results/06_ood.json``'s open-world entries: one per holdout x method (``experiment``
    "ood-detection": FPR95 with its Wilson interval, AUROC, AUPR, k and how it was chosen), then one per
    holdout x shot count (``experiment`` "add-without-retraining": means over the seeds). ``common`` holds
    the labels every entry shares (dataset, protocol, backbone, image_size)."""
    # the pseudo-open set's unknowns are known classes the model trained on (notebook 06 shows what that costs);
    # open_set.validation_choice chooses on a validation model instead
    pseudo = "pseudo-open set of the known training classes (seen in training)"
    k_on = {"knn_plus": pseudo, "knn_plus_frozen": pseudo, "nn1_raw": "fixed"}
    entries = []
    for row in table.itertuples():
        r = runs[row.holdout]
        entries.append(results_entry(
            **common, device=r.metrics["device"], experiment="ood-detection", holdout=row.holdout, method=row.method,
            method_name=row.name, k=None if pd.isna(row.k) else int(row.k), k_chosen_on=k_on.get(row.method),
            metrics={"fpr95": row.fpr95, "auroc": row.auroc, "aupr": row.aupr, "aupr_out": row.aupr_out},
            fpr95_ci95=[row.fpr95_lo, row.fpr95_hi], n_id=row.n_id, n_ood=row.n_ood,
            heldout_classes=len(r.split.heldout_class_ids), run_folder=str(getattr(r, "path", ""))))
    for (h, s), d in add.assign(shots=add["shots"].astype(str)).groupby(["holdout", "shots"], sort=False):
        entries.append(results_entry(
            **common, device=runs[h].metrics["device"], holdout=h, experiment="add-without-retraining",
            shots=s, seeds=[None if pd.isna(x) else int(x) for x in d["seed"]], k=chosen[h],
            metrics={"known_precision_at_1_before": d["known_p1_before"].mean(),
                     "known_precision_at_1_after": d["known_p1_after"].mean(), "new_precision_at_1": d["new_p1"].mean(),
                     "new_accepted_before": d["new_accepted_before"].mean(), "new_accepted": d["new_accepted"].mean(),
                     "known_accepted": d["known_accepted"].mean()},
            new_precision_at_1_std=d["new_p1"].std(ddof=0), n_added_mean=d["n_added"].mean()))
    return entries
