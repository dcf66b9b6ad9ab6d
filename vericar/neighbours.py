"""The neighbour layer: every K-NN search of vericar goes through this module.

Exact search -- :class:`ExactSearch`, :func:`knn_search`
    Euclidean K-NN over a database of vectors (rows ``0..n-1``), exact, with one of two backends:
    ``"torch"`` (``2 q.x - |x|^2`` then ``topk``, in query chunks, on ``device``, CPU or CUDA) or
    ``"faiss"`` (``faiss.IndexFlatL2`` on CPU, built lazily and extended on ``add``).  ``"auto"`` picks
    faiss when the database holds more than :data:`FAISS_AUTO_THRESHOLD` (200,000) items, the device is
    the CPU and faiss is importable; torch otherwise.  Both were within 2x of each other at 10k-100k
    items on a busy 2-core CPU, torch a little ahead at 10k and faiss at 100k
    (``benchmarks/bench_retrieval.py``); above 200k the torch chunks shrink (one chunk's similarity
    matrix is capped at 2**26 elements) while faiss streams the database with a bounded heap.
    The distances of the selected neighbours are then recomputed directly as ``||q - x||`` (no
    ``|q|^2 + |x|^2 - 2 q.x`` cancellation, so exact duplicates are at distance exactly 0) and each row
    is sorted ascending by them.  Both backends return the same neighbours up to ties.
    Callers that want cosine geometry (KNN+, retrieval) L2-normalise first: on unit vectors the
    Euclidean ranking is the cosine ranking and ``||q - x|| = sqrt(2 - 2 cos)``.

Approximate search -- :class:`FaissIndex`
    A faiss index over unit vectors with stable int64 ids: ``"flat"`` (exact, ``IndexFlatIP``),
    ``"ivf"`` (``IndexIVFFlat``) or ``"hnsw"`` (``IndexHNSWFlat``).  faiss keeps the ids
    (``IndexIDMap2`` around flat and HNSW; IVF stores ids itself), removes items (HNSW cannot: removed ids
    are filtered out of its searches by an ``IDSelector``) and reads vectors back by id.
    :func:`search_recall` measures how much an approximate index loses against :class:`ExactSearch`.

pytorch-metric-learning -- :class:`KNNFunc`
    The ``knn_func`` handed to pml's ``AccuracyCalculator``: the same exact search, keeping the last
    neighbour lists it returned.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "FAISS_AUTO_THRESHOLD",
    "ExactSearch",
    "FaissIndex",
    "KNNFunc",
    "as_2d_float",
    "default_nlist",
    "faiss_or_none",
    "knn_search",
    "l2_normalize",
    "search_recall",
    "resolve_backend",
]

#: Database size above which ``backend="auto"`` runs an exact search with faiss (on a CPU device).
FAISS_AUTO_THRESHOLD = 200_000

# Upper bound on the elements of one (query chunk x database) similarity matrix (float32: 256 MiB).
_SIM_ELEMENTS = 1 << 26
# Upper bound on the elements of the (rows, k, dim) gather used to recompute neighbour distances.
_GATHER_ELEMENTS = 1 << 24


def faiss_or_none():
    """The faiss module, or None where it is not installed."""
    try:
        import faiss  # noqa: PLC0415
    except ImportError:  # pragma: no cover - faiss-cpu is a declared dependency
        return None
    return faiss


def _faiss():
    faiss = faiss_or_none()
    if faiss is None:  # pragma: no cover
        raise ImportError("this search needs faiss (pip install faiss-cpu)")
    return faiss


def as_2d_float(a, name: str, dtype=np.float32) -> np.ndarray:
    """``a`` (numpy or torch) as a contiguous (n, dim) array of ``dtype``; refuses other shapes, NaN and inf."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(a, dtype=dtype))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (float32 unless ``x`` is float64); all-zero rows stay zero."""
    x = np.asarray(x)
    x = x if x.dtype == np.float64 else x.astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=x.dtype)


def resolve_backend(backend: str, n: int, device="cpu") -> str:
    """The exact-search backend used for a database of ``n`` items (``"auto"`` resolved, see the module doc)."""
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'faiss'")
    if backend != "auto":
        return backend
    if n > FAISS_AUTO_THRESHOLD and torch.device(device).type == "cpu" and faiss_or_none() is not None:
        return "faiss"
    return "torch"


