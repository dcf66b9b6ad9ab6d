"""Labelled K-NN indexes at scale: exact or approximate (faiss IVF / HNSW), with stable ids, removal, persistence.

>>> index = build_index(embeddings, labels, kind="auto", class_table=cars.hierarchy)
>>> distances, ids = index.search(queries, k=5)
>>> index.predict(queries, k=5)                       # K-NN vote, like KNNIndex.predict
>>> index.hierarchical_predict(queries, k=5)          # make / type / model / year votes
>>> new_ids = index.add(more_embeddings, more_labels) # no rebuild
>>> index.remove(new_ids[:3])                         # no rebuild
>>> recall_vs_exact(index, queries, k=10)             # how much the approximation loses
>>> index.save("runs/x/index"); load_index("runs/x/index")

The search itself is the neighbour layer's :class:`vericar.neighbours.FaissIndex` (faiss keeps the ids); this
module adds a label per id, the class table, the votes of :mod:`vericar.retrieval`, and the folder format.

Kinds
-----
``"flat"``  exact: ``faiss.IndexFlatIP`` in an ``IndexIDMap2``; ``remove`` deletes from it.
``"ivf"``   ``faiss.IndexIVFFlat`` (inner product): k-means into ``nlist`` cells (default
            ``4 sqrt(n)``, capped at ``n / 39`` so that every centroid has its 39 training points),
            trained on a sample of ``40 nlist`` vectors; a query scans the ``nprobe`` nearest cells
            (default 16: more = slower and closer to exact). Added items go to their nearest cell (the
            centroids are not retrained: rebuild when the data drift far from the training sample);
            ``remove`` deletes them from the inverted lists.
``"hnsw"``  ``faiss.IndexHNSWFlat`` (inner product, ``M=32`` links, ``efConstruction=80``) in an
            ``IndexIDMap2``: a graph; queries explore ``ef_search`` candidates (default 64). Fastest queries,
            no training, but the slowest build and the most memory (vectors + ~``2 M`` links each), and faiss
            cannot delete from it: removed items are filtered out of every search (an ``IDSelector``) until
            :meth:`VectorIndex.compact`.
``"auto"``  ``"flat"`` up to ``AUTO_FLAT_MAX`` items (exact search is fast enough there and needs no
            tuning), ``"ivf"`` above (see ``benchmarks/bench_index.py`` for the numbers behind this).

Vectors are L2-normalised and ranked by inner product; distances are the Euclidean distance between unit
vectors ``sqrt(2 - 2 cos)``, recomputed from the stored vectors. Every item has a stable int64 id
(``0, 1, 2, ...`` in the order added unless given), kept through removals, compaction and save/load; a
removed id is never given again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .neighbours import ExactSearch, FaissIndex, as_2d_float, default_nlist, l2_normalize, search_recall
from .retrieval import hierarchical_predict, vote, vote_weights

__all__ = [
    "AUTO_FLAT_MAX",
    "KINDS",
    "VectorIndex",
    "build_index",
    "choose_kind",
    "default_nlist",
    "load_index",
    "recall_vs_exact",
    "save_index",
]

KINDS = ("auto", "flat", "ivf", "hnsw")
#: ``kind="auto"`` uses exact search up to this many items, IVF above (exact vs approximate, not torch vs faiss).
AUTO_FLAT_MAX = 100_000
FORMAT_VERSION = 2


def choose_kind(n: int) -> str:
    """The kind ``"auto"`` picks for ``n`` items."""
    return "flat" if n <= AUTO_FLAT_MAX else "ivf"


def _as_labels(labels, n: int) -> np.ndarray:
    lab = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
    if lab.ndim != 1 or len(lab) != n:
        raise ValueError(f"labels must be 1-D with one label per embedding ({n}), got shape {lab.shape}")
    return lab


class VectorIndex:
    """A K-NN index of one :data:`KINDS` over labelled, L2-normalised embeddings; see the module docstring.

    Build it with :func:`build_index` (IVF needs training data), then :meth:`add` / :meth:`remove` freely.

    Attributes:
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        dim: embedding dimension.
        class_table: optional DataFrame, one row per class index (make / type / model / year columns), used
            by :meth:`hierarchical_predict` and saved with the index.
        nprobe: IVF cells scanned per query; ``ef_search``: HNSW candidates per query (settable).
    """

    def __init__(self, dim: int, kind: str = "flat", *, normalize: bool = True, class_table: pd.DataFrame | None = None,
                 nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 64) -> None:
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS} (build_index resolves 'auto')")
        self.kind, self.dim, self.normalize = kind, int(dim), normalize
        self.class_table = None if class_table is None else class_table.reset_index(drop=True)
        self._faiss = FaissIndex(self.dim, kind, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                                 ef_construction=ef_construction, ef_search=ef_search)
        self._labels = pd.Series(np.zeros(0, dtype=np.int64), index=pd.Index([], dtype=np.int64))  # id -> label
        self._retired = np.zeros(0, dtype=np.int64)  # removed ids, never given again
        self._next_id = 0

    # -- properties ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live items (removed ones excluded)."""
        return len(self._labels)

    def __repr__(self) -> str:
        extra = {"ivf": f", nlist={self.params['nlist']}, nprobe={self.nprobe}",
                 "hnsw": f", M={self.params['hnsw_m']}, ef_search={self.ef_search}"}.get(self.kind, "")
        return f"VectorIndex(kind={self.kind!r}, n={len(self)}, dim={self.dim}{extra})"

    @property
    def params(self) -> dict:
        return self._faiss.params

    @property
    def ids(self) -> np.ndarray:
        """Ids of the live items, in insertion order."""
        return self._labels.index.to_numpy(dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the live items, aligned with :attr:`ids`."""
        return self._labels.to_numpy()

    @property
    def nprobe(self) -> int:
        return self._faiss.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._faiss.nprobe = value

    @property
    def ef_search(self) -> int:
        return self._faiss.ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._faiss.ef_search = value

    @property
    def is_trained(self) -> bool:
        return self._faiss.is_trained

    def label_of(self, ids) -> np.ndarray:
        """Labels of live ``ids`` (any shape)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = self._labels.index.get_indexer(ids.ravel())
        if (pos < 0).any():
            raise KeyError(f"unknown ids, e.g. {ids.ravel()[pos < 0][:5].tolist()}")
        return self._labels.to_numpy()[pos].reshape(ids.shape)

    # -- building --------------------------------------------------------------------------------

    def train(self, embeddings, *, train_size: int | None = None, seed: int = 0, niter: int = 10) -> "VectorIndex":
        """IVF only: k-means the cells on (a sample of ``train_size``, default ``40 nlist``) ``embeddings``."""
        self._faiss.train(self._prepare(embeddings, "embeddings"), train_size=train_size, seed=seed, niter=niter)
        return self

    def add(self, embeddings, labels, ids=None) -> np.ndarray:
        """Add items (new classes welcome); returns their ids (``ids`` if given: unique, unused int64)."""
        x = self._prepare(embeddings, "embeddings")
        lab = _as_labels(labels, len(x))
        if ids is None:
            new_ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
        else:
            new_ids = np.asarray(ids, dtype=np.int64)
            if new_ids.shape != (len(x),) or len(np.unique(new_ids)) != len(x):
                raise ValueError(f"ids must be {len(x)} unique integers")
            if (new_ids < 0).any():
                raise ValueError(f"ids must be >= 0: -1 marks 'not found' in search results (got "
                                 f"{new_ids[new_ids < 0][:5].tolist()})")
            if np.isin(new_ids, self.ids).any() or np.isin(new_ids, self._retired).any():
                raise ValueError("some ids are already in the index (ids stay reserved after removal)")
        if not len(x):
            return new_ids
        self._faiss.add(x, new_ids)
        added = pd.Series(lab, index=pd.Index(new_ids, dtype=np.int64))
        self._labels = added if len(self._labels) == 0 else pd.concat([self._labels, added])
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def remove(self, ids) -> int:
        """Remove items by id (unknown or already removed ids are ignored); returns how many were removed."""
        ids = np.unique(np.atleast_1d(np.asarray(ids, dtype=np.int64)))
        ids = ids[np.isin(ids, self.ids)]
        if not len(ids):
            return 0
        self._faiss.remove(ids)
        self._labels = self._labels.drop(ids)
        self._retired = np.union1d(self._retired, ids)
        return int(len(ids))

    def compact(self) -> "VectorIndex":
        """HNSW: rebuild the graph without the removed items (slow on millions); flat and IVF delete at once."""
        if self.kind != "hnsw" or not len(self._faiss.removed):
            return self
        ids = self.ids
        fresh = FaissIndex(self.dim, self.kind, **self.params)
        fresh.add(self._faiss.vectors(ids), ids)
        self._faiss = fresh
        return self

    # -- searching -------------------------------------------------------------------------------

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest live items of each query: ``(distances (N, k) float32 ascending, ids (N, k)
        int64)``. An approximate index may find fewer than ``k`` (IVF with a small ``nprobe``): the missing
        places hold id ``-1`` and distance ``inf``."""
        q = self._prepare(queries, "queries")
        n = len(self)
        if n == 0:
            raise ValueError("the index is empty; add() embeddings first")
        if not 1 <= int(k) <= n:
            raise ValueError(f"k must be in 1..{n} for an index of {n} items, got {k}")
        return self._faiss.search(q, int(k))

    def predict(self, queries, k: int = 1, *, weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """K-NN vote (the rule of :func:`vericar.retrieval.vote`): ``(labels, confidence)``."""
        dist, ids = self.search(queries, k)
        self._check_complete(ids)
        nl = self.label_of(ids)
        pos, share = vote(nl, vote_weights(dist, ids.shape[1], len(ids), weighted))
        return nl[np.arange(len(nl)), pos], share

    def hierarchical_predict(self, queries, k: int = 5, *, weighted: bool = False) -> pd.DataFrame:
        """Make / type / model / year votes over the ``k`` neighbours (:func:`vericar.retrieval.hierarchical_predict`);
        needs integer class-index labels and :attr:`class_table`."""
        if self.class_table is None:
            raise ValueError("hierarchical_predict needs the index's class_table (build_index(..., class_table=...))")
        dist, ids = self.search(queries, k)
        self._check_complete(ids)
        return hierarchical_predict(self.label_of(ids).astype(np.int64), dist, self.class_table, weighted=weighted)

    def exact(self, backend: str = "auto", device="cpu") -> tuple[ExactSearch, np.ndarray]:
        """An :class:`~vericar.neighbours.ExactSearch` over the live items (vectors read back from the index)
        and the id of each of its rows."""
        ids = self.ids
        return ExactSearch(self._faiss.vectors(ids), backend=backend, device=device), ids

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the index to the folder ``path``: ``meta.json``, ``items.npz`` (live ids and labels, removed
        ids), ``class_table.csv`` (if any) and the faiss index ``index.faiss``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._faiss.write(path / "index.faiss")
        labels = self.labels.astype(str) if self.labels.dtype == object else self.labels
        np.savez(path / "items.npz", ids=self.ids, labels=labels, retired=self._retired,
                 hnsw_removed=self._faiss.removed)
        if self.class_table is not None:
            self.class_table.to_csv(path / "class_table.csv", index=False)
        elif (path / "class_table.csv").exists():
            (path / "class_table.csv").unlink()
        meta = {"format": "vericar.index", "version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                "normalize": self.normalize, "n": len(self), "next_id": self._next_id, "params": self.params}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "VectorIndex":
        """Load an index written by :meth:`save`."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a saved index (no meta.json); write one with save_index()")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "vericar.index" or meta.get("version", 0) != FORMAT_VERSION:
            raise ValueError(f"{path} holds an index of an unknown format/version ({meta.get('format')}, "
                             f"{meta.get('version')}); this vericar reads version {FORMAT_VERSION}: build it again "
                             "with build_index() and save it")
        table = pd.read_csv(path / "class_table.csv") if (path / "class_table.csv").is_file() else None
        index = cls(meta["dim"], meta["kind"], normalize=meta["normalize"], class_table=table, **meta["params"])
        with np.load(path / "items.npz", allow_pickle=False) as f:
            index._labels = pd.Series(f["labels"], index=pd.Index(f["ids"], dtype=np.int64))
            index._retired = f["retired"]
            removed = f["hnsw_removed"]
        index._next_id = int(meta["next_id"])
        index._faiss = FaissIndex.read(path / "index.faiss", meta["kind"], meta["dim"], meta["params"], removed)
        return index

    # -- internals -------------------------------------------------------------------------------

    def _prepare(self, x, name: str) -> np.ndarray:
        arr = as_2d_float(x, name)
        if arr.shape[1] != self.dim:
            raise ValueError(f"{name} have dim {arr.shape[1]}, the index has dim {self.dim}")
        if self.normalize:
            return l2_normalize(arr)
        if len(arr) and not np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-3):
            raise ValueError(f"{name} are not unit length, but a {self.kind} index ranks by inner product, which "
                             "finds the nearest neighbours only for unit vectors. Pass normalize=True or "
                             "L2-normalise them.")
        return arr

    @staticmethod
    def _check_complete(ids: np.ndarray) -> None:
        if (ids < 0).any():
            raise ValueError(f"{int((ids < 0).any(axis=1).sum())} queries found fewer than k neighbours "
                             "(IVF: raise nprobe)")


