"""K-NN retrieval at scale: exact or approximate (faiss IVF / HNSW) indexes with stable ids, removal, persistence.

>>> index = build_index(embeddings, labels, kind="auto", class_table=cars.hierarchy)
>>> distances, ids = index.search(queries, k=5)
>>> index.predict(queries, k=5)                       # K-NN vote, like KNNIndex.predict
>>> index.hierarchical_predict(queries, k=5)          # make / type / model / year votes
>>> new_ids = index.add(more_embeddings, more_labels) # no rebuild
>>> index.remove(new_ids[:3])                         # no rebuild
>>> recall_vs_exact(index, queries, k=10)             # how much the approximation loses
>>> index.save("runs/x/index"); load_index("runs/x/index")

Kinds
-----
``"flat"``  exact: a :class:`vericar.retrieval.KNNIndex` (torch or faiss ``IndexFlatIP``, its ``backend``
            rule). Removal marks tombstones: a search over-fetches past them, and the index is compacted
            (the live rows copied into a fresh KNNIndex, O(n d)) once more than ``COMPACT_AFTER`` rows
            are dead.
``"ivf"``   ``faiss.IndexIVFFlat`` (inner product): k-means into ``nlist`` cells (default
            ``4 sqrt(n)``, capped at ``n / 39`` so that every centroid has its 39 training points),
            trained on a sample of ``40 nlist`` vectors; a query scans the ``nprobe`` nearest cells
            (default 16: more = slower and closer to exact). Added items go to their nearest cell (the
            centroids are not retrained: rebuild when the data drift far from the training sample);
            ``remove`` deletes them from the inverted lists (faiss ``remove_ids``).
``"hnsw"``  ``faiss.IndexHNSWFlat`` (inner product, ``M=32`` links, ``efConstruction=80``): a graph;
            queries explore ``ef_search`` candidates (default 64). Fastest queries, no training, but the
            slowest build and the most memory (vectors + ~``2 M`` links each), and faiss cannot delete from
            it: removed items are filtered out of every search (an ``IDSelector``) until :meth:`compact`.
``"auto"``  ``"flat"`` up to ``AUTO_FLAT_MAX`` items (exact search is fast enough there and needs no
            tuning), ``"ivf"`` above (see ``benchmarks/bench_index.py`` for the numbers behind this).

Geometry, labels and votes are those of :mod:`vericar.retrieval`: vectors are L2-normalised, ranked by
inner product, and distances are reported as the Euclidean distance between unit vectors
``sqrt(2 - 2 cos)``. Search results are *ids*: every item has a stable int64 id (``0, 1, 2, ...`` in the
order added unless given), kept through removals, compaction and save/load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .retrieval import KNNIndex, as_2d_float, vote_weights, hierarchical_predict, l2_normalize, vote

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
#: ``kind="auto"`` uses exact search up to this many items, IVF above.
AUTO_FLAT_MAX = 100_000
#: A flat index is compacted when more than this fraction of its rows are removed (tombstones).
COMPACT_AFTER = 0.2
FORMAT_VERSION = 1


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - faiss-cpu is a declared dependency
        raise ImportError("approximate indexes need faiss (pip install faiss-cpu)") from err
    return faiss


def choose_kind(n: int) -> str:
    """The kind ``"auto"`` picks for ``n`` items."""
    return "flat" if n <= AUTO_FLAT_MAX else "ivf"


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` items: ``4 sqrt(n)``, at most ``n / 39`` (faiss wants 39 training points per
    centroid), at least 1."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39)))


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
                 ef_search: int = 64, backend: str = "auto", device="cpu") -> None:
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS} (build_index resolves 'auto')")
        self.kind, self.dim, self.normalize = kind, int(dim), normalize
        self.class_table = None if class_table is None else class_table.reset_index(drop=True)
        self.params = {"nlist": nlist, "nprobe": int(nprobe), "hnsw_m": int(hnsw_m),
                       "ef_construction": int(ef_construction), "ef_search": int(ef_search), "backend": backend}
        self.device = device
        # one entry per position (= faiss id for ivf/hnsw, = KNNIndex row for flat)
        self._ids = np.zeros(0, dtype=np.int64)
        self._labels: np.ndarray = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._next_id = 0
        self._id_to_pos: pd.Index | None = None
        self._selector = None  # hnsw: the faiss IDSelector that skips removed items
        self._knn: KNNIndex | None = None
        self._faiss = None
        if kind == "flat":
            self._knn = KNNIndex(backend=backend, device=device, normalize=False)
        elif kind == "hnsw":
            faiss = _faiss()
            self._faiss = faiss.IndexHNSWFlat(self.dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            self._faiss.hnsw.efConstruction = int(ef_construction)
            self._faiss.hnsw.efSearch = int(ef_search)

    # -- properties ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live items (removed ones excluded)."""
        return int(self._alive.sum())

    def __repr__(self) -> str:
        extra = {"ivf": f", nlist={self.params['nlist']}, nprobe={self.nprobe}",
                 "hnsw": f", M={self.params['hnsw_m']}, ef_search={self.ef_search}"}.get(self.kind, "")
        return f"VectorIndex(kind={self.kind!r}, n={len(self)}, dim={self.dim}{extra})"

    @property
    def ids(self) -> np.ndarray:
        """Ids of the live items, in insertion order."""
        return self._ids[self._alive]

    @property
    def labels(self) -> np.ndarray:
        """Labels of the live items, aligned with :attr:`ids`."""
        return self._labels[self._alive]

    @property
    def nprobe(self) -> int:
        return self.params["nprobe"]

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.params["nprobe"] = int(value)
        if self.kind == "ivf" and self._faiss is not None:
            self._faiss.nprobe = int(value)

    @property
    def ef_search(self) -> int:
        return self.params["ef_search"]

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self.params["ef_search"] = int(value)
        if self.kind == "hnsw":
            self._faiss.hnsw.efSearch = int(value)

    @property
    def is_trained(self) -> bool:
        return self.kind != "ivf" or (self._faiss is not None and self._faiss.is_trained)

    def label_of(self, ids) -> np.ndarray:
        """Labels of (live or removed) ``ids``."""
        return self._labels[self._positions(ids)]

    # -- building --------------------------------------------------------------------------------

    def train(self, embeddings, *, train_size: int | None = None, seed: int = 0, niter: int = 10) -> "VectorIndex":
        """IVF only: k-means the cells on (a sample of ``train_size``, default ``40 nlist``) ``embeddings``."""
        if self.kind != "ivf":
            return self
        faiss = _faiss()
        x = self._prepare(embeddings, "embeddings")
        nlist = self.params["nlist"] or default_nlist(len(x))
        nlist = max(1, min(int(nlist), len(x)))
        self.params["nlist"] = nlist
        size = min(len(x), train_size or 40 * nlist)
        sample = x if size >= len(x) else x[np.random.default_rng(seed).choice(len(x), size, replace=False)]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = int(niter)
        index.cp.seed = int(seed)
        index.cp.min_points_per_centroid = 1  # we sized nlist ourselves: no warnings on small data
        index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct() and remove_ids() by id
        index.nprobe = self.nprobe
        self._quantizer, self._faiss = quantizer, index  # keep the quantizer alive with the index
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
            if len(self._ids) and np.isin(new_ids, self._ids).any():
                raise ValueError("some ids are already in the index (ids stay reserved after removal)")
        if not len(x):
            return new_ids
        if self.kind == "ivf" and not self.is_trained:
            self.train(x)
        start = len(self._ids)
        positions = np.arange(start, start + len(x), dtype=np.int64)
        if self.kind == "flat":
            self._knn.add(x, positions)  # the KNNIndex's labels are positions into our arrays
        elif self.kind == "ivf":
            self._faiss.add_with_ids(x, positions)
        else:
            self._faiss.add(x)  # sequential faiss ids == positions (HNSW never deletes)
        self._ids = np.concatenate([self._ids, new_ids])
        self._labels = lab.copy() if start == 0 else np.concatenate([self._labels, lab])
        self._alive = np.concatenate([self._alive, np.ones(len(x), dtype=bool)])
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._id_to_pos = None
        return new_ids

    def remove(self, ids) -> int:
        """Remove items by id (unknown or already removed ids are ignored); returns how many were removed."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        pos = self._positions(ids, missing_ok=True)
        pos = np.unique(pos[(pos >= 0)])
        pos = pos[self._alive[pos]]
        if not len(pos):
            return 0
        self._alive[pos] = False
        if self.kind == "ivf":
            self._faiss.remove_ids(pos.astype(np.int64))
        elif self.kind == "hnsw":
            self._update_selector()
        elif (~self._alive).sum() > COMPACT_AFTER * len(self._alive):
            self.compact()
        return int(len(pos))

    def compact(self) -> "VectorIndex":
        """Drop removed items for good (flat: copy the live rows; hnsw: rebuild the graph, slow on millions;
        ivf: nothing to do). Ids are kept."""
        if self.kind == "ivf" or self._alive.all():
            return self
        keep = np.flatnonzero(self._alive)
        vectors = self._reconstruct(keep)
        ids, labels = self._ids[keep], self._labels[keep]
        fresh = VectorIndex(self.dim, self.kind, normalize=False, class_table=self.class_table,
                            **{k: v for k, v in self.params.items()}, device=self.device)
        fresh.add(vectors, labels, ids=ids)
        fresh.normalize, fresh._next_id = self.normalize, self._next_id
        self.__dict__.update(fresh.__dict__)
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
        k = int(k)
        if self.kind == "flat":
            dist, pos = self._search_flat(q, k)
        else:
            params = None
            if self.kind == "hnsw" and self._selector is not None:
                faiss = _faiss()
                params = faiss.SearchParametersHNSW(sel=self._selector, efSearch=self.ef_search)
            # faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces .search with a version
            # without `params`; it keeps the original as .search_numpy
            search = getattr(self._faiss, "search_numpy", self._faiss.search)
            sim, pos = search(q, k, params=params) if params is not None else search(q, k)
            pos = pos.astype(np.int64)
            sim = np.where(pos >= 0, sim, 1.0)  # faiss pads missing places with -FLT_MAX
            dist = np.where(pos >= 0, np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sim)), np.inf).astype(np.float32)
        ids = np.where(pos >= 0, self._ids[np.maximum(pos, 0)], -1)
        return dist, ids

    def _search_flat(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dead = int((~self._alive).sum())
        kk = min(k + dead, len(self._knn))
        dist, pos = self._knn.search(q, kk)  # KNNIndex rows are our positions
        if dead:
            keep = self._alive[pos]
            order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # live ones first, in distance order
            dist, pos = np.take_along_axis(dist, order, 1), np.take_along_axis(pos, order, 1)
        return dist[:, :k], pos[:, :k]

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

    def exact(self, backend: str = "auto", device="cpu") -> tuple[KNNIndex, np.ndarray]:
        """An exact :class:`KNNIndex` over the live items (vectors read back from the index) and their ids
        (the KNNIndex's labels are row numbers into these ids)."""
        keep = np.flatnonzero(self._alive)
        return (KNNIndex(self._reconstruct(keep), np.arange(len(keep)), backend=backend, device=device,
                         normalize=False), self._ids[keep])

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the index to the folder ``path``: ``meta.json``, ``items.npz`` (ids, labels, alive),
        ``class_table.csv`` (if any) and the vectors (``index.faiss``, or ``flat.npz`` for a flat index)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.kind == "flat":
            self.compact()
            self._knn.save(path / "flat.npz")
        else:
            _faiss().write_index(self._faiss, str(path / "index.faiss"))
        labels = self._labels.astype(str) if self._labels.dtype == object else self._labels
        np.savez(path / "items.npz", ids=self._ids, labels=labels, alive=self._alive)
        if self.class_table is not None:
            self.class_table.to_csv(path / "class_table.csv", index=False)
        elif (path / "class_table.csv").exists():
            (path / "class_table.csv").unlink()
        meta = {"format": "vericar.index", "version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
                "normalize": self.normalize, "n": len(self), "next_id": self._next_id, "params": self.params}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path, *, device="cpu") -> "VectorIndex":
        """Load an index written by :meth:`save`."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a saved index (no meta.json); write one with save_index()")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "vericar.index" or meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} holds an index of an unknown format/version ({meta.get('format')}, "
                             f"{meta.get('version')}); this vericar reads version <= {FORMAT_VERSION}")
        table = pd.read_csv(path / "class_table.csv") if (path / "class_table.csv").is_file() else None
        index = cls(meta["dim"], meta["kind"], normalize=meta["normalize"], class_table=table, device=device,
                    **meta["params"])
        with np.load(path / "items.npz", allow_pickle=False) as f:
            index._ids, index._labels, index._alive = f["ids"], f["labels"], f["alive"]
        index._next_id = int(meta["next_id"])
        if index.kind == "flat":
            index._knn = KNNIndex.load(path / "flat.npz", backend=meta["params"].get("backend", "auto"), device=device)
        else:
            index._faiss = _faiss().read_index(str(path / "index.faiss"))
            if index.kind == "ivf":
                index._faiss.nprobe = index.nprobe
            else:
                index._faiss.hnsw.efSearch = index.ef_search
                index._update_selector()
        return index

    # -- internals -------------------------------------------------------------------------------

    def _prepare(self, x, name: str) -> np.ndarray:
        arr = as_2d_float(x, name)
        if arr.shape[1] != self.dim:
            raise ValueError(f"{name} have dim {arr.shape[1]}, the index has dim {self.dim}")
        if self.normalize:
            return l2_normalize(arr)
        if self.kind != "flat" and len(arr) and not np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-3):
            raise ValueError(f"{name} are not unit length, but a {self.kind} index ranks by inner product, which "
                             "gives distances only for unit vectors (every distance would read 0.0). Pass "
                             "normalize=True, L2-normalise them, or use kind='flat'.")
        return arr

    def _positions(self, ids, missing_ok: bool = False) -> np.ndarray:
        if self._id_to_pos is None:
            self._id_to_pos = pd.Index(self._ids)
        ids = np.asarray(ids, dtype=np.int64)
        pos = self._id_to_pos.get_indexer(ids.ravel()).reshape(ids.shape)
        if not missing_ok and (pos < 0).any():
            raise KeyError(f"unknown ids, e.g. {ids[pos < 0][:5].tolist()}")
        return pos

    def _update_selector(self) -> None:
        dead = np.flatnonzero(~self._alive).astype(np.int64)
        if not len(dead):
            self._selector = None
            return
        faiss = _faiss()
        self._batch_sel = faiss.IDSelectorBatch(dead)  # referenced so it outlives the Not selector
        self._selector = faiss.IDSelectorNot(self._batch_sel)

    def _reconstruct(self, positions: np.ndarray) -> np.ndarray:
        if self.kind == "flat":  # KNNIndex row == position (it only grows; compaction rebuilds it)
            return self._knn.embeddings[positions]
        if self.kind == "ivf":
            return self._faiss.reconstruct_batch(positions.astype(np.int64)) if len(positions) else \
                np.zeros((0, self.dim), np.float32)
        return self._faiss.reconstruct_n(0, self._faiss.ntotal)[positions]

    @staticmethod
    def _check_complete(ids: np.ndarray) -> None:
        if (ids < 0).any():
            raise ValueError(f"{int((ids < 0).any(axis=1).sum())} queries found fewer than k neighbours "
                             "(IVF: raise nprobe)")


def build_index(embeddings, labels, kind: str = "auto", *, ids=None, class_table: pd.DataFrame | None = None,
                normalize: bool = True, nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32,
                ef_construction: int = 80, ef_search: int = 64, train_size: int | None = None, seed: int = 0,
                backend: str = "auto", device="cpu") -> VectorIndex:
    """Build a :class:`VectorIndex` of ``kind`` (``"auto"``: :func:`choose_kind` by size) over ``embeddings``
    with ``labels`` (and ``ids``, default ``0..n-1``). ``class_table`` (e.g. ``CarsDataset.hierarchy``) is kept
    for :meth:`VectorIndex.hierarchical_predict` and saved with the index. IVF: ``nlist`` cells
    (default :func:`default_nlist`), trained on ``train_size`` sampled vectors (default ``40 nlist``),
    ``nprobe`` cells per query. HNSW: ``hnsw_m`` links, ``ef_construction``, ``ef_search``. Flat: the
    :class:`KNNIndex` ``backend`` and ``device``."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")
    x = as_2d_float(embeddings, "embeddings")
    kind = choose_kind(len(x)) if kind == "auto" else kind
    index = VectorIndex(x.shape[1], kind, normalize=normalize, class_table=class_table, nlist=nlist, nprobe=nprobe,
                        hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, backend=backend,
                        device=device)
    if kind == "ivf":
        index.train(x, train_size=train_size, seed=seed)
    index.add(x, labels, ids=ids)
    return index


