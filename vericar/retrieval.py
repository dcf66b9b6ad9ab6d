"""Labelled exact K-NN retrieval (:class:`KNNIndex`) and K-NN label voting (flat and hierarchical).

Geometry
--------
Embeddings are L2-normalised (``normalize=True``, the default, does it on :meth:`KNNIndex.add` and on
every query; ``normalize=False`` trusts the caller that they already are).  Neighbours are found by
the neighbour layer (:class:`vericar.neighbours.ExactSearch`, exact, torch or faiss with its
``"auto"`` rule) and reported as the **Euclidean distance between unit vectors**

    d(q, x) = || q - x ||_2 = sqrt(max(0, 2 - 2 cos(q, x)))   in [0, 2],

the distance KNN+ OOD scoring (:mod:`vericar.ood`) thresholds, ascending per row.

Voting
------
:meth:`KNNIndex.predict` and :func:`hierarchical_predict` share one vote rule over the ``k`` neighbours
of a query: each neighbour votes for its label with weight 1 (``weighted=False``) or ``1 / (d + 1e-6)``
(``weighted=True``); the label with the largest total wins; a tie is broken in favour of the tied label
held by the *nearest* neighbour; confidence = the winner's share of the total weight (vote share).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.hierarchy import LEVELS, level_keys
from .neighbours import ExactSearch, as_2d_float, l2_normalize

__all__ = [
    "KNNIndex",
    "hierarchical_predict",
    "vote",
    "vote_weights",
]

#: Added to distances before inverting them for ``weighted=True`` votes (keeps exact duplicates finite).
WEIGHT_EPS = 1e-6

# Upper bound on the elements of the (rows, k, k) agreement tensor used by `vote`.
_VOTE_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------------------------------
# Voting
# ----------------------------------------------------------------------------------------------------


def vote_weights(distances, k: int, n: int, weighted: bool) -> np.ndarray:
    """Each of the ``k`` neighbours' vote (n, k): 1, or with ``weighted`` a weight from its distance."""
    if not weighted:
        return np.ones((n, k), dtype=np.float64)
    if distances is None:
        raise ValueError("weighted=True needs the neighbour distances")
    d = np.asarray(distances, dtype=np.float64)
    if d.shape != (n, k):
        raise ValueError(f"distances must have shape {(n, k)}, got {d.shape}")
    if (d < 0).any() or not np.isfinite(d).all():
        raise ValueError("distances must be finite and >= 0")
    return 1.0 / (d + WEIGHT_EPS)


