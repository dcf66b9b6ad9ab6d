"""Where 1-NN retrieval goes wrong: per-group accuracy, confused class pairs, the structure of the confusions,
class and image size, label noise (near-duplicate photos filed under two classes), and checks of claims.

Everything starts from one table, :func:`nearest_neighbour_table`: each query of a split, its nearest
database image (exact cosine K-NN, :class:`vericar.retrieval.KNNIndex`; leave-one-out for ``zero-shot``),
the true and predicted class and their hierarchy. A query is *correct* when the neighbour's class is its class
(1-NN accuracy = ``precision_at_1``); per-level correctness follows the study's prefix semantics
(:func:`vericar.metrics.level_correct`).

Confusion structure (:func:`confusion_kind`), for a wrong prediction, checked in this order:

``other make``              the predicted class has another make;
``same model, other year``  same make and model name (body words included), another year
                            ("Audi S4 Sedan 2007" for "Audi S4 Sedan 2012");
``same family, other body`` same make and family (the model without body words), another model name:
                            a body-style sibling ("Accord Coupe" for "Accord Sedan",
                            "Silverado 1500 Crew Cab" for "... Extended Cab");
``same make, other model``  same make, another family.

Confidence intervals are Wilson intervals (:func:`vericar.metrics.wilson_interval`) throughout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from ..data.dataset import CarsDataset
from ..data.hierarchy import LEVELS
from ..data.splits import Split
from ..metrics import grouped_accuracy, level_correct, wilson_interval
from ..neighbours import l2_normalize
from ..retrieval import KNNIndex

__all__ = [
    "CONFUSION_KINDS",
    "binned_accuracy",
    "check_claims",
    "class_size_table",
    "confused_pairs",
    "confusion_kind",
    "confusion_structure",
    "group_accuracy_tables",
    "image_widths",
    "level_table",
    "near_duplicate_errors",
    "nearest_neighbour_table",
    "pair_examples",
    "read_near_duplicates",
    "similar_model_classes",
    "spearman",
    "verdict",
]

#: The kinds of a wrong prediction, from the closest to the farthest (see the module docstring).
CONFUSION_KINDS: tuple[str, ...] = ("same model, other year", "same family, other body", "same make, other model",
                                    "other make")

_HIER_COLUMNS = ("make", "family", "model", "type", "year", "class_name")


# ----------------------------------------------------------------------------------------------------
# The 1-NN table
# ----------------------------------------------------------------------------------------------------


def confusion_kind(true_rows: pd.DataFrame, pred_rows: pd.DataFrame) -> np.ndarray:
    """Kind of each (truth, prediction) pair: ``"correct"`` or one of :data:`CONFUSION_KINDS`.

    Both tables need ``make, family, model, year`` (one row per pair, aligned by position); a pair is
    ``"correct"`` when all four agree.
    """
    t = true_rows.reset_index(drop=True)
    p = pred_rows.reset_index(drop=True)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true rows but {len(p)} predicted rows")
    same = {c: (t[c].to_numpy() == p[c].to_numpy()) for c in ("make", "family", "model", "year")}
    return np.select(
        [same["make"] & same["model"] & same["year"], ~same["make"], same["model"], same["family"]],
        ["correct", "other make", "same model, other year", "same family, other body"],
        default="same make, other model").astype(object)


def nearest_neighbour_table(embeddings, cars: CarsDataset, split: Split, *, device="cpu") -> pd.DataFrame:
    """Each query of ``split``, its nearest database image and what that means.

    Returns a DataFrame (one row per query, in ``split.query`` order) with ``query`` and ``neighbour`` (row
    indices into ``cars.table``), ``distance`` (between unit vectors), ``true_class`` / ``pred_class``
    (0-based), ``correct`` (same class), ``kind`` (:func:`confusion_kind`) and the hierarchy of both sides
    as ``true_<col>`` / ``pred_<col>`` for make, family, model, type, year, class_name.
    """
    labels = cars.labels
    emb = np.asarray(embeddings)
    if len(emb) != len(cars):
        raise ValueError(f"{len(emb)} embeddings for a dataset of {len(cars)} images")
    db = np.asarray(split.database)
    q = np.asarray(split.query)
    index = KNNIndex(emb[db], labels[db], device=device)
    dist, nb = index.search(emb[q], 1, exclude_self=split.leave_one_out)
    neighbour = db[nb[:, 0]]
    out = pd.DataFrame({"query": q, "neighbour": neighbour, "distance": dist[:, 0],
                        "true_class": labels[q], "pred_class": labels[neighbour]})
    out["correct"] = out["true_class"] == out["pred_class"]
    hier = cars.hierarchy.reset_index(drop=True)
    for side in ("true", "pred"):
        rows = hier.iloc[out[f"{side}_class"].to_numpy()]
        for col in _HIER_COLUMNS:
            out[f"{side}_{col}"] = rows[col].to_numpy()
    out["kind"] = confusion_kind(hier.iloc[out["true_class"]], hier.iloc[out["pred_class"]])
    return out


def level_table(nn: pd.DataFrame, hierarchy: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Accuracy at make / type / model / year from the same 1-NN, with counts and Wilson intervals.

    Correctness is :func:`vericar.metrics.level_correct`'s (prefix semantics).
    """
    correct = level_correct(pd.DataFrame({"class_index": nn["pred_class"].to_numpy()}, index=nn.index),
                            nn["true_class"].to_numpy(), hierarchy)
    n = len(nn)
    rows = []
    for level in LEVELS:
        k = int(correct[level].sum())
        low, high = wilson_interval(k, n, alpha)
        rows.append({"level": level, "n": n, "correct": k, "accuracy": k / n if n else float("nan"),
                     "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def group_accuracy_tables(nn: pd.DataFrame, by: Sequence[str] = ("make", "type", "year", "model", "class"),
                          alpha: float = 0.05) -> dict[str, pd.DataFrame]:
    """:func:`grouped_accuracy` of the class-level 1-NN accuracy per true make, body type, year, model, class.

    ``model`` is make + model name (its years pooled), ``class`` the class name. Tables are sorted worst
    first (as :func:`grouped_accuracy` returns them).
    """
    out = {}
    for name in by:
        if name == "model":
            groups = (nn["true_make"].astype(str) + " " + nn["true_model"].astype(str)).to_numpy()
        elif name == "class":
            groups = nn["true_class_name"].to_numpy()
        else:
            groups = nn[f"true_{name}"].to_numpy()
        out[name] = grouped_accuracy(nn["correct"].to_numpy(), groups, alpha=alpha)
    return out


# ----------------------------------------------------------------------------------------------------
# Confusions
# ----------------------------------------------------------------------------------------------------


def confusion_structure(nn: pd.DataFrame) -> pd.DataFrame:
    """Errors per kind (:data:`CONFUSION_KINDS`, all listed, zero counts included) and their share of errors."""
    wrong = nn.loc[~nn["correct"], "kind"]
    counts = wrong.value_counts().reindex(list(CONFUSION_KINDS), fill_value=0)
    total = int(counts.sum())
    return pd.DataFrame({"kind": list(CONFUSION_KINDS), "errors": counts.to_numpy().astype(int),
                         "share_of_errors": counts.to_numpy() / total if total else np.nan,
                         "share_of_queries": counts.to_numpy() / len(nn) if len(nn) else np.nan})


def confused_pairs(nn: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """Unordered class pairs by the number of errors between them (either direction), most first.

    Columns: ``class_a < class_b`` (0-based), ``name_a``, ``name_b``, ``a_as_b`` (queries of a whose
    neighbour is b), ``b_as_a``, ``errors`` (their sum), ``share`` (errors / queries of both classes) and
    ``kind``. Ties by class indices.
    """
    wrong = nn.loc[~nn["correct"]]
    queries = nn["true_class"].value_counts()
    names = dict(zip(nn["true_class"], nn["true_class_name"])) | dict(zip(nn["pred_class"], nn["pred_class_name"]))
    kinds = {}
    counts: dict[tuple[int, int], list[int]] = {}
    for t, p, kind in zip(wrong["true_class"], wrong["pred_class"], wrong["kind"]):
        a, b = (int(t), int(p)) if t < p else (int(p), int(t))
        c = counts.setdefault((a, b), [0, 0])
        c[0 if t == a else 1] += 1
        kinds[(a, b)] = kind
    rows = [{"class_a": a, "class_b": b, "name_a": names[a], "name_b": names[b], "a_as_b": ab, "b_as_a": ba,
             "errors": ab + ba, "share": (ab + ba) / (queries.get(a, 0) + queries.get(b, 0)), "kind": kinds[(a, b)]}
            for (a, b), (ab, ba) in counts.items()]
    cols = ["class_a", "class_b", "name_a", "name_b", "a_as_b", "b_as_a", "errors", "share", "kind"]
    out = pd.DataFrame(rows, columns=cols)
    out = out.sort_values(["errors", "class_a", "class_b"], ascending=[False, True, True], kind="stable")
    out = out.reset_index(drop=True)
    return out if top is None else out.head(top)


def pair_examples(nn: pd.DataFrame, pairs: pd.DataFrame, embeddings, database, labels, *,
                  pick: str = "median") -> pd.DataFrame:
    """One example per confused pair: the query, its wrong neighbour, and a true-class database image.

    The direction with more errors is shown (``a`` as ``b`` on ties). Among its errors, ``pick="median"``
    takes the one whose wrong-neighbour distance is the median (the lower one for an even count; a typical
    error), ``pick="closest"`` the one with the closest wrong neighbour (often the same photo filed twice).
    The true-class example is the database image of the query's class nearest to the query (what it should
    have matched). Columns ``query, neighbour, true_example`` (row indices into the dataset),
    ``true_class, pred_class, distance, true_distance``.
    """
    if pick not in ("median", "closest"):
        raise ValueError(f"unknown pick {pick!r}; expected 'median' or 'closest'")
    emb = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    db = np.asarray(database)
    lab = np.asarray(labels)
    rows = []
    for r in pairs.itertuples():
        t, p = (r.class_a, r.class_b) if r.a_as_b >= r.b_as_a else (r.class_b, r.class_a)
        errs = nn[(nn["true_class"] == t) & (nn["pred_class"] == p)]
        errs = errs.sort_values(["distance", "query"], kind="stable")
        e = errs.iloc[(len(errs) - 1) // 2 if pick == "median" else 0]
        q = int(e["query"])
        same = db[(lab[db] == t) & (db != q)]
        if len(same):
            d = np.linalg.norm(emb[same] - emb[q], axis=1)
            true_ex, true_d = int(same[np.argmin(d)]), float(d.min())
        else:
            true_ex, true_d = -1, float("nan")
        rows.append({"query": q, "neighbour": int(e["neighbour"]), "true_example": true_ex, "true_class": int(t),
                     "pred_class": int(p), "distance": float(e["distance"]), "true_distance": true_d})
    return pd.DataFrame(rows, columns=["query", "neighbour", "true_example", "true_class", "pred_class",
                                       "distance", "true_distance"])


# ----------------------------------------------------------------------------------------------------
# Size effects
# ----------------------------------------------------------------------------------------------------


def class_size_table(nn: pd.DataFrame, cars: CarsDataset, split: Split, alpha: float = 0.05) -> pd.DataFrame:
    """Per class: training images (``n_train``: rows of ``split.train``), queries, 1-NN accuracy and Wilson CI.

    Classes with no query are left out. Sorted by ``n_train`` then class index.
    """
    labels = cars.labels
    n_train = np.bincount(labels[np.asarray(split.train, dtype=np.int64)], minlength=cars.num_classes)
    g = nn.groupby("true_class")["correct"].agg(n_query="size", correct="sum").reset_index()
    g = g.rename(columns={"true_class": "class_index"})
    g["n_query"] = g["n_query"].astype(int)
    g["correct"] = g["correct"].astype(int)
    g["n_train"] = n_train[g["class_index"].to_numpy()]
    g["accuracy"] = g["correct"] / g["n_query"]
    g["ci_low"], g["ci_high"] = wilson_interval(g["correct"].to_numpy(), g["n_query"].to_numpy(), alpha)
    hier = cars.hierarchy.reset_index(drop=True)
    for col in ("class_name", "make", "family", "model", "type", "year"):
        g[col] = hier[col].to_numpy()[g["class_index"].to_numpy()]
    return g.sort_values(["n_train", "class_index"], kind="stable").reset_index(drop=True)


def binned_accuracy(correct, values, bins: int = 5, alpha: float = 0.05) -> pd.DataFrame:
    """Accuracy per quantile bin of ``values`` (``pd.qcut``, duplicate edges merged), with Wilson CIs.

    Columns ``bin`` (0-based, low to high), ``lo``, ``hi`` (the smallest and largest value in the bin),
    ``label`` (``"lo-hi"``), ``n``, ``correct``, ``accuracy``, ``ci_low``, ``ci_high``.
    """
    c = np.asarray(correct, dtype=bool)
    v = np.asarray(values, dtype=np.float64)
    if c.shape != v.shape:
        raise ValueError("correct and values must have the same length")
    ok = np.isfinite(v)
    c, v = c[ok], v[ok]
    if len(v) == 0:
        return pd.DataFrame(columns=["bin", "lo", "hi", "label", "n", "correct", "accuracy", "ci_low", "ci_high"])
    codes = pd.qcut(v, q=min(bins, len(np.unique(v))), labels=False, duplicates="drop")
    codes = np.asarray(codes, dtype=np.int64)
    rows = []
    for b in np.unique(codes):
        m = codes == b
        lo, hi = v[m].min(), v[m].max()
        k, n = int(c[m].sum()), int(m.sum())
        low, high = wilson_interval(k, n, alpha)
        rows.append({"bin": int(b), "lo": lo, "hi": hi, "label": f"{lo:g}-{hi:g}", "n": n, "correct": k,
                     "accuracy": k / n, "ci_low": low, "ci_high": high})
    out = pd.DataFrame(rows)
    out["bin"] = np.arange(len(out))
    return out


def image_widths(cars: CarsDataset, rows) -> tuple[np.ndarray, str]:
    """Width in pixels of the car in each image of ``rows``, and what was measured.

    The devkit box width in the original photo (``orig_bbox_x2 - orig_bbox_x1``) where the table has it (the
    compact Stanford copies), else the box width in the stored image (``bbox_*``), else the image width
    (``width`` column, else read from the file headers).
    """
    t = cars.table.iloc[np.asarray(rows, dtype=np.int64)]
    if {"orig_bbox_x1", "orig_bbox_x2"} <= set(t.columns):
        return (t["orig_bbox_x2"] - t["orig_bbox_x1"]).to_numpy(dtype=np.float64), \
            "car box width in the original photo (px)"
    if {"bbox_x1", "bbox_x2"} <= set(t.columns):
        return (t["bbox_x2"] - t["bbox_x1"]).to_numpy(dtype=np.float64), "car box width in the image (px)"
    if "width" in t.columns:
        return t["width"].to_numpy(dtype=np.float64), "image width (px)"
    from PIL import Image  # noqa: PLC0415

    widths = []
    for i in np.asarray(rows, dtype=np.int64):
        with Image.open(cars.path(int(i))) as im:
            widths.append(im.size[0])
    return np.asarray(widths, dtype=np.float64), "image width (px)"


def spearman(x, y) -> tuple[float, float]:
    """Spearman rank correlation and its p-value (NaN when undefined, e.g. a constant input)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    r = spearmanr(x, y)
    return float(r.statistic), float(r.pvalue)


# ----------------------------------------------------------------------------------------------------
# Label noise: near-duplicate photos under two classes
# ----------------------------------------------------------------------------------------------------


def near_duplicate_errors(nn: pd.DataFrame, cars: CarsDataset, reference: pd.DataFrame,
                          database=None) -> tuple[dict[str, int | float], pd.DataFrame]:
    """How many errors are a query retrieving its own near-duplicate filed under another class.

    Parameters
    ----------
    nn : :func:`nearest_neighbour_table`
    reference : DataFrame with ``filename_a, filename_b`` (the data folder's ``near_duplicates.csv``)
    database : row indices of the database, optional
        When given, also counts the queries that have a listed near-duplicate of another class in the
        database at all (whether or not it was retrieved).

    Returns
    -------
    summary : dict
        ``errors``, ``errors_explained`` (wrong queries whose nearest neighbour is a listed near-duplicate of
        the query), ``explained_share`` (of the errors), ``accuracy_without_explained`` (1-NN accuracy with
        those queries counted as correct: the label-noise ceiling effect), and with ``database``:
        ``queries_with_cross_class_duplicate`` and ``of_which_wrong``.
    explained : DataFrame
        The explained rows of ``nn``.
    """
    fn = cars.table["filename"].to_numpy()
    pairs = {frozenset((a, b)) for a, b in zip(reference["filename_a"], reference["filename_b"]) if a != b}
    wrong = nn[~nn["correct"]]
    hit = np.array([frozenset((fn[q], fn[n])) in pairs for q, n in zip(wrong["query"], wrong["neighbour"])],
                   dtype=bool)
    explained = wrong[hit]
    n_err = len(wrong)
    summary: dict[str, int | float] = {
        "errors": n_err, "errors_explained": int(hit.sum()),
        "explained_share": float(hit.mean()) if n_err else float("nan"),
        "accuracy_without_explained": float((nn["correct"].sum() + hit.sum()) / len(nn)) if len(nn) else float("nan"),
    }
    if database is not None:
        labels = cars.labels
        db_rows = {fn[i]: int(i) for i in np.asarray(database)}
        partners: dict[str, set[int]] = {}
        for a, b in zip(reference["filename_a"], reference["filename_b"]):
            for x, y in ((a, b), (b, a)):
                if y in db_rows:
                    partners.setdefault(x, set()).add(db_rows[y])
        has = np.array([any(labels[j] != labels[q] for j in partners.get(fn[q], ())) for q in nn["query"]],
                       dtype=bool)
        summary["queries_with_cross_class_duplicate"] = int(has.sum())
        summary["of_which_wrong"] = int((has & ~nn["correct"].to_numpy()).sum())
    return summary, explained


# ----------------------------------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------------------------------


def similar_model_classes(hierarchy: pd.DataFrame, embeddings, labels) -> pd.DataFrame:
    """Two definitions of "similar models", per class.

    ``has_family_sibling``: another class shares its make and family (another year or body style).
    ``nearest_in_family``: the class whose centroid (mean of the given, e.g. database, embeddings,
    re-normalised) is nearest by cosine shares its make and family. Also ``nearest_class`` and
    ``nearest_similarity``; classes without embeddings get ``nearest_class = -1``.
    """
    h = hierarchy.reset_index(drop=True)
    fam = list(zip(h["make"], h["family"]))
    fam_size = pd.Series(fam).map(pd.Series(fam).value_counts()).to_numpy()
    emb = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    lab = np.asarray(labels, dtype=np.int64)
    n_cls = len(h)
    sums = np.zeros((n_cls, emb.shape[1]), dtype=np.float64)
    np.add.at(sums, lab, emb)
    present = np.bincount(lab, minlength=n_cls) > 0
    cent = l2_normalize(sums.astype(np.float32))
    sim = cent @ cent.T
    sim[~present, :] = -np.inf
    sim[:, ~present] = -np.inf
    np.fill_diagonal(sim, -np.inf)
    nearest = np.where(present & (present.sum() > 1), sim.argmax(axis=1), -1)
    nearest_sim = np.where(nearest >= 0, sim[np.arange(n_cls), np.maximum(nearest, 0)], np.nan)
    in_family = np.array([n >= 0 and fam[i] == fam[n] for i, n in enumerate(nearest)], dtype=bool)
    return pd.DataFrame({"class_index": np.arange(n_cls), "class_name": h["class_name"].to_numpy(),
                         "has_family_sibling": fam_size > 1, "nearest_class": nearest,
                         "nearest_similarity": nearest_sim, "nearest_in_family": in_family})


def verdict(accuracy: float, ci_low: float, ci_high: float, claimed: float, relation: str) -> str:
    """Compare a measured accuracy (with its CI) with a claimed one.

    ``relation="at least"`` ("85%+"): "holds" when the accuracy reaches the claim, else "does not hold"
    (and "holds" / "does not hold" is also said of the whole interval when it lies on one side).
    ``relation="about"`` ("45%"): "consistent" when the claim lies in the interval, else "higher here" or
    "lower here".
    """
    if not np.isfinite(accuracy):
        return "not measurable (no queries)"
    if relation == "at least":
        if ci_low >= claimed:
            return "holds (whole CI at or above)"
        if ci_high < claimed:
            return "does not hold (whole CI below)"
        return "holds (CI straddles the claim)" if accuracy >= claimed else "does not hold (CI straddles the claim)"
    if relation == "about":
        if ci_low <= claimed <= ci_high:
            return "consistent (claim inside the CI)"
        return "higher here" if ci_low > claimed else "lower here"
    raise ValueError(f"unknown relation {relation!r}; expected 'at least' or 'about'")


def check_claims(nn: pd.DataFrame, cars: CarsDataset, class_sizes: pd.DataFrame, similar: pd.DataFrame, *,
                 popular_top_n: int = 10, small_threshold: int = 20, size_bins: int = 5,
                 alpha: float = 0.05) -> pd.DataFrame:
    """Measure the three claims an earlier implementation printed without measuring.

    * "85%+ on popular makes": 1-NN class accuracy of the queries whose make is one of the
      ``popular_top_n`` makes with the most images in the dataset (ties by name); claimed >= 0.85.
    * "45% on similar models": the queries of classes that (a) have a same-family sibling, (b) whose nearest
      other class centroid is in their family (see :func:`similar_model_classes`); claimed about 0.45.
    * "55% on classes with <20 training samples": the queries of classes with fewer than
      ``small_threshold`` training images; when there are none, of the smallest bin of classes
      (the lowest of ``size_bins`` quantile bins of training images per class), said so in ``definition``;
      claimed about 0.55.

    Returns one row per measurement: ``key`` (popular_makes, similar_models_sibling, similar_models_centroid,
    small_classes), ``claim, definition, classes, queries, accuracy, ci_low, ci_high, claimed, relation,
    verdict``.
    """
    rows = []

    def add(key, claim, definition, class_set, claimed, relation):
        m = nn["true_class"].isin(class_set).to_numpy()
        k, n = int(nn["correct"].to_numpy()[m].sum()), int(m.sum())
        low, high = wilson_interval(k, n, alpha)
        acc = k / n if n else float("nan")
        classes = len(set(np.asarray(class_set).tolist()) & set(nn["true_class"].tolist()))
        rows.append({"key": key, "claim": claim, "definition": definition, "classes": classes, "queries": n,
                     "accuracy": acc, "ci_low": low, "ci_high": high, "claimed": claimed, "relation": relation,
                     "verdict": verdict(acc, low, high, claimed, relation)})

    h = cars.hierarchy.reset_index(drop=True)
    make_images = cars.table["make"].value_counts()
    popular = sorted(make_images.index, key=lambda m: (-make_images[m], str(m)))[:popular_top_n]
    add("popular_makes", "85%+ on popular makes",
        f"top {len(popular)} makes by images in the dataset ({make_images[popular].min()}+ images each)",
        np.flatnonzero(h["make"].isin(popular).to_numpy()), 0.85, "at least")
    add("similar_models_sibling", "45% on similar models",
        "classes with a same-make, same-family sibling (another year or body style)",
        similar.loc[similar["has_family_sibling"], "class_index"].to_numpy(), 0.45, "about")
    add("similar_models_centroid", "45% on similar models",
        "classes whose nearest other class centroid (database embeddings) is in their make+family",
        similar.loc[similar["nearest_in_family"], "class_index"].to_numpy(), 0.45, "about")
    small = class_sizes.loc[class_sizes["n_train"] < small_threshold, "class_index"].to_numpy()
    if len(small):
        definition = f"classes with < {small_threshold} training images"
    else:
        sizes = class_sizes["n_train"].to_numpy(dtype=np.float64)
        codes = np.asarray(pd.qcut(sizes, q=min(size_bins, len(np.unique(sizes))), labels=False,
                                   duplicates="drop"), dtype=np.int64)
        lowest = codes == codes.min()
        small = class_sizes.loc[lowest, "class_index"].to_numpy()
        definition = (f"no class has < {small_threshold} training images (smallest: {int(sizes.min())}); "
                      f"instead the smallest of {size_bins} quantile bins of classes: "
                      f"{int(sizes[lowest].min())}-{int(sizes[lowest].max())} training images")
    add("small_classes", f"55% on classes with <{small_threshold} training samples", definition, small, 0.55, "about")
    return pd.DataFrame(rows)


def read_near_duplicates(data_dir) -> pd.DataFrame | None:
    """The data folder's ``near_duplicates.csv`` or None when there is none."""
    path = Path(data_dir) / "near_duplicates.csv"
    return pd.read_csv(path) if path.is_file() else None


# ----------------------------------------------------------------------------------------------------
# Notebook 05, one function per step
# ----------------------------------------------------------------------------------------------------


def group_extremes(groups: dict[str, pd.DataFrame], by: Sequence[str] = ("make", "type", "year", "model")
                   ) -> pd.DataFrame:
    """The worst and the best group of each grouping of :func:`group_accuracy_tables` (its tables are sorted
    worst first): one row per grouping x ``which`` ("worst" / "best") with ``group``, ``accuracy``, its Wilson
    interval ``ci_low`` / ``ci_high``, ``n`` (queries) and ``groups`` (how many groups the grouping has)."""
    rows = []
    for name in by:
        g = groups[name]
        for which, i in (("worst", 0), ("best", len(g) - 1)):
            r = g.iloc[i]
            rows.append({"by": name, "which": which, "group": r["group"], "accuracy": float(r["accuracy"]),
                         "ci_low": float(r["ci_low"]), "ci_high": float(r["ci_high"]), "n": int(r["n"]),
                         "groups": len(g)})
    return pd.DataFrame(rows)


def size_effects(nn: pd.DataFrame, cars: CarsDataset, split: Split, bins: int = 5) -> dict:
    """Do errors follow class size or image size? Returns ``class_sizes`` (:func:`class_size_table`),
    ``class_bins`` (the queries pooled per quantile bin of their class's training images), ``widths`` /
    ``width_label`` (:func:`image_widths` of the queries), ``image_bins`` (per quantile bin of width), and the
    Spearman correlations ``rho_class`` / ``p_class`` (class size against class accuracy, over classes) and
    ``rho_width`` / ``p_width`` (width against correct, over queries)."""
    class_sizes = class_size_table(nn, cars, split)
    query_class_size = class_sizes.set_index("class_index").loc[nn["true_class"], "n_train"].to_numpy()
    widths, width_label = image_widths(cars, nn["query"])
    rho_class, p_class = spearman(class_sizes["n_train"], class_sizes["accuracy"])
    rho_width, p_width = spearman(widths, nn["correct"].astype(float))
    return {"class_sizes": class_sizes, "class_bins": binned_accuracy(nn["correct"], query_class_size, bins),
            "widths": widths, "width_label": width_label, "image_bins": binned_accuracy(nn["correct"], widths, bins),
            "rho_class": rho_class, "p_class": p_class, "rho_width": rho_width, "p_width": p_width}


def _kind_key(kind: str) -> str:
    return kind.replace(", ", "_").replace(" ", "_")


def error_metrics(nn: pd.DataFrame, nn_frozen: pd.DataFrame, levels: pd.DataFrame,
                  structures: dict[str, pd.DataFrame], sizes: dict, near_dup: dict, claims: pd.DataFrame) -> dict:
    """The flat ``metrics`` of ``results/05_error_analysis.json``: 1-NN accuracy (trained and frozen), per
    level accuracy with its interval (``levels`` rows with ``stage`` "trained" / "frozen backbone"), the
    error shares per kind (``structures``: :func:`confusion_structure` per stage), the Spearman correlations
    of :func:`size_effects`, the near-duplicate counts and each claim's measured accuracy."""
    metrics = {"precision_at_1": float(nn["correct"].mean()), "frozen_precision_at_1": float(nn_frozen["correct"].mean()),
               "n_queries": len(nn), "n_errors": int((~nn["correct"].astype(bool)).sum())}
    lv = levels[levels["stage"] == "trained"].set_index("level")
    lvf = levels[levels["stage"] == "frozen backbone"].set_index("level")
    for level in lv.index:
        metrics[f"accuracy_{level}"] = lv.loc[level, "accuracy"]
        metrics[f"accuracy_{level}_ci_low"] = lv.loc[level, "ci_low"]
        metrics[f"accuracy_{level}_ci_high"] = lv.loc[level, "ci_high"]
        metrics[f"frozen_accuracy_{level}"] = lvf.loc[level, "accuracy"]
    for stage, key in (("trained", ""), ("frozen backbone", "frozen_")):
        for r in structures[stage].itertuples():
            metrics[f"{key}errors_share_{_kind_key(r.kind)}"] = r.share_of_errors
    metrics.update({"spearman_class_size_accuracy": sizes["rho_class"], "spearman_class_size_p": sizes["p_class"],
                    "spearman_width_correct": sizes["rho_width"], "spearman_width_p": sizes["p_width"]})
    metrics.update({f"near_duplicates_{k}": v for k, v in near_dup.items()})
    metrics.update({f"claim_{c.key}_accuracy": c.accuracy for c in claims.itertuples()})
    return metrics


def error_tables(levels: pd.DataFrame, groups: dict[str, pd.DataFrame], structures: dict[str, pd.DataFrame],
                 pairs: pd.DataFrame, sizes: dict, claims: pd.DataFrame, top_pairs: int = 25) -> dict:
    """The tables of ``results/05_error_analysis.json`` beside its metrics, as lists of records: ``levels``,
    ``accuracy_per_{make,type,year,model}``, ``confusion_structure`` (per stage), ``confused_pairs`` (the
    ``top_pairs`` first), ``class_size_bins``, ``image_size_bins``, ``image_size_measure``, ``claims``."""
    def records(df):
        return df.to_dict(orient="records")

    return {"levels": records(levels), **{f"accuracy_per_{k}": records(groups[k]) for k in ("make", "type", "year", "model")},
            "confusion_structure": {k: records(v) for k, v in structures.items()},
            "confused_pairs": records(pairs.head(top_pairs)), "class_size_bins": records(sizes["class_bins"]),
            "image_size_bins": records(sizes["image_bins"]), "image_size_measure": sizes["width_label"],
            "claims": records(claims)}