def recall_vs_exact(index: VectorIndex, queries, k: int = 10, *, exact: KNNIndex | None = None,
                    exact_ids: np.ndarray | None = None) -> dict[str, float]:
    """How closely ``index`` finds the exact neighbours of ``queries`` (an exact search over the same live
    items; pass ``exact`` (a KNNIndex whose labels are row numbers) and ``exact_ids`` to reuse one).

    Returns ``recall_at_1`` (the approximate top-1 is the exact top-1, or an item exactly as near),
    ``recall_at_k`` (mean fraction of the exact top-``k`` ids found in the approximate top-``k``),
    ``top1_in_k`` (the exact nearest is among the approximate top-``k``), ``k``, ``n_queries``.
    """
    if exact is None:
        exact, exact_ids = index.exact()
    elif exact_ids is None:
        raise ValueError("pass exact_ids (the id of each row of `exact`) with exact")
    k = min(int(k), len(index))
    d_true, rows = exact.search(queries, k)
    true_ids = np.asarray(exact_ids)[rows]
    d_approx, approx_ids = index.search(queries, k)
    # top-1: the same item, or a tie (duplicates / equal distance within float rounding)
    r1 = (approx_ids[:, 0] == true_ids[:, 0]) | (np.abs(d_approx[:, 0] - d_true[:, 0]) <= 1e-5)
    hits = np.array([len(np.intersect1d(a, t)) for a, t in zip(approx_ids, true_ids)]) if len(true_ids) else np.zeros(0)
    return {"recall_at_1": float(r1.mean()), "recall_at_k": float((hits / k).mean()),
            "top1_in_k": float((approx_ids == true_ids[:, :1]).any(axis=1).mean()), "k": k,
            "n_queries": int(len(true_ids))}


def save_index(index: VectorIndex, path) -> Path:
    """:meth:`VectorIndex.save`."""
    return index.save(path)


def load_index(path, *, device="cpu") -> VectorIndex:
    """:meth:`VectorIndex.load`."""
    return VectorIndex.load(path, device=device)
