"""What the embedding space looks like: 2-D UMAP maps, and numbers that do not depend on the map.

A UMAP picture is persuasive but not evidence (its distances are not the embedding's distances, and the layout
depends on its parameters), so every map in notebook 04 comes with measurements taken **in the embedding
space itself**, before (frozen backbone) and after metric learning:

Neighbourhood purity at a level
    For each point, the fraction of its ``k`` nearest other points (cosine similarity, leave-one-out) whose
    label at that level equals its own; the purity of a set is the mean over its points. With labels
    ``A A B`` on a line at 0, 1, 3 and ``k = 1``: the 1st A's neighbour is A, the 2nd A's is A, B's is A,
    so the purity is ``(1 + 1 + 0) / 3 = 2/3``.
    *Chance* purity is what random neighbours would give: for class sizes ``n_c`` among ``N`` points,
    ``sum_c (n_c / N) * (n_c - 1) / (N - 1)`` (a point's neighbour is drawn among the ``N - 1`` others).

Silhouette (cosine)
    For point ``i`` of cluster ``C``: ``a`` = mean cosine distance ``1 - cos`` to the other members of ``C``,
    ``b`` = the smallest mean distance to the members of another cluster, ``s = (b - a) / max(a, b)``;
    ``s = 0`` for a point alone in its cluster (scikit-learn's convention). The score is the mean of ``s``.
    scikit-learn computes it (``silhouette_score(metric="cosine")``, distances in row chunks).

Levels use the study's prefix semantics (:func:`vericar.data.hierarchy.level_keys`): two images share a
label at ``type`` when they share make *and* body type, at ``model`` when they are the same car model (any
year), at ``year`` when they are the same class. :func:`label_table` builds those columns (plus any single
column asked for, e.g. ``body`` = body type alone, ``model_year`` = the year alone, as the maps colour by).

Sampling for the maps
    :func:`stratified_sample` keeps at most ``c`` random images of every class, ``c`` the largest cap that
    keeps the total within ``max_points`` (so small classes are kept whole and large ones trimmed evenly),
    seeded, returned sorted.

UMAP
    :func:`umap_2d` runs umap-learn on L2-normalised embeddings with the cosine metric and a fixed
    ``random_state`` (reproducible; umap-learn then runs single-threaded). The ``n_neighbors`` nearest
    neighbours are computed exactly here (:class:`vericar.retrieval.KNNIndex`) and handed to UMAP as
    ``precomputed_knn``: faster on 2 cores than its own approximate search (pynndescent), and it skips that
    library's just-in-time compilation.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import silhouette_score

from ..data.hierarchy import LEVELS, level_keys
from ..neighbours import l2_normalize
from ..retrieval import KNNIndex

__all__ = [
    "MAP_COLUMNS",
    "STAGE_KEYS",
    "chance_purity",
    "embedding_metrics",
    "map_colours",
    "map_rows",
    "open_world_purity",
    "open_world_sample",
    "quality_by_set",
    "quality_lines",
    "umap_maps",
    "umap_results_entry",
    "embedding_quality",
    "label_table",
    "neighbour_agreement",
    "neighbourhood_purity",
    "silhouette_cosine",
    "stratified_sample",
    "top_n_labels",
    "umap_2d",
]


# ----------------------------------------------------------------------------------------------------
# Labels and sampling
# ----------------------------------------------------------------------------------------------------


def label_table(hierarchy: pd.DataFrame, class_index, *, levels: Sequence[str] = LEVELS,
                extra: dict[str, str] | None = None) -> pd.DataFrame:
    """Integer label codes per point, one column per hierarchy level (prefix semantics) and per ``extra``.

    Parameters
    ----------
    hierarchy : DataFrame
        One row per class (row i = class index i) with make, type, model, year (``CarsDataset.hierarchy``).
    class_index : int array (N,)
        0-based class of each point.
    levels : level names
        Columns coded with :func:`level_keys` (``type`` = make + body type, ...).
    extra : {column name: hierarchy column}
        Single hierarchy columns coded alone, e.g. ``{"body": "type", "model_year": "year"}``.

    Returns
    -------
    DataFrame (N rows), integer codes (equal code = equal label).
    """
    ci = np.asarray(class_index, dtype=np.int64)
    table = hierarchy.reset_index(drop=True)
    out = {}
    for level in levels:
        out[level] = pd.factorize(level_keys(table, level))[0][ci]
    for name, column in (extra or {}).items():
        out[name] = pd.factorize(table[column])[0][ci]
    return pd.DataFrame(out)


def stratified_sample(labels, max_points: int, *, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_points`` items, at most ``c`` per label, ``c`` as large as fits; sorted.

    Every label keeps ``min(n_label, c)`` of its items, chosen at random (seeded). ``c`` is the largest
    per-label cap whose total stays within ``max_points``; if even ``c = 1`` does not fit (more labels than
    ``max_points``), one item of each of ``max_points`` randomly chosen labels is kept. All items are
    returned when there are no more than ``max_points``.
    """
    lab = np.asarray(labels)
    n = len(lab)
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    codes, uniq = pd.factorize(lab)
    sizes = np.bincount(codes, minlength=len(uniq))
    # largest cap c with sum(min(sizes, c)) <= max_points (monotone in c: binary search)
    lo, hi = 0, int(sizes.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= max_points:
            lo = mid
        else:
            hi = mid - 1
    chosen = []
    if lo == 0:
        for c in rng.choice(len(uniq), size=max_points, replace=False):
            chosen.append(rng.choice(np.flatnonzero(codes == c), size=1))
    else:
        for c in range(len(uniq)):
            members = np.flatnonzero(codes == c)
            chosen.append(rng.choice(members, size=min(len(members), lo), replace=False))
    return np.sort(np.concatenate(chosen))


def top_n_labels(values, n: int, *, other: str = "other") -> tuple[np.ndarray, list]:
    """Keep the ``n`` most frequent values (ties by value), replace the rest by ``other``.

    Returns ``(relabelled values as an object array, the kept values, most frequent first)``.
    """
    s = pd.Series(np.asarray(values, dtype=object))
    counts = s.value_counts()
    order = sorted(counts.index, key=lambda v: (-counts[v], str(v)))
    keep = order[:n]
    out = np.where(s.isin(keep), s, other).astype(object)
    return out, keep


# ----------------------------------------------------------------------------------------------------
# Numbers in the embedding space
# ----------------------------------------------------------------------------------------------------


def neighbour_agreement(embeddings, labels: pd.DataFrame | dict | np.ndarray, k: int = 10, *,
                        device="cpu") -> pd.DataFrame:
    """Per point and label column: the fraction of its ``k`` nearest other points sharing its label.

    One exact cosine K-NN search (leave-one-out, :class:`KNNIndex`) serves every column.

    Parameters
    ----------
    embeddings : array (N, D)
        Normalised here.
    labels : DataFrame / dict of equal-length arrays / a single array
        Labels per point (any hashable values; a single array becomes the column ``label``).
    k : int
        Neighbours per point; reduced to ``N - 1`` when the set is smaller.

    Returns
    -------
    DataFrame (N rows, one column per label column), values in [0, 1].
    """
    table = labels if isinstance(labels, pd.DataFrame) else pd.DataFrame(
        labels if isinstance(labels, dict) else {"label": np.asarray(labels)})
    emb = np.asarray(embeddings, dtype=np.float32)
    if len(table) != len(emb):
        raise ValueError(f"{len(emb)} embeddings but {len(table)} label rows")
    if len(emb) < 2:
        raise ValueError("need at least 2 points")
    k = int(min(k, len(emb) - 1))
    if k < 1:
        raise ValueError("k must be >= 1")
    index = KNNIndex(emb, np.zeros(len(emb), dtype=np.int64), device=device)
    _, nb = index.search(emb, k, exclude_self=True)
    out = {}
    for col in table.columns:
        lab = pd.factorize(table[col])[0]
        out[col] = (lab[nb] == lab[:, None]).mean(axis=1)
    return pd.DataFrame(out, index=table.index)


def neighbourhood_purity(embeddings, labels, k: int = 10, *, device="cpu") -> dict[str, float]:
    """Mean :func:`neighbour_agreement` per label column (see the module docstring)."""
    return {c: float(v) for c, v in neighbour_agreement(embeddings, labels, k, device=device).mean().items()}


def chance_purity(labels) -> float:
    """Expected purity with random neighbours: ``sum_c (n_c/N) (n_c - 1)/(N - 1)``."""
    lab = pd.factorize(np.asarray(labels))[0]
    n = len(lab)
    if n < 2:
        return float("nan")
    sizes = np.bincount(lab).astype(np.float64)
    return float((sizes / n * (sizes - 1) / (n - 1)).sum())


def silhouette_cosine(embeddings, labels):
    """Mean silhouette with the cosine distance (``sklearn.metrics.silhouette_score(metric="cosine")``).

    ``labels``: one array (returns a float) or a DataFrame / dict of label columns (returns
    ``{column: float}``). NaN where it is undefined (fewer than 2 clusters, or as many clusters as points).
    """
    single = not isinstance(labels, (pd.DataFrame, dict))
    table = pd.DataFrame({"label": np.asarray(labels)} if single else labels)
    x = np.asarray(embeddings, dtype=np.float32)
    if len(table) != len(x):
        raise ValueError(f"{len(x)} embeddings but {len(table)} labels")
    out = {}
    for col in table.columns:
        lab = pd.factorize(table[col])[0]
        k = int(lab.max()) + 1 if len(x) else 0
        out[col] = float(silhouette_score(x, lab, metric="cosine")) if 2 <= k < len(x) else float("nan")
    return out["label"] if single else out


def embedding_quality(embeddings_by_stage: dict[str, np.ndarray], labels: pd.DataFrame, k: int = 10, *,
                      silhouette: bool = True, device="cpu") -> pd.DataFrame:
    """Purity (and silhouette) per stage and label column, with chance purity: the table notebook 04 reports.

    Returns a long DataFrame with columns ``stage, level, purity, chance, silhouette, k, n``.
    """
    rows = []
    for stage, emb in embeddings_by_stage.items():
        purity = neighbourhood_purity(emb, labels, k, device=device)
        sil = silhouette_cosine(emb, labels) if silhouette else {}
        for level in labels.columns:
            rows.append({"stage": stage, "level": level, "purity": purity[level],
                         "chance": chance_purity(labels[level]), "silhouette": sil.get(level, np.nan),
                         "k": int(min(k, len(emb) - 1)), "n": len(emb)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# UMAP
# ----------------------------------------------------------------------------------------------------


def umap_2d(embeddings, *, n_neighbors: int = 15, min_dist: float = 0.1, random_state: int = 0,
            device="cpu") -> np.ndarray:
    """A 2-D UMAP (umap-learn, cosine metric, fixed ``random_state``) of the embeddings; float32 (N, 2).

    The kNN graph is computed exactly (:class:`KNNIndex`) and passed as ``precomputed_knn``; ``n_neighbors``
    is reduced to ``N - 1`` for tiny sets. The fixed seed makes umap-learn single-threaded (``n_jobs=1``).
    """
    import umap  # noqa: PLC0415 - slow import, only where needed

    x = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    n = len(x)
    if n < 3:
        raise ValueError(f"UMAP needs at least 3 points, got {n}")
    nn = int(min(n_neighbors, n - 1))
    index = KNNIndex(x, np.zeros(n, dtype=np.int64), device=device, normalize=False)
    dist, idx = index.search(x, nn)  # includes each point itself (distance 0), as UMAP expects
    # the unit-vector distance d is sqrt(2 - 2 cos): UMAP's cosine distance is 1 - cos = d^2 / 2
    knn_dist = (dist.astype(np.float64) ** 2 / 2).astype(np.float32)
    # put each point itself first (exact duplicates may tie with it)
    self_pos = np.argmax(idx == np.arange(n)[:, None], axis=1)
    has_self = (idx == np.arange(n)[:, None]).any(axis=1)
    fix = has_self & (self_pos > 0)
    for i in np.flatnonzero(fix):
        p = self_pos[i]
        idx[i, [0, p]] = idx[i, [p, 0]]
        knn_dist[i, [0, p]] = knn_dist[i, [p, 0]]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*Graph is not fully connected.*")
        reducer = umap.UMAP(n_neighbors=nn, min_dist=min_dist, metric="cosine", random_state=random_state,
                            n_jobs=1, precomputed_knn=(idx, knn_dist, None))
        coords = reducer.fit_transform(x)
    return np.asarray(coords, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Notebook 04's steps
# ----------------------------------------------------------------------------------------------------

#: Single hierarchy columns measured besides the prefix levels: what the maps' middle and right panels colour by.
MAP_COLUMNS = {"body_only": "type", "year_only": "year"}

#: The results file's name for each stage of the embedding.
STAGE_KEYS = {"frozen backbone": "frozen", "trained": "trained", "trained (open-world model)": "trained"}


def map_rows(split, labels, max_points: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """The images a protocol's maps draw: its database and query images together, a :func:`stratified_sample`
    of at most ``max_points`` of them. Returns ``(all rows, drawn rows, a line saying how many)``."""
    labels = np.asarray(labels)
    rows = np.union1d(split.database, split.query)
    picked = rows[stratified_sample(labels[rows], max_points, seed=seed)]
    per_class = np.unique(labels[picked], return_counts=True)[1]
    return rows, picked, (f"{len(picked)} of {len(rows)} images drawn ({per_class.min()}-{per_class.max()} per "
                          f"class, {len(per_class)} classes)")


def umap_maps(stages: dict[str, np.ndarray], rows, *, n_neighbors: int = 15, min_dist: float = 0.1,
              random_state: int = 0, device="cpu") -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """:func:`umap_2d` of ``rows`` of each stage's embeddings: ``({stage: (N, 2) map}, {stage: seconds})``."""
    import time

    maps, seconds = {}, {}
    for name, emb in stages.items():
        t0 = time.perf_counter()
        maps[name] = umap_2d(emb[rows], n_neighbors=n_neighbors, min_dist=min_dist, random_state=random_state,
                             device=device)
        seconds[name] = time.perf_counter() - t0
    return maps, seconds


def map_colours(table: pd.DataFrame, rows, top_makes: int) -> tuple[pd.DataFrame, list, str]:
    """What each drawn point is coloured by: make (the ``top_makes`` makes with most images, the others
    "other"), body type and model year. ``table``: the dataset's per-image table (make, type, year).
    Returns ``(colours, the coloured makes, a line naming them)``."""
    make_colour, coloured = top_n_labels(table["make"], top_makes)
    picked = table.iloc[np.asarray(rows)]
    colours = pd.DataFrame({"make": make_colour[np.asarray(rows)], "type": picked["type"].to_numpy(),
                            "year": picked["year"].to_numpy()})
    note = (f"coloured: {len(coloured)} of {table['make'].nunique()} makes (most images first): "
            f"{', '.join(map(str, coloured))}")
    return colours, coloured, note


def quality_by_set(stages: dict[str, np.ndarray], hierarchy: pd.DataFrame, labels, split, k: int = 10, *,
                   device="cpu") -> pd.DataFrame:
    """:func:`embedding_quality` of the query images and, separately, of the database images (each set on its
    own, leave-one-out), at every level and :data:`MAP_COLUMNS`; long table with a ``set`` column."""
    labels = np.asarray(labels)
    out = []
    for set_name, set_rows in (("query", split.query), ("database", split.database)):
        table = label_table(hierarchy, labels[set_rows], extra=MAP_COLUMNS)
        q = embedding_quality({name: emb[set_rows] for name, emb in stages.items()}, table, k=k, device=device)
        out.append(q.assign(set=set_name))
    return pd.concat(out, ignore_index=True)


def quality_lines(quality: pd.DataFrame, set_name: str = "query",
                  levels: Sequence[str] = ("make", "model", "year")) -> list[str]:
    """One line per level: purity and silhouette of ``set_name``, frozen backbone -> trained, with chance."""
    q = quality[quality["set"] == set_name].set_index(["stage", "level"])
    return [f"{lv:>5}: purity {q.loc[('frozen backbone', lv), 'purity']:.3f} -> {q.loc[('trained', lv), 'purity']:.3f} "
            f"(chance {q.loc[('trained', lv), 'chance']:.3f}); silhouette {q.loc[('frozen backbone', lv), 'silhouette']:.3f}"
            f" -> {q.loc[('trained', lv), 'silhouette']:.3f}" for lv in levels]


def open_world_sample(split, labels, max_points: int, *, seed: int = 0) -> dict | None:
    """An open-world run's known images (database + queries) and held-out queries in one pool, and the points
    its map draws; None when the split holds no held-out query.

    Returns ``pool`` (rows), ``is_heldout`` (per pool row), ``pick`` (positions in the pool drawn, a
    :func:`stratified_sample`) and ``note`` (a line with the counts).
    """
    if len(split.ood_query) == 0:
        return None
    labels = np.asarray(labels)
    known = np.union1d(split.database, split.query)
    pool = np.concatenate([known, split.ood_query])
    is_heldout = np.r_[np.zeros(len(known), bool), np.ones(len(split.ood_query), bool)]
    pick = stratified_sample(labels[pool], max_points, seed=seed)
    note = (f"open-world: {len(split.heldout_class_ids)} held-out classes; {len(known)} known and "
            f"{len(split.ood_query)} held-out query images; {len(pick)} drawn ({int(is_heldout[pick].sum())} held-out)")
    return {"pool": pool, "is_heldout": is_heldout, "pick": pick, "note": note}


def open_world_purity(stages: dict[str, np.ndarray], sample: dict | None, labels, k: int = 10, *,
                      device="cpu") -> pd.DataFrame:
    """Per stage, over all pool images of :func:`open_world_sample`: for the held-out images, the share of
    their ``k`` nearest neighbours that are held-out too (``heldout_purity``, chance ``heldout_chance``) and of
    their own class (``heldout_class_purity``); the known images' own-class share (``known_class_purity``).
    Empty without a sample."""
    if sample is None:
        return pd.DataFrame()
    pool, held = sample["pool"], sample["is_heldout"]
    rows = []
    for name, emb in stages.items():
        agree = neighbour_agreement(emb[pool], {"heldout": held, "class": np.asarray(labels)[pool]}, k=k,
                                    device=device)
        rows.append({"stage": name, "heldout_purity": agree["heldout"][held].mean(),
                     "heldout_class_purity": agree["class"][held].mean(),
                     "known_class_purity": agree["class"][~held].mean(),
                     "heldout_chance": (held.sum() - 1) / (len(pool) - 1)})
    return pd.DataFrame(rows).set_index("stage")


def embedding_metrics(quality: pd.DataFrame, open_world: pd.DataFrame) -> dict[str, float]:
    """The ``metrics`` of ``results/04_embeddings_umap.json``: ``purity_<set>_<stage>_<level>``,
    ``silhouette_<set>_<stage>_<level>``, ``purity_query_chance_<level>`` and ``open_world_<stage>_<number>``
    (stage ``frozen`` / ``trained``, :data:`STAGE_KEYS`)."""
    metrics = {}
    for r in quality.itertuples():
        metrics[f"purity_{r.set}_{STAGE_KEYS[r.stage]}_{r.level}"] = r.purity
        metrics[f"silhouette_{r.set}_{STAGE_KEYS[r.stage]}_{r.level}"] = r.silhouette
    for r in quality[(quality["set"] == "query") & (quality["stage"] == "trained")].itertuples():
        metrics[f"purity_query_chance_{r.level}"] = r.chance
    for stage, r in open_world.iterrows():
        for col in ("heldout_purity", "heldout_class_purity", "known_class_purity"):
            metrics[f"open_world_{STAGE_KEYS[stage]}_{col}"] = r[col]
    if len(open_world):
        metrics["open_world_heldout_chance"] = float(open_world["heldout_chance"].iloc[0])
    return metrics


def umap_results_entry(*, dataset: str, run, open_world_run, quality: pd.DataFrame, open_world: pd.DataFrame,
                       sample: dict | None, rows, picked, device: str, purity_k: int, max_points: int,
                       umap_params: dict, umap_seconds: dict, coloured_makes: list, data_dir) -> dict:
    """The entry of ``results/04_embeddings_umap.json``: :func:`embedding_metrics` with what they were measured
    on (the trained run's recipe in words, the numbers of images, the map's sampling and UMAP settings)."""
    from ..results import results_entry

    cfg, split = run.config, run.split
    return results_entry(
        dataset=dataset, protocol=split.protocol, backbone=cfg.backbone, image_size=cfg.image_size, device=device,
        metrics=embedding_metrics(quality, open_world), setting=cfg.describe(), loss=cfg.loss, epochs=cfg.epochs,
        purity_k=purity_k, n_query=len(split.query), n_database=len(split.database), map_points=len(picked),
        map_images_available=len(rows), open_world_map_points=len(sample["pick"]) if sample else 0,
        open_world_heldout_queries=int(sample["is_heldout"].sum()) if sample else 0, max_points=max_points,
        sampling="at most c images per class, c the largest cap within max_points, seeded",
        umap={**umap_params, "metric": "cosine"}, umap_seconds=umap_seconds, coloured_makes=coloured_makes,
        run_folder=str(run.path), open_world_run_folder=str(open_world_run.path),
        open_world_holdout=open_world_run.config.holdout,
        heldout_classes=len(open_world_run.split.heldout_class_ids), data_dir=str(data_dir))
