"""Open-set recognition on the Semantic Shift Benchmark split (protocol ``ssb``): scores, OSCR, intervals.

The SSB split of Stanford Cars (Vaze et al., "Open-Set Recognition: a Good Closed-Set Classifier is All You
Need?", ICLR 2022) trains on 98 known classes and ranks the 98 unseen ones by semantic distance: Easy (76),
Medium (15), Hard (7); papers report "Hard" as Medium + Hard (22 classes). Every score here is computed on
one trained model (higher = more likely known):

* ``knn_plus``        KNN+ (Sun et al., ICML 2022) on the L2-normalised embedding, k chosen on validation;
* ``knn_plus_pooled`` KNN+ on the model's pooled backbone features (the paper's penultimate layer);
* ``nn1``             minus the distance to the nearest known image (k = 1, embedding);
* ``msp`` / ``mls`` / ``energy``  maximum softmax probability, maximum logit and the energy score
  ``logsumexp(logits)`` of the class logits, where the model has them: a proxy / normalised-softmax loss
  learns one vector per known class, and the logits are the scaled cosine similarities to them.

Metrics: AUROC, FPR at 95% TPR, AUPR-In / AUPR-Out (scikit-learn, via :func:`vericar.ood.ood_metrics`),
OSCR, and percentile bootstrap intervals (scipy.stats.bootstrap). pytorch-ood has AUROC / FPR95 / AUPR but
no OSCR, and would pin its own torch: OSCR is written here (Dhamija et al., NeurIPS 2018, as in Vaze et al.'s
code: the area under the curve of the correct-classification rate of known samples against the false-positive
rate of unknown samples, over all thresholds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp, softmax
from scipy.stats import bootstrap

from ..data.splits import Split
from ..ood import knn_scores, ood_metrics
from ..results import results_entry
from ..retrieval import KNNIndex

__all__ = ["GROUPS", "SCORES", "class_logits", "evaluate", "group_rows", "oscr", "scores", "ssb_evaluation",
           "ssb_results_entries"]

SCORES = {
    "knn_plus": "KNN+ (embedding)",
    "knn_plus_pooled": "KNN+ (pooled backbone features)",
    "nn1": "1-NN distance (embedding)",
    "msp": "max softmax probability (class proxies)",
    "mls": "max logit (class proxies)",
    "energy": "energy, logsumexp of logits (class proxies)",
}
#: the unknown test sets reported: the papers' Easy and Hard (= Medium + Hard), and Medium and Hard apart
GROUPS = {"easy": ("easy",), "hard (medium+hard)": ("medium", "hard"), "medium": ("medium",), "hard": ("hard",)}


def class_logits(run_dir: str | Path, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(logits, classes)`` from a run's class proxies (``proxies.npz``), or ``None`` when it has none.

    ``logits[i, j] = scale * cos(embeddings[i], proxy_j)``; ``classes`` are the label values of the proxies.
    """
    path = Path(run_dir) / "proxies.npz"
    if not path.is_file():
        return None
    saved = np.load(path)
    emb = torch.nn.functional.normalize(torch.from_numpy(np.asarray(embeddings, dtype=np.float32)), dim=-1)
    logits = float(saved["scale"]) * (emb @ torch.from_numpy(saved["proxies"]).float().t())
    return logits.numpy().astype(np.float64), saved["classes"]


def group_rows(cars, split: Split, ssb: pd.DataFrame) -> dict[str, np.ndarray]:
    """The unknown test rows of each :data:`GROUPS` entry, from ``split.ood_query`` and the SSB table."""
    difficulty = ssb.set_index("class_id")["ssb_split"]
    of_row = difficulty.reindex(cars.table["class_id"].to_numpy()).to_numpy()
    return {name: split.ood_query[np.isin(of_row[split.ood_query], kinds)] for name, kinds in GROUPS.items()}


