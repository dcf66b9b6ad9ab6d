"""Hierarchy ablation (notebook 07): one model trained with MS, HiMS-Min and HiMS-Max, compared level by level.

Grid
----
:func:`base_config` takes notebook 03's reference run configuration (``<run_dir>/models/official/config.json``)
so the ablation uses the same backbone, image size and budget, and its cached backbone features;
:func:`grid_configs` derives one :class:`~vericar.config.TrainConfig` per (loss, protocol) that differs
*only* in ``loss`` (and the hierarchical losses' keywords) and ``protocol``; :func:`train_grid` trains them
into ``<models_dir>/<prefix>_<loss>_<protocol>`` (idempotent, like :func:`vericar.train.train`).

Per-query outcomes
------------------
:func:`level_outcomes`: every query of a split is named by a hierarchical K-NN vote against the split's
database (:func:`vericar.retrieval.hierarchical_predict`; ``k=1`` copies the nearest neighbour) and marked
correct or not at each level by :func:`vericar.metrics.level_correct` (prefix semantics: type =
make + type, model = make + type + model, year = the class).  ``queries="ood_query"`` does the same for the
held-out classes of ``open-world`` against the *known* database.  A held-out class is never in the
database, so its class (and, when the held-out unit is the model, its model) cannot be right; its make and
type can, but only when some known class shares them: ``known_<level>`` records whether the query's true
label prefix at that level occurs in the database, and :func:`outcome_metrics` reports accuracy both over
all queries and over the queries whose label exists in the database (``*_known``).

Coarse right when fine is wrong
-------------------------------
:func:`error_depth` sorts the queries whose class is wrong by how far down the hierarchy the prediction
stays right (the deepest level such that it and every coarser level are right): ``other make``,
``right make``, ``right make + type``, ``right model, other year``.  A loss that organises the embedding
by the hierarchy should move its errors to the right of that list.

Paired comparison
-----------------
All variants answer the same queries, so a variant is compared with the baseline query by query
(:func:`paired_comparison`): ``b`` = queries only the baseline gets right, ``c`` = only the variant;
difference of accuracies ``(c - b) / n`` with a normal-approximation 95% interval
(``var = (b + c - (b - c)^2 / n) / n^2``) and the exact McNemar test (two-sided binomial test of
``c`` successes in ``b + c`` trials at 1/2; ``p = 1`` when ``b + c = 0``).  :func:`compare_variants` does it
for every variant, protocol, query set and level and adds Holm-adjusted p-values over the whole table
(:func:`holm`) and a verdict ("better", "worse", "no significant difference" at ``alpha``).  This measures
the noise of the finite query set for the one training run per variant; training-seed variation is not
included.

Which level drives the hierarchical loss
----------------------------------------
:func:`effective_level_weights`: on class-balanced batches of given embeddings, the share of the
hierarchical loss's total (and so of its gradient) that each *raw* level loss supplies once the min/max
constraint has replaced the level terms (:class:`vericar.losses.HierarchicalMSLoss`).  E.g. HiMS-Min with
the default fine-to-coarse order, on batches where the raw losses fall from make to year, puts all four
terms on the year loss: the whole loss is then the flat MS loss on classes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.multitest import multipletests

from ..data.hierarchy import LEVELS, level_keys
from ..data.splits import Split
from ..evaluation import evaluate_embeddings
from ..losses import HierarchicalMSLoss, level_label_matrix
from ..metrics import level_correct, wilson_interval
from ..results import results_entry
from ..retrieval import KNNIndex, hierarchical_predict

__all__ = [
    "ABLATION_LOSSES",
    "DEPTH_LABELS",
    "ablation_configs",
    "base_config",
    "compare_variants",
    "effective_level_weights",
    "error_depth",
    "holm",
    "level_outcomes",
    "outcome_metrics",
    "paired_comparison",
    "grid_configs",
    "run_folder",
    "train_grid",
]

#: Loss name (:data:`vericar.losses.LOSSES`) -> name in the figures.
ABLATION_LOSSES: dict[str, str] = {"ms": "MS", "hims_min": "HiMS-Min", "hims_max": "HiMS-Max"}

#: Deepest right level of a query whose class is wrong -> its label (coarse to fine).
DEPTH_LABELS: dict[str, str] = {"none": "other make", "make": "right make", "type": "right make + type",
                                "model": "right model, other year"}


# ----------------------------------------------------------------------------------------------------
# The grid of runs
# ----------------------------------------------------------------------------------------------------


def base_config(reference: str | Path | None = None, **overrides):
    """The reference run's :class:`~vericar.config.TrainConfig` with ``overrides`` (``None`` values are ignored).

    ``reference``: a run folder or its ``config.json`` (notebook 03's ``<run_dir>/models/official``).  When it
    does not exist, the :class:`TrainConfig` defaults are the base.  Returns ``(config, source)``, ``source``
    being the config file read or ``None``.
    """
    from ..config import TrainConfig

    source = None
    data: dict = {}
    if reference is not None:
        path = Path(reference)
        path = path / "config.json" if path.is_dir() else path
        if path.is_file():
            data, source = json.loads(path.read_text()), path
    config = TrainConfig.from_json(data) if data else TrainConfig()
    unknown = [k for k in overrides if k not in {f.name for f in dataclasses.fields(config)}]
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {unknown}")
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None}), source


def grid_configs(base, losses: Iterable[str], protocols: Iterable[str], *,
                 hierarchical_kwargs: Mapping | None = None) -> dict[tuple[str, str], object]:
    """One config per (loss, protocol): ``base`` with only ``loss``, ``protocol`` and ``loss_kwargs`` changed.

    ``hierarchical_kwargs`` (e.g. ``{"order": "coarse_to_fine"}``, ``{"level_weights": [...]}``) go to the
    losses that take level labels (``hims_*``, ``seed_hier_clamp``); flat losses keep ``base.loss_kwargs``.
    """
    from ..losses import make_loss

    out = {}
    for loss in losses:
        hierarchical = getattr(make_loss(loss), "needs_level_labels", False)
        kwargs = dict(hierarchical_kwargs or {}) if hierarchical else dict(base.loss_kwargs)
        for protocol in protocols:
            out[(loss, protocol)] = dataclasses.replace(base, loss=loss, protocol=protocol, loss_kwargs=kwargs)
    return out


def run_folder(models_dir: str | Path, loss: str, protocol: str, prefix: str = "07") -> Path:
    """``<models_dir>/<prefix>_<loss>_<protocol>``."""
    return Path(models_dir) / f"{prefix}_{loss}_{protocol}"


def train_grid(cars, configs: Mapping[tuple[str, str], object], models_dir: str | Path, *, prefix: str = "07",
               progress: bool = False, **train_kwargs) -> dict[tuple[str, str], object]:
    """Train (or load, when finished with the same config) every config of :func:`grid_configs`.

    Returns ``{(loss, protocol): TrainedRun}`` in the order of ``configs``.
    """
    from ..train import train

    return {(loss, protocol): train(cars, config, run_folder(models_dir, loss, protocol, prefix),
                                    progress=progress, **train_kwargs)
            for (loss, protocol), config in configs.items()}


# ----------------------------------------------------------------------------------------------------
# Per-query outcomes
# ----------------------------------------------------------------------------------------------------


def level_outcomes(embeddings, labels, split: Split, class_table: pd.DataFrame, *, queries: str = "query",
                   k: int = 1, device="cpu") -> pd.DataFrame:
    """Per-query, per-level correctness of a hierarchical K-NN vote against ``split.database``.

    Parameters
    ----------
    embeddings : array (n_images, dim)
        One row per image (as ``TrainedRun.embeddings``).
    labels : int array (n_images,)
        0-based class index of every image.
    split : Split
        ``split.database`` is searched; leave-one-out when ``split.leave_one_out`` and ``queries="query"``.
    class_table : DataFrame
        One row per class index with make, type, model, year (``CarsDataset.hierarchy``).
    queries : "query" or "ood_query"
        Which rows of ``split`` are the queries.
    k : int
        Neighbours voting at each level (:func:`vericar.retrieval.hierarchical_predict`).

    Returns
    -------
    DataFrame, one row per query (in split order): ``row``, ``true_class``, ``pred_class`` (year-level
    winner), ``correct_<level>`` and ``known_<level>`` (the true label prefix occurs in the database, not
    counting the query itself under leave-one-out) for each level of make, type, model, year, and
    ``depth``: the deepest level such that it and all coarser levels are right (``"none"`` if the make is
    wrong).
    """
    if queries not in ("query", "ood_query"):
        raise ValueError(f"queries must be 'query' or 'ood_query', got {queries!r}")
    emb = np.asarray(embeddings)
    labels = np.asarray(labels, dtype=np.int64)
    if len(emb) != len(labels):
        raise ValueError(f"{len(emb)} embeddings but {len(labels)} labels")
    table = class_table.reset_index(drop=True)
    db = np.asarray(split.database, dtype=np.int64)
    q = np.asarray(getattr(split, queries), dtype=np.int64)
    loo = queries == "query" and split.leave_one_out
    out = pd.DataFrame({"row": q, "true_class": labels[q]})
    if len(q) == 0:
        for level in LEVELS:
            out[f"correct_{level}"] = np.zeros(0, bool)
            out[f"known_{level}"] = np.zeros(0, bool)
        return out.assign(pred_class=np.zeros(0, np.int64), depth=np.zeros(0, object))
    index = KNNIndex(emb[db], labels[db], device=device)
    dist, nb = index.search(emb[q], k, exclude_self=loo)
    pred = hierarchical_predict(index.labels[nb], dist, table)
    out["pred_class"] = pred["class_index"].to_numpy(dtype=np.int64)
    right = level_correct(pred, out["true_class"].to_numpy(), table)
    depth = np.full(len(q), "none", dtype=object)
    still = np.ones(len(q), dtype=bool)
    for level in LEVELS:
        codes, uniques = pd.factorize(level_keys(table, level))
        true_codes = codes[out["true_class"].to_numpy()]
        counts = np.bincount(codes[labels[db]], minlength=len(uniques))
        known = counts[true_codes] > (1 if loo else 0)
        correct = right[level].to_numpy(bool)
        out[f"correct_{level}"] = correct
        out[f"known_{level}"] = known
        still &= correct
        depth[still] = level
    out["depth"] = depth
    return out


def outcome_metrics(outcomes: pd.DataFrame, prefix: str = "") -> dict[str, float]:
    """Accuracy per level from :func:`level_outcomes`, overall and over queries whose label is in the database.

    Keys (``prefix`` prepended): ``accuracy_<level>`` (all queries), ``accuracy_<level>_known`` (queries
    whose true label prefix at that level occurs in the database; NaN when none), ``<level>_known_fraction``,
    ``make_right_given_class_wrong`` / ``type_right_given_class_wrong`` (among class-wrong queries, as
    :func:`vericar.metrics.level_accuracy`), ``n_queries``, ``n_class_wrong``.
    """
    n = len(outcomes)
    out: dict[str, float] = {}
    for level in LEVELS:
        c = outcomes[f"correct_{level}"].to_numpy(bool)
        kn = outcomes[f"known_{level}"].to_numpy(bool)
        out[f"accuracy_{level}"] = float(c.mean()) if n else float("nan")
        out[f"accuracy_{level}_known"] = float(c[kn].mean()) if kn.any() else float("nan")
        out[f"{level}_known_fraction"] = float(kn.mean()) if n else float("nan")
    wrong = ~outcomes["correct_year"].to_numpy(bool)
    nw = int(wrong.sum())
    out["make_right_given_class_wrong"] = (float(outcomes["correct_make"].to_numpy(bool)[wrong].mean())
                                           if nw else float("nan"))
    out["type_right_given_class_wrong"] = (float(outcomes["correct_type"].to_numpy(bool)[wrong].mean())
                                           if nw else float("nan"))
    out["n_queries"] = n
    out["n_class_wrong"] = nw
    return {f"{prefix}{k}": v for k, v in out.items()}


def heldout_level_table(ood_outcomes: Mapping[tuple, pd.DataFrame], names: Mapping[str, str] | None = None,
                        levels: Sequence[str] = ("make", "type")) -> pd.DataFrame:
    """Held-out-model queries per (loss, protocol) from :func:`level_outcomes`: accuracy at each coarse level
    over the queries whose true label at that level exists in the database (``eligible``), with a Wilson
    interval, and over all held-out queries (``accuracy_all_ood``). Keys of ``ood_outcomes`` are
    ``(loss, protocol)``; ``names`` maps a loss to its display name."""
    from ..metrics import wilson_interval

    rows = []
    for (loss, _protocol), o in ood_outcomes.items():
        for level in levels:
            known = o[f"known_{level}"].to_numpy(bool)
            c = o[f"correct_{level}"].to_numpy(bool)[known]
            lo, hi = wilson_interval(int(c.sum()), len(c)) if len(c) else (np.nan, np.nan)
            rows.append({"loss": (names or {}).get(loss, loss), "level": level,
                         "accuracy": c.mean() if len(c) else np.nan, "ci_low": lo, "ci_high": hi,
                         "eligible": int(known.sum()), "ood_queries": len(o),
                         "accuracy_all_ood": o[f"correct_{level}"].mean()})
    return pd.DataFrame(rows)


def error_depth(outcomes: pd.DataFrame, *, relative_to: str = "class_wrong") -> pd.Series:
    """How far down the hierarchy the class-wrong queries stay right (see the module docstring).

    ``relative_to="class_wrong"``: shares among the queries whose class is wrong (they sum to 1);
    ``"all"``: shares among all queries (they sum to the error rate).  Indexed by the labels of
    :data:`DEPTH_LABELS`, coarse to fine; attribute ``n`` of the result is the denominator.
    """
    if relative_to not in ("class_wrong", "all"):
        raise ValueError(f"relative_to must be 'class_wrong' or 'all', got {relative_to!r}")
    wrong = outcomes.loc[~outcomes["correct_year"].to_numpy(bool), "depth"]
    counts = wrong.value_counts().reindex(list(DEPTH_LABELS), fill_value=0)
    n = len(wrong) if relative_to == "class_wrong" else len(outcomes)
    shares = counts / n if n else counts.astype(float) * np.nan
    shares.index = [DEPTH_LABELS[d] for d in shares.index]
    shares.name = "share"
    shares.attrs["n"] = int(n)
    return shares.astype(float)


# ----------------------------------------------------------------------------------------------------
# Paired comparison
# ----------------------------------------------------------------------------------------------------


def paired_comparison(correct_base, correct_variant, alpha: float = 0.05) -> dict[str, float]:
    """Paired accuracy difference (variant - base) on the same queries, with its CI and exact McNemar p.

    Returns ``n, accuracy_base, accuracy_variant, diff, ci_low, ci_high, base_only, variant_only, p_value``
    (formulas in the module docstring).  ``n = 0`` gives NaNs.
    """
    a = np.asarray(correct_base, dtype=bool)
    b_ = np.asarray(correct_variant, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1:
        raise ValueError(f"correct_base and correct_variant must be 1-D of equal length, got {a.shape}, {b_.shape}")
    n = len(a)
    base_only = int((a & ~b_).sum())
    variant_only = int((~a & b_).sum())
    if n == 0:
        nan = float("nan")
        return dict(n=0, accuracy_base=nan, accuracy_variant=nan, diff=nan, ci_low=nan, ci_high=nan,
                    base_only=0, variant_only=0, p_value=nan)
    diff = (variant_only - base_only) / n
    var = max(0.0, (base_only + variant_only - (variant_only - base_only) ** 2 / n)) / n**2
    half = norm.ppf(1 - alpha / 2) * np.sqrt(var)
    discordant = base_only + variant_only
    p = 1.0 if discordant == 0 else float(binomtest(variant_only, discordant, 0.5).pvalue)
    return dict(n=n, accuracy_base=float(a.mean()), accuracy_variant=float(b_.mean()), diff=float(diff),
                ci_low=float(diff - half), ci_high=float(diff + half), base_only=base_only,
                variant_only=variant_only, p_value=p)


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order as given; NaNs stay NaN and are not counted)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def compare_variants(outcomes: Mapping[tuple, pd.DataFrame], baseline: str = "ms", *, alpha: float = 0.05,
                     levels: Sequence[str] = LEVELS, restrict_to_known: bool = False) -> pd.DataFrame:
    """Every variant against ``baseline`` on the same queries, level by level (:func:`paired_comparison`).

    ``outcomes``: ``{(loss, *group): level_outcomes table}``, e.g. ``(loss, protocol, query_set)``; a variant
    is compared with ``(baseline, *group)``.  ``restrict_to_known``: only queries whose true label at the
    level occurs in the database (for held-out classes).  Returns one row per (variant, group, level) with
    the group keys as ``group_0, group_1, ...``, the :func:`paired_comparison` columns, ``p_holm``
    (Holm-adjusted over the table) and ``verdict``.
    """
    rows = []
    for key, table in outcomes.items():
        loss, *group = key
        if loss == baseline:
            continue
        base = outcomes.get((baseline, *group))
        if base is None:
            raise KeyError(f"no baseline outcomes for {(baseline, *group)}")
        if not np.array_equal(base["row"].to_numpy(), table["row"].to_numpy()):
            raise ValueError(f"{key} and its baseline answer different queries")
        for level in levels:
            keep = (base[f"known_{level}"].to_numpy(bool) if restrict_to_known
                    else np.ones(len(base), dtype=bool))
            res = paired_comparison(base[f"correct_{level}"].to_numpy(bool)[keep],
                                    table[f"correct_{level}"].to_numpy(bool)[keep], alpha)
            rows.append({"variant": loss, **{f"group_{i}": g for i, g in enumerate(group)}, "level": level, **res})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["p_holm"] = holm(df["p_value"].to_numpy())
    df["verdict"] = np.where(df["p_holm"] < alpha, np.where(df["diff"] > 0, "better", "worse"),
                             "no significant difference")
    return df


# ----------------------------------------------------------------------------------------------------
# Which raw level loss the constrained hierarchical loss is made of
# ----------------------------------------------------------------------------------------------------


def _sources(raw: np.ndarray, constraint: str, order: str) -> np.ndarray:
    """Index of the raw level loss each constrained level term equals (see HierarchicalMSLoss.constrain)."""
    n = len(raw)
    src = np.arange(n)
    if constraint == "none":
        return src
    better = (lambda x, y: x < y) if constraint == "min" else (lambda x, y: x > y)
    idx = range(n - 2, -1, -1) if order == "fine_to_coarse" else range(1, n)
    step = 1 if order == "fine_to_coarse" else -1
    for l in idx:
        prev = src[l + step]
        src[l] = prev if better(raw[prev], raw[l]) else l
    return src


def effective_level_weights(embeddings, class_index, class_table: pd.DataFrame, *,
                            constraints: Sequence[str] = ("min", "max"), order: str = "fine_to_coarse",
                            level_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), batch_size: int = 128,
                            m_per_class: int = 4, n_batches: int = 20, seed: int = 0,
                            ms_kwargs: Mapping | None = None) -> pd.DataFrame:
    """Share of the hierarchical loss each raw level loss makes up, on class-balanced batches of ``embeddings``.

    Batches: ``batch_size // m_per_class`` classes drawn without replacement (all if fewer), ``m_per_class``
    images each (with replacement when a class has fewer).  On each batch the raw per-level MS losses
    ``M_l`` are computed once; for each constraint the constrained term ``C_l`` equals some ``M_j``
    (:meth:`vericar.losses.HierarchicalMSLoss.constrain`), and level ``j``'s share is
    ``sum_{l: C_l = M_j} w_l / sum w``.  Returns one row per constraint with the mean share of each
    level (columns ``make, type, model, year``), ``binding`` (mean fraction of level terms replaced by
    another level's loss), and the mean raw losses ``raw_<level>``.
    """
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    ci = np.asarray(class_index, dtype=np.int64)
    if len(emb) != len(ci):
        raise ValueError(f"{len(emb)} embeddings but {len(ci)} class indices")
    levels = level_label_matrix(ci, class_table)
    w = np.asarray(level_weights, dtype=float)
    loss = HierarchicalMSLoss(level_weights=tuple(w), constraint="none", order=order, **dict(ms_kwargs or {}))
    rng = np.random.default_rng(seed)
    classes = np.unique(ci)
    members = {c: np.flatnonzero(ci == c) for c in classes}
    per_class = max(1, batch_size // m_per_class)
    shares = {c: [] for c in constraints}
    binding = {c: [] for c in constraints}
    raws = []
    for _ in range(n_batches):
        chosen = rng.choice(classes, min(per_class, len(classes)), replace=False)
        rows = np.concatenate([rng.choice(members[c], m_per_class, replace=len(members[c]) < m_per_class)
                               for c in chosen])
        with torch.no_grad():
            raw = torch.stack(loss.level_losses(emb[rows], torch.from_numpy(levels[rows]))).numpy()
        raws.append(raw)
        for c in constraints:
            src = _sources(raw, c, order)
            share = np.zeros(len(raw))
            np.add.at(share, src, w)
            shares[c].append(share / w.sum())
            binding[c].append(float(np.mean(src != np.arange(len(raw)))))
    raw_mean = np.mean(raws, axis=0)
    out = []
    for c in constraints:
        s = np.mean(shares[c], axis=0)
        out.append({"constraint": c, "order": order, **dict(zip(LEVELS, s)), "binding": float(np.mean(binding[c])),
                    **{f"raw_{lv}": float(v) for lv, v in zip(LEVELS, raw_mean)}})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------------
# Notebook 07, one function per step over the whole grid of runs
# ----------------------------------------------------------------------------------------------------
# ``runs`` maps ``(loss, protocol)`` to a trained run (``embeddings``, ``split``, ``config``, ``metrics``);
# ``names`` maps a loss to its display name (:data:`ABLATION_LOSSES`).

HELDOUT_PANEL = "open-world, held-out models"

_ENTRY_METRICS = ("precision_at_1", "recall_at_5", "map_at_r", *[f"accuracy_{lv}" for lv in LEVELS],
                  "make_right_given_class_wrong", "type_right_given_class_wrong", "ood_accuracy_make_known",
                  "ood_accuracy_type_known", "ood_make_known_fraction", "ood_type_known_fraction",
                  "ood_accuracy_make", "ood_accuracy_type")


#: Notebook 07's settings when it finds no reference run (notebook 03's ``official``) to take them from.
ABLATION_FALLBACK = {"backbone": "efficientnet_lite0", "image_size": 128, "epochs": 30, "batch_size": 128,
                     "m_per_class": 4}


def ablation_configs(reference: str | Path | None, *, losses: Iterable[str], protocols: Iterable[str],
                     trainable_stages: int = 0, hierarchy_order: str = "fine_to_coarse",
                     level_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), device: str = "auto", seed: int = 0,
                     **given) -> tuple[object, Path | None, dict, dict[tuple[str, str], object]]:
    """Notebook 07's configs: the reference run's settings (``given``: backbone, image_size, epochs, batch_size,
    m_per_class; ``None`` takes the reference's, or :data:`ABLATION_FALLBACK` without one) with the MS loss,
    head only (or ``trainable_stages``) on the frozen trunk, then one config per (loss, protocol).

    Returns ``(base, source, hierarchical_kwargs, configs)``: ``source`` is the config file read (``None``:
    TrainConfig's defaults). ``scripts/reference_models.py hierarchy`` trains the same configs ahead.
    """
    settings = {k: given.get(k) for k in ABLATION_FALLBACK}
    unknown = set(given) - set(ABLATION_FALLBACK)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; the reference run's are {list(ABLATION_FALLBACK)}")
    if reference is not None:
        settings = reference_settings(reference, settings, ABLATION_FALLBACK)
    base, source = base_config(reference, **settings, train_backbone=False, trainable_stages=trainable_stages,
                               device=device, seed=seed, loss="ms", loss_kwargs={})
    hier_kwargs = {"order": hierarchy_order, "level_weights": list(level_weights)}
    return base, source, hier_kwargs, grid_configs(base, losses, protocols, hierarchical_kwargs=hier_kwargs)


def reference_settings(reference: str | Path, given: Mapping[str, object], fallback: Mapping[str, object]) -> dict:
    """The settings passed to :func:`base_config`: ``given`` as is when the reference run exists (its
    ``config.json`` fills what is None), else ``fallback`` for every None of ``given``."""
    if (Path(reference) / "config.json").is_file():
        return dict(given)
    return {key: fallback[key] if value is None else value for key, value in given.items()}


def evaluate_grid(runs: Mapping[tuple[str, str], object], cars, *, k: int = 1, names: Mapping[str, str] | None = None,
                  device="cpu") -> dict:
    """Every run's queries answered at every level (:func:`level_outcomes`), plus its retrieval metrics.

    Returns ``outcomes`` (``{(loss, protocol, "query" | "ood"): table}``; "ood" for the held-out queries of an
    ``open-world`` run), ``ood_outcomes`` (``{(loss, protocol): table}``), ``metrics`` (``{(loss, protocol):
    dict}``: :func:`vericar.evaluation.evaluate_embeddings` and :func:`outcome_metrics`, ``ood_``-prefixed
    for held-out queries), ``level_table`` (one row per run x level: accuracy with its Wilson interval, ``n``;
    ``panel`` = protocol, ``loss`` = display name) and ``summary`` (P@1, MAP@R and accuracy per level).
    """
    names = names or ABLATION_LOSSES
    outcomes, ood_outcomes, metrics, rows = {}, {}, {}, []
    for (loss, protocol), run in runs.items():
        o = level_outcomes(run.embeddings, cars.labels, run.split, cars.hierarchy, k=k, device=device)
        outcomes[(loss, protocol, "query")] = o
        retrieval = evaluate_embeddings(run.embeddings, cars, run.split, levels=False, device=device)
        metrics[(loss, protocol)] = {**retrieval, **outcome_metrics(o)}
        if protocol == "open-world" and len(run.split.ood_query):
            ood = level_outcomes(run.embeddings, cars.labels, run.split, cars.hierarchy, queries="ood_query", k=k,
                                 device=device)
            ood_outcomes[(loss, protocol)] = outcomes[(loss, protocol, "ood")] = ood
            metrics[(loss, protocol)].update(outcome_metrics(ood, prefix="ood_"))
        for level in LEVELS:
            c = o[f"correct_{level}"].to_numpy(bool)
            lo, hi = wilson_interval(int(c.sum()), len(c))
            rows.append({"panel": protocol, "loss": names.get(loss, loss), "level": level, "accuracy": c.mean(),
                         "ci_low": lo, "ci_high": hi, "n": len(c)})
    summary = pd.DataFrame([{"loss": names.get(lo_, lo_), "protocol": p, "precision_at_1": v["precision_at_1"],
                             "map_at_r": v["map_at_r"], **{f"acc_{lv}": v[f"accuracy_{lv}"] for lv in LEVELS}}
                            for (lo_, p), v in metrics.items()])
    return {"outcomes": outcomes, "ood_outcomes": ood_outcomes, "metrics": metrics,
            "level_table": pd.DataFrame(rows), "summary": summary}


def heldout_eligibility(ood_table: pd.DataFrame) -> dict:
    """From :func:`heldout_level_table`: ``n_ood`` (held-out queries), ``make`` / ``type`` (how many have their
    true make / make + type in the known database) and ``panel`` (a figure panel title naming both)."""
    n_ood = int(ood_table["ood_queries"].iloc[0])
    elig = ood_table.drop_duplicates("level").set_index("level")["eligible"]
    make, typ = int(elig.get("make", 0)), int(elig.get("type", 0))
    return {"n_ood": n_ood, "make": make, "type": typ,
            "panel": f"{HELDOUT_PANEL}\n(make known: {make}, make+type known: {typ} of {n_ood})"}


def error_depth_table(outcomes: Mapping[tuple, pd.DataFrame], names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """:func:`error_depth` of every ``(loss, protocol, query_set)`` of :func:`evaluate_grid`'s ``outcomes``: one
    row per run and query set with ``panel`` (the protocol, or :data:`HELDOUT_PANEL` for held-out queries),
    ``loss`` (display name), ``n`` (class-wrong queries) and the share of each :data:`DEPTH_LABELS` label."""
    names = names or ABLATION_LOSSES
    rows = []
    for (loss, protocol, qset), o in outcomes.items():
        d = error_depth(o)
        rows.append({"panel": protocol if qset == "query" else HELDOUT_PANEL, "loss": names.get(loss, loss),
                     "n": d.attrs["n"], **d.to_dict()})
    return pd.DataFrame(rows)


def ms_comparison(outcomes: Mapping[tuple, pd.DataFrame], ood_outcomes: Mapping[tuple, pd.DataFrame],
                  names: Mapping[str, str] | None = None, *, baseline: str = "ms", alpha: float = 0.05,
                  levels: Sequence[str] = LEVELS) -> pd.DataFrame:
    """Every variant against ``baseline`` on the same queries (:func:`compare_variants`): every level of each
    protocol's queries, and make / type of the held-out models' queries whose make (make + type) is known;
    one Holm adjustment over all of them (``p_holm``), ``verdict`` ("better" / "worse" / "no significant
    difference" at ``alpha``), ``significant``, ``panel`` and ``loss`` (display name)."""
    names = names or ABLATION_LOSSES
    if not any(key[0] == baseline for key in outcomes):
        raise ValueError(f"the paired comparison needs {baseline!r} among the losses (the baseline)")
    per_set = {key: o for key, o in outcomes.items() if key[2] == "query"}
    held_out = {(loss, protocol, "held-out"): o for (loss, protocol), o in ood_outcomes.items()}
    comp = pd.concat([compare_variants(per_set, baseline, levels=levels)]
                     + ([compare_variants(held_out, baseline, levels=["make", "type"], restrict_to_known=True)]
                        if held_out else []), ignore_index=True)
    comp["p_holm"] = holm(comp["p_value"].to_numpy())
    comp["verdict"] = np.where(comp["p_holm"] < alpha, np.where(comp["diff"] > 0, "better", "worse"),
                               "no significant difference")
    comp["panel"] = np.where(comp["group_1"] == "query", comp["group_0"], f"{HELDOUT_PANEL} (eligible)")
    comp["loss"] = comp["variant"].map(lambda v: names.get(v, v))
    comp["significant"] = comp["p_holm"] < alpha
    return comp


def loss_shares(runs: Mapping[tuple[str, str], object], cars, names: Mapping[str, str] | None = None, *,
                n_batches: int = 20, seed: int = 0) -> pd.DataFrame:
    """For each HiMS run: the share of its loss (and ``binding``, the share of level terms replaced by a
    neighbour's) supplied by each level's own MS loss, on its trained embeddings of its training images
    (:func:`effective_level_weights` with the run's constraint, order, weights and batch composition). One row
    per HiMS run with ``label``, ``loss``, ``protocol``, the four level shares and ``raw_<level>``."""
    names = names or ABLATION_LOSSES
    rows = []
    for (loss, protocol), run in runs.items():
        if not loss.startswith("hims_"):
            continue
        cfg, tr = run.config, run.split.train
        w = effective_level_weights(run.embeddings[tr], cars.labels[tr], cars.hierarchy,
                                    constraints=[loss.split("_", 1)[1]],
                                    order=cfg.loss_kwargs.get("order", "fine_to_coarse"),
                                    level_weights=cfg.loss_kwargs.get("level_weights", (1, 1, 1, 1)),
                                    batch_size=cfg.batch_size, m_per_class=cfg.m_per_class, n_batches=n_batches,
                                    seed=seed)
        rows.append({"label": f"{names.get(loss, loss)} | {protocol}", "loss": loss, "protocol": protocol,
                     **w.iloc[0][list(LEVELS) + ["binding"] + [f"raw_{lv}" for lv in LEVELS]].to_dict()})
    return pd.DataFrame(rows)


def ablation_verdict(comp: pd.DataFrame, names: Mapping[str, str] | None = None) -> tuple[list[str], bool]:
    """One line per variant of :func:`ms_comparison`: at how many (protocol, level) comparisons it is
    significantly better / worse than the baseline (listed), and its largest difference either way; and
    whether any variant is significantly better anywhere (``helps_anywhere``)."""
    names = names or ABLATION_LOSSES
    lines, helps = [], False
    for loss, c in comp.groupby("variant", sort=False):
        better, worse = c[c["verdict"] == "better"], c[c["verdict"] == "worse"]
        helps |= len(better) > 0
        best, worst = c.loc[c["diff"].idxmax()], c.loc[c["diff"].idxmin()]
        listed = "".join(f" ({kind}: {', '.join(f'{r.panel}/{r.level} {r.diff:+.1%}' for r in t.itertuples())})"
                         for kind, t in (("better", better), ("worse", worse)) if len(t))
        lines.append(
            f"{names.get(loss, loss)} vs MS: significantly better at {len(better)} and worse at {len(worse)} of "
            f"{len(c)} (protocol, level) comparisons{listed}"
            + (f"; largest difference for it {best['diff']:+.1%} ({best['panel']}/{best['level']}, Holm p "
               f"{best['p_holm']:.2g})" if best["diff"] > 0 else "; never above MS")
            + (f", largest against it {worst['diff']:+.1%} ({worst['panel']}/{worst['level']}, Holm p "
               f"{worst['p_holm']:.2g})." if worst["diff"] < 0 else ", never below MS."))
    return lines, bool(helps)


def ablation_entries(runs: Mapping[tuple[str, str], object], grid: dict, comp: pd.DataFrame, *, dataset: str,
                     mode: str, k: int, names: Mapping[str, str] | None = None) -> list[dict]:
    """``results/07_hierarchy_ablation.json``'s entries: one per loss and protocol with P@1, MAP@R, accuracy
    per level, make / type right when the class is wrong, the held-out models' make / type accuracy (for
    ``open-world``), training time, the error depths and the comparison with MS (``vs_ms``). ``grid`` is
    :func:`evaluate_grid`'s output."""
    names = names or ABLATION_LOSSES
    entries = []
    for (loss, protocol), run in runs.items():
        m, c = grid["metrics"][(loss, protocol)], run.config
        sets = ["query"] + (["ood"] if (loss, protocol) in grid["ood_outcomes"] else [])
        vs = comp[(comp["variant"] == loss) & (comp["group_0"] == protocol)]
        entries.append(results_entry(
            dataset=dataset, protocol=protocol, backbone=c.backbone, image_size=c.image_size,
            device=run.metrics["device"], metrics={**{key: m[key] for key in _ENTRY_METRICS if key in m},
                                                   "train_seconds": run.metrics["train_seconds"],
                                                   "images_per_second": run.metrics["images_per_second"]},
            loss=loss, loss_name=names.get(loss, loss), loss_kwargs=c.loss_kwargs, mode=mode, epochs=c.epochs,
            batch_size=c.batch_size, m_per_class=c.m_per_class, seed=c.seed, k=k, n_queries=m["n_queries"],
            n_ood_queries=m.get("ood_n_queries"),
            error_depth={s: error_depth(grid["outcomes"][(loss, protocol, s)]).to_dict() for s in sets},
            vs_ms=vs[["panel", "level", "n", "diff", "ci_low", "ci_high", "p_value", "p_holm", "verdict"]]
            .to_dict("records"), run_folder=str(getattr(run, "path", ""))))
    return entries