def neighbour_distances(queries: np.ndarray, vectors_of) -> np.ndarray:
    """``||q_i - x_ij||`` for the (n, k) neighbours of each query, computed directly (no cancellation).

    ``vectors_of(s, e)`` returns the (e - s, k, dim) neighbour vectors of queries ``s..e-1``.
    """
    n, dim = queries.shape
    if n == 0:
        return np.zeros((0, 0), dtype=queries.dtype)
    first = vectors_of(0, min(n, 1))
    k = first.shape[1]
    out = np.empty((n, k), dtype=queries.dtype)
    rows = max(1, _GATHER_ELEMENTS // max(1, k * dim))
    for s in range(0, n, rows):
        diff = vectors_of(s, min(n, s + rows)) - queries[s : s + rows, None, :]
        out[s : s + rows] = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
    return out


# ----------------------------------------------------------------------------------------------------
# Exact search
# ----------------------------------------------------------------------------------------------------


class ExactSearch:
    """Exact Euclidean K-NN over a growing database (rows ``0..n-1``); see the module docstring.

    ``dtype`` is the precision of the database, the queries and the distances (``torch.float32`` or
    ``torch.float64``; the faiss backend searches in float32 and recomputes the distances in ``dtype``).
    """

    def __init__(self, database=None, *, backend: str = "auto", device="cpu", dtype=torch.float32) -> None:
        resolve_backend(backend, 0)  # validates the name
        if backend == "faiss" and faiss_or_none() is None:  # pragma: no cover
            raise ImportError("backend='faiss' needs faiss (pip install faiss-cpu)")
        self.backend = backend
        self.device = torch.device(device)
        self.dtype = dtype
        self._np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.database = np.zeros((0, 0), dtype=self._np_dtype)
        self._torch_db: torch.Tensor | None = None
        self._torch_sq: torch.Tensor | None = None
        self._faiss_index = None
        if database is not None:
            self.add(database)

    def __len__(self) -> int:
        return int(self.database.shape[0])

    @property
    def dim(self) -> int | None:
        """Vector dimension (None while empty)."""
        return None if len(self) == 0 else int(self.database.shape[1])

    @property
    def resolved_backend(self) -> str:
        """The backend a search runs with now (``"auto"`` resolved for the current size)."""
        return resolve_backend(self.backend, len(self), self.device)

    def add(self, vectors) -> "ExactSearch":
        """Append vectors (rows ``len(self)..``); returns ``self``."""
        x = as_2d_float(vectors, "embeddings", self._np_dtype)
        if len(self) and x.shape[1] != self.dim:
            raise ValueError(f"embedding dim {x.shape[1]} does not match the index dim {self.dim}")
        self.database = x.copy() if len(self) == 0 else np.concatenate([self.database, x])
        if self._torch_db is not None:
            t = torch.from_numpy(x).to(self.device)
            self._torch_db = torch.cat([self._torch_db, t])
            self._torch_sq = torch.cat([self._torch_sq, (t * t).sum(dim=1)])
        if self._faiss_index is not None:
            self._faiss_index.add(x.astype(np.float32))
        return self

    def search(self, queries, k: int, *, exclude_self: bool = False,
               chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query: ``(distances (N, k) ascending, rows (N, k) int64)``.

        ``exclude_self`` is leave-one-out: the queries ARE the database, in the same order, and query ``i``
        must not retrieve row ``i`` (only index ``i`` is removed: exact duplicates of it stay eligible).
        ``chunk_size`` caps the queries per torch matmul (further capped at 2**26 similarity elements).
        """
        q = as_2d_float(queries, "queries", self._np_dtype)
        n, k = len(self), int(k)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if n == 0:
            raise ValueError("the database is empty; add() vectors first")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]} but the database has dim {self.dim}")
        if exclude_self and len(q) != n:
            raise ValueError(f"exclude_self=True needs the queries to be the database ({n} rows), got {len(q)}")
        available = n - 1 if exclude_self else n
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > available:
            raise ValueError(f"k={k} is larger than the number of candidate neighbours ({available}: database "
                             f"size {n}{', minus the query itself (exclude_self=True)' if exclude_self else ''})")
        if len(q) == 0:
            return np.zeros((0, k), dtype=self._np_dtype), np.zeros((0, k), dtype=np.int64)
        if self.resolved_backend == "faiss":
            idx = self._search_faiss(q, k, exclude_self)
        else:
            idx = self._search_torch(q, k, exclude_self, int(chunk_size))
        dist = neighbour_distances(q, lambda s, e: self.database[idx[s:e]])
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)

    def _search_torch(self, q: np.ndarray, k: int, exclude_self: bool, chunk_size: int) -> np.ndarray:
        if self._torch_db is None:
            self._torch_db = torch.from_numpy(self.database).to(self.device)
            self._torch_sq = (self._torch_db * self._torch_db).sum(dim=1)
        db, sq, n = self._torch_db, self._torch_sq, len(self)
        rows = max(1, min(chunk_size, _SIM_ELEMENTS // n))
        out = np.empty((len(q), k), dtype=np.int64)
        with torch.no_grad():
            for s in range(0, len(q), rows):
                qc = torch.from_numpy(q[s : s + rows]).to(self.device)
                key = 2.0 * (qc @ db.T) - sq  # larger = closer: ||q - x||^2 = |q|^2 - key
                if exclude_self:
                    r = torch.arange(len(qc), device=self.device)
                    key[r, r + s] = -math.inf
                out[s : s + rows] = key.topk(k, dim=1, largest=True, sorted=True).indices.cpu().numpy()
        return out

    def _search_faiss(self, q: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
        if self._faiss_index is None:
            self._faiss_index = _faiss().IndexFlatL2(self.dim)
            self._faiss_index.add(self.database.astype(np.float32))
        search = getattr(self._faiss_index, "search_numpy", self._faiss_index.search)
        q32 = q.astype(np.float32)
        if not exclude_self:
            return search(q32, k)[1].astype(np.int64)
        # Ask for one more and drop the query's own row wherever it is (with duplicates it need not be at
        # rank 0); rows where it is not among the k+1 drop their last neighbour.
        idx = search(q32, k + 1)[1].astype(np.int64)
        is_self = idx == np.arange(len(q))[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        return idx[~is_self].reshape(len(q), k)


def knn_search(queries, database, k: int, *, exclude_self: bool = False, backend: str = "auto", device="cpu",
               dtype=torch.float32, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """One exact search of ``queries`` against ``database``: :meth:`ExactSearch.search` of a fresh index."""
    index = ExactSearch(backend=backend, device=device, dtype=dtype)
    db = as_2d_float(database, "database", index._np_dtype)
    if len(db) == 0:
        raise ValueError("database is empty")
    return index.add(db).search(queries, k, exclude_self=exclude_self, chunk_size=chunk_size)


class KNNFunc:
    """A pytorch-metric-learning ``knn_func`` (``f(query, k, reference, ref_includes_query)``) on
    :class:`ExactSearch`, keeping the last ``(distances, indices)`` it returned (Euclidean distances).

    ``ref_includes_query`` (pml's leave-one-out) needs the reference to be the queries themselves.
    """

    def __init__(self, backend: str = "auto", device="cpu") -> None:
        resolve_backend(backend, 0)
        self.backend, self.device = backend, device
        self.distances: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def __call__(self, query, k, reference, ref_includes_query=False):
        d, i = knn_search(query, reference, int(k), exclude_self=bool(ref_includes_query), backend=self.backend,
                          device=self.device)
        device = query.device if isinstance(query, torch.Tensor) else "cpu"
        self.distances, self.indices = torch.from_numpy(d).to(device), torch.from_numpy(i).to(device)
        return self.distances, self.indices


# ----------------------------------------------------------------------------------------------------
# Approximate search (faiss indexes with ids)
# ----------------------------------------------------------------------------------------------------


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` items: ``4 sqrt(n)``, at most ``n / 39`` (faiss wants 39 training points per
    centroid), at least 1."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39)))


class FaissIndex:
    """A faiss index of ``kind`` ``"flat"``, ``"ivf"`` or ``"hnsw"`` over unit vectors, with int64 ids kept by
    faiss (see the module docstring).  IVF must be :meth:`train`-ed before :meth:`add` (or is trained on
    the first batch added).  ``nprobe`` (IVF cells per query) and ``ef_search`` (HNSW candidates) are
    settable."""

    def __init__(self, dim: int, kind: str = "flat", *, nlist: int | None = None, nprobe: int = 16,
                 hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 64) -> None:
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index kind {kind!r}; expected 'flat', 'ivf' or 'hnsw'")
        faiss = _faiss()
        self.kind, self.dim = kind, int(dim)
        self.params = {"nlist": nlist, "nprobe": int(nprobe), "hnsw_m": int(hnsw_m),
                       "ef_construction": int(ef_construction), "ef_search": int(ef_search)}
        self.removed = np.zeros(0, dtype=np.int64)  # hnsw: ids filtered out of searches until compact()
        self._selector = None
        self.index = None  # ivf: built by train()
        if kind == "flat":
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        elif kind == "hnsw":
            graph = faiss.IndexHNSWFlat(self.dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = int(ef_construction)
            graph.hnsw.efSearch = int(ef_search)
            self.index = faiss.IndexIDMap2(graph)

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal) - len(self.removed)

    @property
    def nprobe(self) -> int:
        return self.params["nprobe"]

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.params["nprobe"] = int(value)
        if self.kind == "ivf" and self.index is not None:
            self.index.nprobe = int(value)

    @property
    def ef_search(self) -> int:
        return self.params["ef_search"]

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self.params["ef_search"] = int(value)
        if self.kind == "hnsw":
            _faiss().downcast_index(self.index.index).hnsw.efSearch = int(value)

    @property
    def is_trained(self) -> bool:
        return self.index is not None and self.index.is_trained

    def train(self, vectors: np.ndarray, *, train_size: int | None = None, seed: int = 0,
              niter: int = 10) -> "FaissIndex":
        """IVF only: k-means the cells on (a sample of ``train_size``, default ``40 nlist``) ``vectors``."""
        if self.kind != "ivf":
            return self
        faiss = _faiss()
        nlist = max(1, min(int(self.params["nlist"] or default_nlist(len(vectors))), len(vectors)))
        self.params["nlist"] = nlist
        size = min(len(vectors), train_size or 40 * nlist)
        sample = vectors if size >= len(vectors) else \
            vectors[np.random.default_rng(seed).choice(len(vectors), size, replace=False)]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter, index.cp.seed = int(niter), int(seed)
        index.cp.min_points_per_centroid = 1  # we sized nlist ourselves: no warnings on small data
        index.train(sample)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct() and remove_ids() by id
        index.nprobe = self.nprobe
        self._quantizer, self.index = quantizer, index  # keep the quantizer alive with the index
        return self

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add unit vectors with their (new) int64 ids."""
        if self.kind == "ivf" and not self.is_trained:
            self.train(vectors)
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        """Remove items by id (the ids must be present)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind != "hnsw":
            self.index.remove_ids(ids)
            return
        faiss = _faiss()  # faiss cannot delete from an HNSW graph: filter the ids out of every search
        self.removed = np.union1d(self.removed, ids)
        self._batch_sel = faiss.IDSelectorBatch(self.removed)  # referenced so it outlives the Not selector
        self._selector = faiss.IDSelectorNot(self._batch_sel)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (float32, shape ``ids.shape + (dim,)``)."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        out = self.index.reconstruct_batch(flat) if len(flat) else np.zeros((0, self.dim), np.float32)
        return out.reshape(ids.shape + (self.dim,))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances (N, k) ascending, ids (N, k))`` of unit ``queries``; missing places: id -1, distance inf."""
        faiss = _faiss()
        params = None
        if self._selector is not None:
            params = faiss.SearchParametersHNSW(sel=self._selector, efSearch=self.ef_search)
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces .search with a version
        # without `params`; it keeps the original as .search_numpy
        search = getattr(self.index, "search_numpy", self.index.search)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        _, ids = search(q, int(k), params=params) if params is not None else search(q, int(k))
        ids = ids.astype(np.int64)
        found = ids >= 0

        def vectors_of(s: int, e: int) -> np.ndarray:
            vec = np.zeros(ids[s:e].shape + (self.dim,), dtype=np.float32)
            vec[found[s:e]] = self.vectors(ids[s:e][found[s:e]])
            return vec

        dist = neighbour_distances(q, vectors_of) if len(q) else np.zeros((0, int(k)), np.float32)
        dist = np.where(found, dist, np.inf).astype(np.float32)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)

    def write(self, path) -> None:
        _faiss().write_index(self.index, str(path))

    @classmethod
    def read(cls, path, kind: str, dim: int, params: dict, removed) -> "FaissIndex":
        """An index written by :meth:`write`, with its constructor ``params`` and removed ids."""
        out = cls(dim, kind, **params)
        out.index = _faiss().read_index(str(path))
        out.nprobe, out.ef_search = out.nprobe, out.ef_search  # pushed into the faiss index
        if len(removed):
            out.remove(removed)
        return out


def search_recall(approx_search, exact_search, queries, k: int = 10) -> dict[str, float]:
    """How closely ``approx_search`` finds the exact neighbours of ``queries``.

    Both are ``f(queries, k) -> (distances, ids)`` over the same items with the same ids.  Returns
    ``recall_at_1`` (the approximate top-1 is the exact top-1, or an item exactly as near),
    ``recall_at_k`` (mean fraction of the exact top-``k`` ids found in the approximate top-``k``),
    ``top1_in_k`` (the exact nearest is among the approximate top-``k``), ``k``, ``n_queries``.
    """
    d_true, true_ids = exact_search(queries, k)
    d_approx, approx_ids = approx_search(queries, k)
    # top-1: the same item, or a tie (duplicates / equal distance within float rounding)
    r1 = (approx_ids[:, 0] == true_ids[:, 0]) | (np.abs(d_approx[:, 0] - d_true[:, 0]) <= 1e-5)
    hits = np.array([len(np.intersect1d(a, t)) for a, t in zip(approx_ids, true_ids)]) if len(true_ids) \
        else np.zeros(0)
    return {"recall_at_1": float(r1.mean()), "recall_at_k": float((hits / k).mean()),
            "top1_in_k": float((approx_ids == true_ids[:, :1]).any(axis=1).mean()), "k": int(k),
            "n_queries": int(len(true_ids))}