def scores(embeddings: np.ndarray, labels: np.ndarray, split: Split, *, k: int, pooled: np.ndarray | None = None,
           k_pooled: int | None = None, logits: tuple[np.ndarray, np.ndarray] | None = None,
           device: str = "cpu") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per score, the score of every image (NaN where not computed) and whether its prediction is right.

    Returns ``(score, correct)``: ``score[name]`` has one value per row of the dataset, filled on
    ``split.query`` and ``split.ood_query``; ``correct[name]`` (same shape) says whether the known queries'
    predicted class is right: the nearest database image's class for the neighbour scores, the arg-max proxy's
    class for the logit scores (what OSCR counts).
    """
    n = len(labels)
    rows = np.concatenate([split.query, split.ood_query])
    db = split.database
    out, correct = {}, {}

    def put(values: np.ndarray) -> np.ndarray:
        full = np.full(n, np.nan)
        full[rows] = values
        return full

    nn_pred = np.full(n, -1)
    index = KNNIndex(embeddings[db], labels[db], device=device)
    _, idx = index.search(embeddings[split.query], 1)
    nn_pred[split.query] = labels[db][np.asarray(idx)[:, 0]]
    nn_correct = nn_pred == labels
    out["knn_plus"] = put(knn_scores(embeddings[rows], embeddings[db], k, device=device))
    out["nn1"] = put(knn_scores(embeddings[rows], embeddings[db], 1, device=device))
    correct["knn_plus"] = correct["nn1"] = nn_correct
    if pooled is not None:
        out["knn_plus_pooled"] = put(knn_scores(pooled[rows], pooled[db], k_pooled or k, device=device))
        correct["knn_plus_pooled"] = nn_correct
    if logits is not None:
        z, classes = logits
        z = z[rows]
        pred = np.full(n, -1)
        pred[rows] = classes[z.argmax(1)]
        out["msp"] = put(softmax(z, axis=1).max(1))
        out["mls"] = put(z.max(1))
        out["energy"] = put(logsumexp(z, axis=1))
        for name in ("msp", "mls", "energy"):
            correct[name] = pred == labels
    return out, correct


def oscr(known_correct: np.ndarray, known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Open-Set Classification Rate: area under CCR(t) against FPR(t) over all thresholds t.

    ``CCR(t)`` = share of known samples classified correctly *and* scored ``>= t``; ``FPR(t)`` = share of
    unknown samples scored ``>= t``. Ties are swept together. 1.0 needs perfect closed-set accuracy and
    perfect separation; a model that is always right but cannot separate gets about 0.5.
    """
    known_correct = np.asarray(known_correct, dtype=bool)
    s = np.concatenate([known_scores, unknown_scores])
    is_known = np.concatenate([np.ones(len(known_scores), bool), np.zeros(len(unknown_scores), bool)])
    right = np.concatenate([known_correct, np.zeros(len(unknown_scores), bool)])
    order = np.argsort(-s, kind="mergesort")
    s, is_known, right = s[order], is_known[order], right[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    ccr = np.cumsum(right)[last_of_tie] / max(1, len(known_scores))
    fpr = np.cumsum(~is_known)[last_of_tie] / max(1, len(unknown_scores))
    return float(np.trapezoid(np.r_[0.0, ccr], np.r_[0.0, fpr]))


def _auroc(id_scores, ood_scores, axis=-1):
    return ood_metrics(id_scores, ood_scores)["auroc"]


def evaluate(score: dict[str, np.ndarray], correct: dict[str, np.ndarray], split: Split,
             groups: dict[str, np.ndarray], *, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """One row per score x unknown group: AUROC with a bootstrap 95% interval, FPR95, AUPR-In / -Out, OSCR,
    and the closed-set accuracy of the known queries under that score's prediction."""
    rows = []
    q = split.query
    for name, s in score.items():
        known = s[q]
        for group, ood in groups.items():
            if len(ood) == 0:
                continue
            m = ood_metrics(known, s[ood])
            ci = bootstrap((known, s[ood]), _auroc, n_resamples=n_boot, vectorized=False, method="percentile",
                           random_state=np.random.default_rng(seed)).confidence_interval if n_boot else (np.nan,) * 2
            rows.append({"score": name, "name": SCORES[name], "unknown": group, "auroc": m["auroc"],
                         "auroc_lo": float(ci[0]), "auroc_hi": float(ci[1]), "fpr95": m["fpr95"], "aupr_in": m["aupr"],
                         "aupr_out": m["aupr_out"], "oscr": oscr(correct[name][q], known, s[ood]),
                         "closed_set_accuracy": float(np.mean(correct[name][q])), "n_known": len(q),
                         "n_unknown": len(ood)})
    return pd.DataFrame(rows)


def ssb_evaluation(cars, run, ssb: pd.DataFrame, *, ks, pseudo_ood_fraction: float = 0.2, seed: int = 0,
                   n_boot: int = 200, device: str = "cpu") -> dict:
    """Every score of :data:`SCORES` that ``run`` supports, evaluated on its ``ssb`` split.

    KNN+'s k is chosen on a validation split of the *training* images only
    (:func:`vericar.analyses.open_world.validation_sweep`: some known classes play the unknowns), for the embedding and
    for the pooled features apart. Returns ``table`` (:func:`evaluate`), ``scores``, ``correct``, ``groups``,
    ``k``, ``k_pooled`` and ``has_logits``.
    """
    from .open_world import choose_k, validation_sweep

    if run.split.protocol != "ssb":
        raise ValueError(f"{run.path} was trained with protocol {run.split.protocol!r}, not 'ssb'")
    labels, db = cars.labels, run.split.database

    def chosen(features):
        val = validation_sweep(features, labels, db, ks, pseudo_ood_fraction=pseudo_ood_fraction, seed=seed,
                               device=device)
        return choose_k(val)

    k = chosen(run.embeddings)
    k_pooled = chosen(run.pooled) if run.pooled is not None else None
    logits = class_logits(run.path, run.embeddings)
    s, correct = scores(run.embeddings, labels, run.split, k=k, pooled=run.pooled, k_pooled=k_pooled,
                        logits=logits, device=device)
    groups = group_rows(cars, run.split, ssb)
    return {"table": evaluate(s, correct, run.split, groups, n_boot=n_boot, seed=seed), "scores": s,
            "correct": correct, "groups": groups, "k": k, "k_pooled": k_pooled, "has_logits": logits is not None}


def ssb_results_entries(common: dict, run, ssb_eval: dict) -> list[dict]:
    """``results/06_ood.json``'s SSB entries (``experiment`` "ssb-open-set"), one per score x unknown group
    of :func:`ssb_evaluation`'s table: AUROC with its bootstrap interval, FPR95, AUPR in/out, OSCR, closed-set
    accuracy. ``common`` holds dataset, backbone and image_size; ``run`` is the SSB run (device, train time)."""
    ks = {"knn_plus": ssb_eval["k"], "knn_plus_pooled": ssb_eval["k_pooled"]}
    return [results_entry(
        **common, protocol="ssb", device=run.metrics["device"], experiment="ssb-open-set", method=row.score,
        method_name=row.name, unknown=row.unknown, k=ks.get(row.score),
        metrics={"auroc": row.auroc, "fpr95": row.fpr95, "aupr_in": row.aupr_in, "aupr_out": row.aupr_out,
                 "oscr": row.oscr, "closed_set_accuracy": row.closed_set_accuracy},
        auroc_ci95=[row.auroc_lo, row.auroc_hi], n_known=row.n_known, n_unknown=row.n_unknown,
        train_seconds=run.metrics.get("train_seconds"), run_folder=str(getattr(run, "path", "")))
        for row in ssb_eval["table"].itertuples()]