def vote(neighbour_codes, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Vote over the neighbours of each query.

    Parameters
    ----------
    neighbour_codes : array (N, k)
        Label of each neighbour (any dtype that supports ``==``), nearest first.
    weights : array (N, k), optional
        Vote weight of each neighbour (default 1).

    Returns
    -------
    winner_pos : int array (N,)
        Column (neighbour rank) of the nearest neighbour holding the winning label, so the winning
        label is ``neighbour_codes[i, winner_pos[i]]``.  Ties between labels go to the label of the
        nearest neighbour among the tied labels.
    share : float array (N,)
        The winner's vote share (total weight of its voters / total weight).
    """
    codes = np.asarray(neighbour_codes)
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"neighbour labels must be 2-D (N, k) with k >= 1, got shape {codes.shape}")
    n, k = codes.shape
    w = np.ones((n, k)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n, k):
        raise ValueError(f"weights must have shape {(n, k)}, got {w.shape}")
    winner = np.zeros(n, dtype=np.int64)
    share = np.ones(n, dtype=np.float64)
    if k == 1 or n == 0:
        return winner, share
    rows = max(1, _VOTE_ELEMENTS // (k * k))
    for s in range(0, n, rows):
        c, ww = codes[s : s + rows], w[s : s + rows]
        same = c[:, :, None] == c[:, None, :]  # (r, k, k): neighbour j and j' share a label
        score = (same * ww[:, None, :]).sum(axis=2)  # total weight of neighbour j's label
        pos = score.argmax(axis=1)  # first (= nearest) column with the maximum score
        winner[s : s + rows] = pos
        share[s : s + rows] = score[np.arange(len(c)), pos] / ww.sum(axis=1)
    return winner, share


# ----------------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------------


class KNNIndex:
    """Exact K-NN index over L2-normalised embeddings with labels.

    Parameters
    ----------
    embeddings : array (n, dim), optional
        Initial database (numpy or torch); more can be appended with :meth:`add`.
    labels : array (n,), optional
        One label per embedding (class index, id or string).
    backend : {"auto", "torch", "faiss"}
        Search backend (see the module docstring for the ``"auto"`` rule).
    device : str or torch.device
        Device of the torch backend ("cpu", "cuda", ...).
    normalize : bool
        L2-normalise database embeddings and queries (default).  With ``False`` they must already be
        unit-norm for the reported distances to be ``sqrt(2 - 2 cos)``.

    Attributes
    ----------
    embeddings : np.ndarray (n, dim) float32
        The (normalised) database.
    labels : np.ndarray (n,)
        Database labels.

    Adding new classes needs no retraining: ``index.add(new_embeddings, new_labels)`` appends them and
    the next :meth:`search` / :meth:`predict` sees them.
    """

    def __init__(
        self,
        embeddings=None,
        labels=None,
        *,
        backend: str = "auto",
        device="cpu",
        normalize: bool = True,
    ) -> None:
        self._search = ExactSearch(backend=backend, device=device)
        self.normalize = normalize
        self.labels = np.zeros(0, dtype=np.int64)
        if embeddings is not None or labels is not None:
            if embeddings is None or labels is None:
                raise ValueError("give both embeddings and labels, or neither")
            self.add(embeddings, labels)

    # -- building --------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._search.backend

    @property
    def device(self) -> torch.device:
        return self._search.device

    @property
    def embeddings(self) -> np.ndarray:
        """The (normalised) database, float32 (n, dim)."""
        return self._search.database

    def __len__(self) -> int:
        return len(self._search)

    @property
    def dim(self) -> int | None:
        """Embedding dimension (None while the index is empty)."""
        return self._search.dim

    def __repr__(self) -> str:
        return (f"KNNIndex(n={len(self)}, dim={self.dim}, backend={self.backend!r} -> "
                f"{self.resolved_backend!r}, device={str(self.device)!r}, normalize={self.normalize})")

    def add(self, embeddings, labels) -> "KNNIndex":
        """Append embeddings with their labels (labels may be new classes); returns ``self``."""
        emb = as_2d_float(embeddings, "embeddings")
        lab = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
        if lab.ndim != 1 or len(lab) != len(emb):
            raise ValueError(f"labels must be 1-D with one label per embedding ({len(emb)}), got shape {lab.shape}")
        self._search.add(l2_normalize(emb) if self.normalize else emb)
        self.labels = lab.copy() if len(self.labels) == 0 else np.concatenate([self.labels, lab])
        return self

    @property
    def resolved_backend(self) -> str:
        """The backend a search runs with now (``"auto"`` resolved for the current size)."""
        return self._search.resolved_backend

    # -- searching -------------------------------------------------------------------------------

    def search(self, queries, k: int, *, exclude_self: bool = False,
               chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest database items of each query.

        Parameters
        ----------
        queries : array (N, dim)
        k : int
            Number of neighbours (``1 <= k <= len(index)``, or ``len(index) - 1`` with ``exclude_self``).
        exclude_self : bool
            Leave-one-out: the queries ARE the database, in the same order, and query ``i`` must not
            retrieve database item ``i``.  Only index ``i`` is removed (exact duplicates of it stay
            eligible), wherever it would rank.
        chunk_size : int
            Most queries per torch matmul (further capped so one similarity chunk stays <= 2**26
            elements).

        Returns
        -------
        distances : float32 (N, k)
            Euclidean distances between unit vectors, ascending per row.
        indices : int64 (N, k)
            Database row of each neighbour.
        """
        q = as_2d_float(queries, "queries")
        if len(self) == 0:
            raise ValueError("the index is empty; add() embeddings first")
        if q.shape[1] != self.dim:
            raise ValueError(f"query dim {q.shape[1]} does not match the index dim {self.dim}")
        q = l2_normalize(q) if self.normalize else q
        return self._search.search(q, k, exclude_self=exclude_self, chunk_size=chunk_size)

    def predict(self, queries, k: int = 1, *, weighted: bool = False,
                exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """K-NN label prediction: majority (or distance-weighted) vote over the ``k`` nearest items.

        Ties go to the tied label of the nearest neighbour; ``weighted=True`` weighs each vote by
        ``1 / (distance + 1e-6)``.  ``k=1`` copies the nearest neighbour's label.

        Returns
        -------
        labels : np.ndarray (N,)
            Predicted labels (dtype of :attr:`labels`).
        confidence : float64 (N,)
            Vote share of the predicted label.
        """
        dist, idx = self.search(queries, k, exclude_self=exclude_self)
        nl = self.labels[idx]
        pos, share = vote(nl, vote_weights(dist, idx.shape[1], len(idx), weighted))
        return nl[np.arange(len(nl)), pos], share

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Save embeddings and labels to an ``.npz`` file (suffix added if missing); returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        labels = self.labels
        if labels.dtype == object:
            labels = labels.astype(str)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, embeddings=self.embeddings, labels=labels,
                 normalize=np.array(self.normalize))
        return path

    @classmethod
    def load(cls, path, *, backend: str = "auto", device="cpu") -> "KNNIndex":
        """Load an index written by :meth:`save` (the saved embeddings are used as stored)."""
        with np.load(Path(path), allow_pickle=False) as f:
            emb, lab = f["embeddings"], f["labels"]
            normalize = bool(f["normalize"]) if "normalize" in f.files else True
        index = cls(backend=backend, device=device, normalize=False)
        if len(emb):
            index.add(emb, lab)
        index.normalize = normalize
        return index


# ----------------------------------------------------------------------------------------------------
# Hierarchical voting
# ----------------------------------------------------------------------------------------------------


def hierarchical_predict(neighbour_labels, neighbour_distances, class_table: pd.DataFrame, *,
                         weighted: bool = False) -> pd.DataFrame:
    """Vote for make, type, model and year independently over the same ``k`` neighbours.

    Levels use prefix semantics (:func:`vericar.data.hierarchy.level_keys`): the label of a class at
    level ``make`` is ``(make,)``, at ``type`` ``(make, type)``, at ``model`` ``(make, type, model)``
    (the class up to its year) and at ``year`` the full class.  At each level every neighbour votes for
    its own class's label at that level, so a make vote counts every neighbour of that make even when
    they are of different models: 2 neighbours of two A models + 1 of a B model -> make A, although
    no single class has 2 votes.  Vote rule, tie break and confidence as in :func:`vote`.

    With ``k = 1`` every level simply copies the nearest neighbour's labels (confidence 1).

    Parameters
    ----------
    neighbour_labels : int array (N, k)
        0-based class index (``class_id - 1``) of each neighbour, nearest first.
    neighbour_distances : array (N, k) or None
        Their distances (needed only for ``weighted=True``).
    class_table : DataFrame
        One row per class, row ``i`` = class index ``i`` (e.g. ``CarsDataset.hierarchy``), with
        columns make, type, model, year.

    Returns
    -------
    DataFrame, one row per query, with
        ``make, type, model, year`` -- the winning label at each level (the value of that level's last
        component; the levels are voted independently, so e.g. ``type`` is the type of the winning
        (make, type) pair, whose make may differ from the ``make`` column),
        ``class_index`` -- the winning class (= the year-level winner),
        ``make_confidence, type_confidence, model_confidence, year_confidence`` -- vote shares,
        ``make_key, type_key, model_key, year_key`` -- the winning prefix tuples (used by
        :func:`vericar.metrics.level_accuracy`).
    """
    nl = np.asarray(neighbour_labels)
    if nl.ndim != 2 or nl.shape[1] == 0:
        raise ValueError(f"neighbour_labels must be 2-D (N, k) with k >= 1, got shape {nl.shape}")
    if not np.issubdtype(nl.dtype, np.integer):
        raise TypeError("neighbour_labels must be integer class indices (class_id - 1)")
    n_classes = len(class_table)
    if nl.size and (nl.min() < 0 or nl.max() >= n_classes):
        raise ValueError(f"neighbour_labels must be class indices in 0..{n_classes - 1}")
    missing = [c for c in LEVELS if c not in class_table.columns]
    if missing:
        raise ValueError(f"class_table lacks columns {missing}")
    table = class_table.reset_index(drop=True)
    n, k = nl.shape
    weights = vote_weights(neighbour_distances, k, n, weighted)
    rows = np.arange(n)
    out: dict[str, object] = {}
    conf: dict[str, np.ndarray] = {}
    keys: dict[str, np.ndarray] = {}
    for level in LEVELS:
        key_series = level_keys(table, level)
        codes = pd.factorize(key_series)[0]
        pos, share = vote(codes[nl], weights)
        winner_class = nl[rows, pos]
        out[level] = table[level].to_numpy()[winner_class]
        conf[f"{level}_confidence"] = share
        keys[f"{level}_key"] = key_series.to_numpy()[winner_class]
        if level == "year":
            out["class_index"] = winner_class.astype(np.int64)
    df = pd.DataFrame({**out, **conf, **keys})
    return df