def build_index(embeddings, labels, kind: str = "auto", *, ids=None, class_table: pd.DataFrame | None = None,
                normalize: bool = True, nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32,
                ef_construction: int = 80, ef_search: int = 64, train_size: int | None = None,
                seed: int = 0) -> VectorIndex:
    """Build a :class:`VectorIndex` of ``kind`` (``"auto"``: :func:`choose_kind` by size) over ``embeddings``
    with ``labels`` (and ``ids``, default ``0..n-1``). ``class_table`` (e.g. ``CarsDataset.hierarchy``) is kept
    for :meth:`VectorIndex.hierarchical_predict` and saved with the index. IVF: ``nlist`` cells
    (default :func:`default_nlist`), trained on ``train_size`` sampled vectors (default ``40 nlist``),
    ``nprobe`` cells per query. HNSW: ``hnsw_m`` links, ``ef_construction``, ``ef_search``."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")
    x = as_2d_float(embeddings, "embeddings")
    kind = choose_kind(len(x)) if kind == "auto" else kind
    index = VectorIndex(x.shape[1], kind, normalize=normalize, class_table=class_table, nlist=nlist, nprobe=nprobe,
                        hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
    if kind == "ivf":
        index.train(x, train_size=train_size, seed=seed)
    index.add(x, labels, ids=ids)
    return index


def recall_vs_exact(index: VectorIndex, queries, k: int = 10) -> dict[str, float]:
    """How closely ``index`` finds the exact neighbours of ``queries``: :func:`vericar.neighbours.search_recall`
    against an exact search over the same live items (``recall_at_1``, ``recall_at_k``, ``top1_in_k``, ``k``,
    ``n_queries``)."""
    exact, exact_ids = index.exact()
    q = l2_normalize(as_2d_float(queries, "queries"))

    def exact_search(queries, k):
        d, rows = exact.search(queries, k)
        return d, exact_ids[rows]

    return search_recall(index.search, exact_search, q, min(int(k), len(index)))


def save_index(index: VectorIndex, path) -> Path:
    """:meth:`VectorIndex.save`."""
    return index.save(path)


def load_index(path) -> VectorIndex:
    """:meth:`VectorIndex.load`."""
    return VectorIndex.load(path)
