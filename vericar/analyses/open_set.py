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

import dataclasses
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

__all__ = ["GROUPS", "SCORES", "choice_summary", "choice_tables", "class_logits", "evaluate", "group_rows",
           "open_set_evaluation", "open_set_results_entries", "oscr", "scores", "ssb_config", "ssb_evaluation",
           "train_validation_run", "validation_choice", "validation_config", "validation_folder"]

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


def validation_choice(val_run, labels, ks, *, device: str = "cpu") -> dict:
    """KNN+'s k (embedding, pooled features) and the best score, chosen on a validation run.

    ``val_run`` is a model trained with ``validation=True`` (:func:`vericar.data.validation_split`): its
    known queries and its unknowns (some known car models) are training images it never saw, so, unlike a
    pseudo-open set of images the model trained on, its AUROC ranks k and the scores as they will be used.
    k maximises AUROC there; so does the chosen score. Returns ``k``, ``k_pooled`` (None without pooled
    features), ``sweep`` (AUROC / FPR95 per features x k), ``table`` (:func:`evaluate` on the validation
    unknowns, no bootstrap), ``score`` (the chosen score's name) and ``about`` (the validation model's sizes).
    """
    from ..ood import sweep_k
    from .open_world import choose_k

    s = val_run.split
    if not val_run.config.validation or not len(s.ood_query):
        raise ValueError(f"{val_run.path} is not a validation run (train it with validation=True)")
    ks = [int(k) for k in ks if int(k) <= len(s.database)]
    sweeps, chosen = [], {}
    for name, features in (("embedding", val_run.embeddings), ("pooled", val_run.pooled)):
        if features is None:
            chosen[name] = None
            continue
        f = np.asarray(features)
        sweep = sweep_k(f[s.query], f[s.ood_query], f[s.database], ks, device=device)
        chosen[name] = choose_k(sweep, "auroc")
        sweeps.append(sweep.assign(features=name))
    logits = class_logits(val_run.path, val_run.embeddings)
    score, correct = scores(val_run.embeddings, labels, s, k=chosen["embedding"], pooled=val_run.pooled,
                            k_pooled=chosen["pooled"], logits=logits, device=device)
    table = evaluate(score, correct, s, {"validation": s.ood_query}, n_boot=0)
    best = table.sort_values(["auroc", "fpr95"], ascending=[False, True], kind="mergesort")["score"].iloc[0]
    about = (f"{Path(val_run.path).name}: trained on {len(s.database)} training images; {len(s.query)} known "
             f"queries, {len(s.ood_query)} unknown images of {len(s.heldout_class_ids)} held-out car models")
    return {"k": chosen["embedding"], "k_pooled": chosen["pooled"], "sweep": pd.concat(sweeps, ignore_index=True),
            "table": table, "score": str(best), "about": about}


def open_set_evaluation(run, labels, groups: dict[str, np.ndarray], *, ks, val_run=None,
                        pseudo_ood_fraction: float = 0.2, seed: int = 0, n_boot: int = 200,
                        device: str = "cpu") -> dict:
    """Every score of :data:`SCORES` that ``run`` supports, on its known queries against each unknown group.

    With ``val_run`` (:func:`validation_choice`), k and the headline score are chosen on that validation model
    (which must compute the same scores: pooled features and class proxies alike). k is used as chosen, although
    the run's database is larger than the validation model's (about 1.5x: 1.25x the classes, 1.25x the images
    per class); KNN+'s authors scale k with the database share; at the k = 1 chosen on the reference models it
    makes no difference.
    Without it, k comes from a pseudo-open set of ``run``'s own training images
    (:func:`vericar.analyses.open_world.validation_sweep`, whose pseudo-unknowns the model trained on) and no
    score is chosen. Returns ``table`` (:func:`evaluate`), ``scores``, ``correct``, ``groups``, ``k``,
    ``k_pooled``, ``has_logits``, ``chosen`` (a score name or None) and ``validation`` (the choice or None).
    """
    from .open_world import choose_k, validation_sweep

    db = run.split.database
    if val_run is not None:
        inputs = {r.path: {"pooled features": r.pooled is not None,
                           "class proxies": (Path(r.path) / "proxies.npz").is_file()} for r in (run, val_run)}
        if inputs[run.path] != inputs[val_run.path]:
            raise ValueError(f"{run.path} and its validation run {val_run.path} compute different scores "
                             f"({inputs[run.path]} against {inputs[val_run.path]}): train the validation run with the "
                             "run's own config (open_set.train_validation_run does)")
        choice = validation_choice(val_run, labels, ks, device=device)
        k, k_pooled = choice["k"], choice["k_pooled"]
    else:
        choice = None

        def chosen(features):
            return choose_k(validation_sweep(features, labels, db, ks, pseudo_ood_fraction=pseudo_ood_fraction,
                                             seed=seed, device=device))

        k = chosen(run.embeddings)
        k_pooled = chosen(run.pooled) if run.pooled is not None else None
    logits = class_logits(run.path, run.embeddings)
    s, correct = scores(run.embeddings, labels, run.split, k=k, pooled=run.pooled, k_pooled=k_pooled,
                        logits=logits, device=device)
    return {"table": evaluate(s, correct, run.split, groups, n_boot=n_boot, seed=seed), "scores": s,
            "correct": correct, "groups": groups, "k": k, "k_pooled": k_pooled, "has_logits": logits is not None,
            "chosen": choice["score"] if choice else None, "validation": choice}


