"""Benchmark: K-NN retrieval throughput of vericar.retrieval.KNNIndex vs a per-query numpy loop.

    python benchmarks/bench_retrieval.py            # 1,000 queries vs 10k and 100k database items
    python benchmarks/bench_retrieval.py --quick    # small sizes, a smoke test

Data: 256-d unit vectors drawn around 196 random cluster centres (like class-clustered embeddings).
Contenders (all exact, all on CPU):

* ``numpy loop`` -- the seed re-implementation's way: for each query, ``np.linalg.norm(db - q, axis=1)``,
  ``np.argsort``, take the top-1.  It is slow, so it is timed on a subset of the queries and its
  throughput extrapolated to all of them (the table says on how many).
* ``KNNIndex torch`` / ``KNNIndex faiss`` -- ``KNNIndex(...).search(queries, k)`` with k = 1 and k = 10
  (index built beforehand; the build is timed separately).  Best of ``--repeats`` runs.

Prints a table (queries/s and speed-up over the numpy loop) and writes
``benchmarks/results/bench_retrieval.json`` (``bench_retrieval_quick.json`` with ``--quick``) with
machine information.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vericar.retrieval import KNNIndex  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def clustered_unit(rng: np.random.Generator, n: int, centres: np.ndarray, noise: float = 0.6) -> np.ndarray:
    lab = rng.integers(0, len(centres), n)
    x = centres[lab] + noise * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), lab


def numpy_loop_top1(queries: np.ndarray, db: np.ndarray) -> np.ndarray:
    """The per-query loop of the seed re-implementation."""
    out = np.empty(len(queries), dtype=np.int64)
    for i, q in enumerate(queries):
        d = np.linalg.norm(db - q, axis=1)
        out[i] = np.argsort(d)[0]
    return out


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        # other processes compete for the CPUs when this is high (>= cpu_count): timings are then noisy
        "load_average_1_5_15min_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    except ImportError:  # pragma: no cover
        info["faiss"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs (library backends)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = ap.parse_args(argv)

    if args.quick:
        n_queries, db_sizes, dim = 200, [2_000, 5_000], 64
        loop_queries = {2_000: 50, 5_000: 20}
    else:
        n_queries, db_sizes, dim = 1_000, [10_000, 100_000], 256
        loop_queries = {10_000: 200, 100_000: 30}
    repeats = 1 if args.quick else args.repeats
    out_path = args.out or RESULTS / ("bench_retrieval_quick.json" if args.quick else "bench_retrieval.json")

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((196, dim), dtype=np.float32) / np.sqrt(dim) * 3
    queries, _ = clustered_unit(rng, n_queries, centres)
    info = machine_info()
    print(f"machine: {info['cpu_count']} CPUs, torch threads {info['torch_threads']}, "
          f"faiss threads {info.get('faiss_omp_threads')}, torch {info['torch']}, faiss {info.get('faiss')}, "
          f"load average {info['load_average_1_5_15min_at_start']}")
    print(f"{n_queries} queries, dim {dim}\n")

    rows = []
    for n_db in db_sizes:
        db, lab = clustered_unit(rng, n_db, centres)

        n_loop = min(loop_queries[n_db], n_queries)
        t_loop, top1_loop = best_time(lambda: numpy_loop_top1(queries[:n_loop], db), 1)
        qps_loop = n_loop / t_loop
        rows.append({"db_size": n_db, "method": "numpy loop", "k": 1, "queries_timed": n_loop,
                     "extrapolated": n_loop < n_queries, "seconds": t_loop * n_queries / n_loop,
                     "queries_per_s": qps_loop})

        for backend in ("torch", "faiss"):
            t0 = time.perf_counter()
            index = KNNIndex(db, lab, backend=backend)
            index.search(queries[:1], 1)  # builds the torch tensor / faiss index
            t_build = time.perf_counter() - t0
            for k in (1, 10):
                t, (dist, idx) = best_time(lambda: index.search(queries, k), repeats)
                agree = float(np.mean(idx[:n_loop, 0] == top1_loop))
                rows.append({"db_size": n_db, "method": f"KNNIndex {backend}", "k": k,
                             "queries_timed": n_queries, "extrapolated": False, "seconds": t,
                             "queries_per_s": n_queries / t, "build_s": t_build,
                             "top1_agrees_with_numpy_loop": agree})

    for r in rows:
        base = next(b for b in rows if b["db_size"] == r["db_size"] and b["method"] == "numpy loop")
        r["speedup_vs_numpy_loop"] = r["queries_per_s"] / base["queries_per_s"]

    header = f"{'db size':>8}  {'method':<16} {'k':>3}  {'queries/s':>11}  {'x numpy loop':>12}  {'time for all':>12}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        note = (f"timed on {r['queries_timed']} queries, extrapolated" if r["extrapolated"]
                else f"top-1 = numpy loop's on {r.get('top1_agrees_with_numpy_loop', 1.0):.0%}"
                if "top1_agrees_with_numpy_loop" in r else "")
        print(f"{r['db_size']:>8}  {r['method']:<16} {r['k']:>3}  {r['queries_per_s']:>11,.0f}  "
              f"{r['speedup_vs_numpy_loop']:>11,.0f}x  {r['seconds']:>11.3f}s  {note}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "bench_retrieval", "quick": args.quick, "n_queries": n_queries, "dim": dim,
               "n_clusters": len(centres), "repeats": repeats, "machine": info,
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": rows}
    out_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
