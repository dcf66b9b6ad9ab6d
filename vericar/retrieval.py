"""Exact K-NN retrieval over L2-normalised embeddings, and K-NN label voting (flat and hierarchical).

Geometry
--------
Embeddings are L2-normalised (``normalize=True``, the default, does it on :meth:`KNNIndex.add` and on
every query; ``normalize=False`` trusts the caller that they already are).  Neighbours are ranked by
cosine similarity = dot product, and reported as the **Euclidean distance between unit vectors**

    d(q, x) = || q - x ||_2 = sqrt(max(0, 2 - 2 cos(q, x)))   in [0, 2],

the distance KNN+ OOD scoring (:mod:`vericar.ood`) thresholds.  The ranking uses the dot products; the
distances of the selected neighbours are then recomputed directly as ``||q - x||`` (no ``2 - 2 cos``
cancellation, so exact duplicates are at distance exactly 0) and each row is sorted ascending by them.

Backends
--------
``"torch"``  exact: ``queries @ database.T`` then ``topk``, in query chunks, on ``device`` (CPU or CUDA).
``"faiss"``  exact: ``faiss.IndexFlatIP`` (inner product) on CPU, built lazily and extended on ``add``.
``"auto"``   the rule is simply: ``"faiss"`` when the database holds more than
             ``FAISS_AUTO_THRESHOLD`` (200,000) items, ``device`` is CPU and faiss is importable;
             ``"torch"`` otherwise.  Both are exact flat searches; on a busy 2-core CPU they were
             within 2x of each other at 10k-100k items, torch a little ahead at 10k and faiss ahead
             at 100k (``benchmarks/bench_retrieval.py``).  Above 200k the torch query chunks shrink
             (one chunk's similarity matrix is capped at 2**26 elements) while faiss streams the
             database with a bounded heap, so faiss is the choice there.  On a GPU torch is used.
Both backends return the same neighbours up to ties (equal distances may come in either order, and at
the k-th place either of the tied items may be chosen).

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

__all__ = [
    "FAISS_AUTO_THRESHOLD",
    "KNNIndex",
    "as_2d_float",
    "hierarchical_predict",
    "l2_normalize",
    "vote",
    "vote_weights",
]

#: Database size above which ``backend="auto"`` chooses faiss (on a CPU device).
FAISS_AUTO_THRESHOLD = 200_000

#: Added to distances before inverting them for ``weighted=True`` votes (keeps exact duplicates finite).
WEIGHT_EPS = 1e-6

# Upper bound on the elements of one (query chunk x database) similarity matrix (float32: 256 MiB).
_SIM_ELEMENTS = 1 << 26
# Upper bound on the elements of the (rows, k, dim) gather used to recompute neighbour distances.
_GATHER_ELEMENTS = 1 << 24
# Upper bound on the elements of the (rows, k, k) agreement tensor used by `vote`.
_VOTE_ELEMENTS = 1 << 23


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:  # pragma: no cover - faiss-cpu is a declared dependency
        return None
    return faiss


def as_2d_float(a, name: str) -> np.ndarray:
    """``a`` (numpy or torch) as a contiguous float32 (n, dim) array; refuses other shapes, NaN and inf."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (float32); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


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
        if backend not in ("auto", "torch", "faiss"):
            raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'faiss'")
        if backend == "faiss" and _faiss() is None:  # pragma: no cover
            raise ImportError("backend='faiss' needs faiss (pip install faiss-cpu)")
        self.backend = backend
        self.device = torch.device(device)
        self.normalize = normalize
        self.embeddings = np.zeros((0, 0), dtype=np.float32)
        self.labels = np.zeros(0, dtype=np.int64)
        self._torch_db: torch.Tensor | None = None
        self._faiss_index = None
        if embeddings is not None or labels is not None:
            if embeddings is None or labels is None:
                raise ValueError("give both embeddings and labels, or neither")
            self.add(embeddings, labels)

    # -- building --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int | None:
        """Embedding dimension (None while the index is empty)."""
        return None if len(self) == 0 else int(self.embeddings.shape[1])

    def __repr__(self) -> str:
        return (f"KNNIndex(n={len(self)}, dim={self.dim}, backend={self.backend!r} -> "
                f"{self.resolved_backend!r}, device={str(self.device)!r}, normalize={self.normalize})")

    def add(self, embeddings, labels) -> "KNNIndex":
        """Append embeddings with their labels (labels may be new classes); returns ``self``."""
        emb = as_2d_float(embeddings, "embeddings")
        lab = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
        if lab.ndim != 1 or len(lab) != len(emb):
            raise ValueError(f"labels must be 1-D with one label per embedding ({len(emb)}), got shape {lab.shape}")
        if len(self) > 0 and emb.shape[1] != self.dim:
            raise ValueError(f"embedding dim {emb.shape[1]} does not match the index dim {self.dim}")
        if self.normalize:
            emb = l2_normalize(emb)
        if len(self) == 0:
            self.embeddings = emb.copy()
            self.labels = lab.copy()
        else:
            self.embeddings = np.concatenate([self.embeddings, emb])
            self.labels = np.concatenate([self.labels, lab])
        if self._torch_db is not None:
            self._torch_db = torch.cat([self._torch_db, torch.from_numpy(emb).to(self.device)])
        if self._faiss_index is not None:
            self._faiss_index.add(emb)
        return self

    @property
    def resolved_backend(self) -> str:
        """The backend a search runs with now (``"auto"`` resolved for the current size)."""
        if self.backend != "auto":
            return self.backend
        if len(self) > FAISS_AUTO_THRESHOLD and self.device.type == "cpu" and _faiss() is not None:
            return "faiss"
        return "torch"

    # -- searching -------------------------------------------------------------------------------

    def _prepare_queries(self, queries) -> np.ndarray:
        q = as_2d_float(queries, "queries")
        if len(self) == 0:
            raise ValueError("the index is empty; add() embeddings first")
        if q.shape[1] != self.dim:
            raise ValueError(f"query dim {q.shape[1]} does not match the index dim {self.dim}")
        return l2_normalize(q) if self.normalize else q

    def _search_torch(self, q: np.ndarray, kk: int, exclude_self: bool, chunk_size: int) -> np.ndarray:
        if self._torch_db is None:
            self._torch_db = torch.from_numpy(self.embeddings).to(self.device)
        db = self._torch_db
        n = len(self)
        rows = max(1, min(chunk_size, _SIM_ELEMENTS // n))
        out = np.empty((len(q), kk), dtype=np.int64)
        with torch.no_grad():
            for s in range(0, len(q), rows):
                qc = torch.from_numpy(q[s : s + rows]).to(self.device)
                sim = qc @ db.T
                if exclude_self:
                    r = torch.arange(len(qc), device=self.device)
                    sim[r, r + s] = -torch.inf
                out[s : s + rows] = sim.topk(kk, dim=1, largest=True, sorted=True).indices.cpu().numpy()
        return out

    def _search_faiss(self, q: np.ndarray, kk: int, exclude_self: bool) -> np.ndarray:
        if self._faiss_index is None:
            faiss = _faiss()
            self._faiss_index = faiss.IndexFlatIP(self.dim)
            self._faiss_index.add(self.embeddings)
        if not exclude_self:
            return self._faiss_index.search(q, kk)[1].astype(np.int64)
        # Ask for one more and drop the query's own index wherever it is (with duplicates it need
        # not be at rank 0); rows where it is not among the k+1 drop their last neighbour.
        idx = self._faiss_index.search(q, kk + 1)[1].astype(np.int64)
        is_self = idx == np.arange(len(q))[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        return idx[~is_self].reshape(len(q), kk)

    def _distances(self, q: np.ndarray, idx: np.ndarray) -> np.ndarray:
        n, k = idx.shape
        d = np.empty((n, k), dtype=np.float32)
        rows = max(1, _GATHER_ELEMENTS // max(1, k * q.shape[1]))
        for s in range(0, n, rows):
            diff = self.embeddings[idx[s : s + rows]] - q[s : s + rows, None, :]
            d[s : s + rows] = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
        return d

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
        q = self._prepare_queries(queries)
        n = len(self)
        k = int(k)
        if exclude_self and len(q) != n:
            raise ValueError(f"exclude_self=True needs the queries to be the database ({n} rows), got {len(q)}")
        k_max = n - 1 if exclude_self else n
        if not 1 <= k <= k_max:
            raise ValueError(f"k must be in 1..{k_max} for a database of {n} items"
                             f"{' with exclude_self' if exclude_self else ''}, got {k}")
        if self.resolved_backend == "faiss":
            idx = self._search_faiss(q, k, exclude_self)
        else:
            idx = self._search_torch(q, k, exclude_self, int(chunk_size))
        dist = self._distances(q, idx)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)

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