def ssb_evaluation(cars, run, ssb: pd.DataFrame, *, ks, val_run=None, pseudo_ood_fraction: float = 0.2,
                   seed: int = 0, n_boot: int = 200, device: str = "cpu") -> dict:
    """:func:`open_set_evaluation` of a run trained on protocol ``ssb``, against the SSB's unknown groups
    (:data:`GROUPS`); ``val_run``: its validation model (``ssb`` with ``validation=True``)."""
    if run.split.protocol != "ssb":
        raise ValueError(f"{run.path} was trained with protocol {run.split.protocol!r}, not 'ssb'")
    return open_set_evaluation(run, cars.labels, group_rows(cars, run.split, ssb), ks=ks, val_run=val_run,
                               pseudo_ood_fraction=pseudo_ood_fraction, seed=seed, n_boot=n_boot, device=device)


def open_set_results_entries(common: dict, run, evaluation: dict, *, protocol: str = "ssb",
                             experiment: str = "ssb-open-set") -> list[dict]:
    """``results/06_ood.json``'s entries of an :func:`open_set_evaluation`, one per score x unknown group:
    AUROC with its bootstrap interval, FPR95, AUPR in/out, OSCR, closed-set accuracy, the k used, and whether
    the score is the one chosen on validation (with that choice's validation AUROC). ``common`` holds dataset,
    backbone and image_size; ``run`` is the evaluated run (device, train time)."""
    ks = {"knn_plus": evaluation["k"], "knn_plus_pooled": evaluation["k_pooled"]}
    choice = evaluation.get("validation")
    val_auroc = choice["table"].set_index("score")["auroc"] if choice else None
    k_on = "validation model" if choice else "pseudo-open set of the training images"
    return [results_entry(
        **common, protocol=protocol, device=run.metrics["device"], experiment=experiment, method=row.score,
        method_name=row.name, unknown=row.unknown, k=ks.get(row.score),
        k_chosen_on=k_on if row.score in ks else None,
        chosen_on_validation=bool(choice and row.score == choice["score"]),
        validation_auroc=float(val_auroc[row.score]) if val_auroc is not None and row.score in val_auroc else None,
        metrics={"auroc": row.auroc, "fpr95": row.fpr95, "aupr_in": row.aupr_in, "aupr_out": row.aupr_out,
                 "oscr": row.oscr, "closed_set_accuracy": row.closed_set_accuracy},
        auroc_ci95=[row.auroc_lo, row.auroc_hi], n_known=row.n_known, n_unknown=row.n_unknown,
        train_seconds=run.metrics.get("train_seconds"), run_folder=str(getattr(run, "path", "")))
        for row in evaluation["table"].itertuples()]


def ssb_config(config, ssb_file: str | None = None):
    """``config`` (a :class:`~vericar.config.TrainConfig`) turned to protocol ``ssb``, pooled features saved
    for KNN+ on them; ``ssb_file``: the SSB class split (None looks beside the dataset)."""
    return dataclasses.replace(config, protocol="ssb", holdout="model", save_pooled=True, ssb_file=ssb_file or "")


def validation_config(config):
    """The validation model's config of a model trained with ``config``: the same with ``validation=True``."""
    return dataclasses.replace(config, validation=True)


def validation_folder(run_dir: str | Path) -> Path:
    """Where a run's validation model lives: the folder beside it, ``<run folder>-val``."""
    return Path(run_dir).parent / f"{Path(run_dir).name}-val"


def train_validation_run(cars, run, *, progress: bool = False):
    """Train (or load, when finished) ``run``'s validation model (:func:`validation_config`,
    :func:`validation_folder`)."""
    from ..train import train

    return train(cars, validation_config(run.config), validation_folder(run.path), progress=progress)


def choice_tables(evaluation: dict) -> list[pd.DataFrame]:
    """For display: the validation model's AUROC / FPR95 per score (when a validation model chose), then
    every score's test AUROC, FPR95 and OSCR per unknown group, the chosen score marked."""
    out = []
    if evaluation.get("validation"):
        out.append(evaluation["validation"]["table"].set_index("name")[["auroc", "fpr95"]]
                   .rename(columns=lambda c: f"validation {c}").round(3))
    t = evaluation["table"]
    t = t.assign(name=np.where(t["score"] == evaluation.get("chosen"), "chosen: " + t["name"], t["name"]))
    out.append(t.pivot_table(index="name", columns="unknown", values=["auroc", "fpr95", "oscr"], sort=False).round(3))
    return out


def choice_summary(evaluation: dict) -> str:
    """The validation model's sizes, the k used for KNN+ and the chosen score's test AUROC per unknown group."""
    line = f"validation model {evaluation['validation']['about']}\n" if evaluation.get("validation") else ""
    line += f"KNN+ k: {evaluation['k']} (embedding)"
    if evaluation.get("k_pooled") is not None:
        line += f", {evaluation['k_pooled']} (pooled features)"
    if not evaluation.get("chosen"):
        return line + "; no score chosen (no validation model)"
    t = evaluation["table"]
    rows = t[t["score"] == evaluation["chosen"]]
    return (line + f"; chosen on validation: {evaluation['chosen']}, test AUROC " +
            ", ".join(f"{r.unknown} {r.auroc:.3f}" for r in rows.itertuples()))
