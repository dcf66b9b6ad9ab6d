"""Benchmark: exact vs approximate K-NN indexes (vericar.index) at 10k, 100k and 1M database items.

    python benchmarks/bench_index.py                          # 10k, 100k, 1M (1M x 256 float32 = 1 GB)
    python benchmarks/bench_index.py --sizes 10000 100000     # leave out the million
    python benchmarks/bench_index.py --quick                  # small sizes, a smoke test

Data (``--data``), 1,000 queries from the same distribution as the database, none in it:

* ``latent`` (default): clustered with a low intrinsic dimension, like trained embeddings: points around
  196 class centres in a 32-d latent space (within-class spread 0.5 of the centres' scale), mapped to
  256-d by a fixed random linear map, plus isotropic noise of 10% of the signal, L2-normalised.
* ``isotropic``: the generator of bench_retrieval.py (196 centres, isotropic 256-d noise three times the
  centres' norm): nearly uniform on the sphere, the worst case for approximate search (every neighbour is
  almost as far as any other), kept to show it.

Contenders, all on the CPU:

* ``exact torch``  -- :class:`vericar.retrieval.KNNIndex` ``backend="torch"`` (the reference),
* ``faiss flat``   -- ``KNNIndex(backend="faiss")`` (``IndexFlatL2`` on unit vectors: exact too),
* ``faiss IVF``    -- ``build_index(kind="ivf")``: ``nlist = 4 sqrt(n)``, trained on ``40 nlist`` vectors,
  searched with ``nprobe`` 16 and 64 (``--nprobe``),
* ``faiss HNSW``   -- ``build_index(kind="hnsw")``: ``M = 32``, ``efConstruction = 80``, ``ef_search`` 64.

For each: build time (training included), queries/s at k = 10 (best of ``--repeats``), and recall against
exact torch: ``recall@1`` (the top-1 is exact torch's top-1, or as near) and ``recall@10`` (the share of
exact torch's top-10 found). Queries/s are printed as ratios to exact torch at the same size. Writes
``benchmarks/results/bench_index.json`` (``bench_index_quick.json`` with ``--quick``) with machine information,
including the load average: the machine is shared, timings are noisy when it is high.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_retrieval import best_time, clustered_unit, machine_info  # noqa: E402

from vericar.index import build_index, recall_vs_exact  # noqa: E402
from vericar.retrieval import KNNIndex  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
K = 10


LATENT_DIM = 32


def latent_clustered(rng: np.random.Generator, n: int, centres: np.ndarray, lift: np.ndarray,
                     spread: float = 0.5, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Clustered points of intrinsic dimension ``centres.shape[1]`` lifted to ``lift.shape[1]`` dims."""
    lab = rng.integers(0, len(centres), n)
    out = np.empty((n, lift.shape[1]), dtype=np.float32)
    for s in range(0, n, 100_000):  # in chunks: 1M x 256 float32 is 1 GB already
        z = centres[lab[s:s + 100_000]] + spread * rng.standard_normal((len(lab[s:s + 100_000]), centres.shape[1]),
                                                                        dtype=np.float32)
        x = z @ lift
        x += noise * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(lift.shape[1]) * \
            rng.standard_normal(x.shape, dtype=np.float32)
        out[s:s + 100_000] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, lab


def _recall(approx_ids: np.ndarray, approx_d: np.ndarray, true_ids: np.ndarray, true_d: np.ndarray) -> dict:
    r1 = (approx_ids[:, 0] == true_ids[:, 0]) | (np.abs(approx_d[:, 0] - true_d[:, 0]) <= 1e-5)
    hits = [len(np.intersect1d(a, t)) for a, t in zip(approx_ids, true_ids)]
    return {"recall_at_1": float(r1.mean()), "recall_at_10": float(np.mean(hits) / true_ids.shape[1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="database sizes (default 10k 100k 1M)")
    ap.add_argument("--queries", type=int, default=None, help="number of queries (default 1000; quick 200)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[16, 64], help="IVF cells scanned per query")
    ap.add_argument("--ef-search", type=int, default=64, help="HNSW candidates per query")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timed searches")
    ap.add_argument("--data", choices=["latent", "isotropic"], default="latent", help="database distribution")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = ap.parse_args(argv)

    dim = 256
    sizes = args.sizes or ([2_000, 10_000] if args.quick else [10_000, 100_000, 1_000_000])
    n_queries = args.queries or (200 if args.quick else 1_000)
    repeats = 1 if args.quick else args.repeats
    suffix = "" if args.data == "latent" else f"_{args.data}"
    out_path = args.out or RESULTS / (f"bench_index{suffix}_quick.json" if args.quick else f"bench_index{suffix}.json")

    rng = np.random.default_rng(0)
    if args.data == "latent":
        centres = rng.standard_normal((196, LATENT_DIM), dtype=np.float32)
        lift = rng.standard_normal((LATENT_DIM, dim), dtype=np.float32) / np.sqrt(LATENT_DIM)

        def sample(n: int):
            return latent_clustered(rng, n, centres, lift)
    else:
        centres = rng.standard_normal((196, dim), dtype=np.float32) / np.sqrt(dim) * 3

        def sample(n: int):
            return clustered_unit(rng, n, centres)
    queries, _ = sample(n_queries)
    info = machine_info()
    print(f"machine: {info['cpu_count']} CPUs, torch threads {info['torch_threads']}, faiss threads "
          f"{info.get('faiss_omp_threads')}, load average {info['load_average_1_5_15min_at_start']}")
    print(f"{n_queries} queries, dim {dim}, k = {K}; sizes {sizes}\n", flush=True)

    rows = []
    for n_db in sizes:
        db, lab = sample(n_db)

        def record(method: str, build_s: float, search_s: float, recall: dict, **extra) -> None:
            row = {"db_size": n_db, "method": method, "build_s": build_s, "search_s": search_s,
                   "queries_per_s": n_queries / search_s, **recall, **extra}
            rows.append(row)
            print(f"  {n_db:>9,}  {method:<22} build {build_s:8.2f} s  {row['queries_per_s']:>9,.0f} q/s  "
                  f"recall@1 {recall['recall_at_1']:.3f}  recall@10 {recall['recall_at_10']:.3f}", flush=True)

        # exact torch: the reference
        t0 = time.perf_counter()
        exact = KNNIndex(db, np.arange(n_db), backend="torch")
        exact.search(queries[:1], 1)
        build = time.perf_counter() - t0
        t, (true_d, true_ids) = best_time(lambda: exact.search(queries, K), repeats)
        record("exact torch", build, t, {"recall_at_1": 1.0, "recall_at_10": 1.0})
        del exact
        gc.collect()

        t0 = time.perf_counter()
        flat = KNNIndex(db, np.arange(n_db), backend="faiss")
        flat.search(queries[:1], 1)
        build = time.perf_counter() - t0
        t, (d, ids) = best_time(lambda: flat.search(queries, K), repeats)
        record("faiss flat", build, t, _recall(ids, d, true_ids, true_d))
        del flat
        gc.collect()

        t0 = time.perf_counter()
        ivf = build_index(db, lab, "ivf")
        build = time.perf_counter() - t0
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            t, (d, ids) = best_time(lambda: ivf.search(queries, K), repeats)
            record(f"faiss IVF nprobe={nprobe}", build, t, _recall(ids, d, true_ids, true_d),
                   nlist=ivf.params["nlist"], nprobe=nprobe)
        if n_db == sizes[0]:  # the library's own recall function agrees with this script's
            ivf.nprobe = args.nprobe[0]
            check = recall_vs_exact(ivf, queries, k=K)
            mine = rows[-len(args.nprobe)]
            rows[-len(args.nprobe)]["recall_vs_exact_function"] = check
            if abs(check["recall_at_1"] - mine["recall_at_1"]) > 0.01:
                print(f"  note: vericar.index.recall_vs_exact gives {check}", flush=True)
        del ivf
        gc.collect()

        t0 = time.perf_counter()
        hnsw = build_index(db, lab, "hnsw", ef_search=args.ef_search)
        build = time.perf_counter() - t0
        t, (d, ids) = best_time(lambda: hnsw.search(queries, K), repeats)
        record(f"faiss HNSW ef={args.ef_search}", build, t, _recall(ids, d, true_ids, true_d),
               hnsw_m=32, ef_search=args.ef_search)
        del hnsw, db, lab
        gc.collect()

    for r in rows:
        base = next(b for b in rows if b["db_size"] == r["db_size"] and b["method"] == "exact torch")
        r["speed_vs_exact_torch"] = r["queries_per_s"] / base["queries_per_s"]

    header = (f"{'db size':>9}  {'method':<22} {'build s':>8}  {'queries/s':>10}  {'x exact torch':>13}  "
              f"{'recall@1':>8}  {'recall@10':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['db_size']:>9,}  {r['method']:<22} {r['build_s']:>8.2f}  {r['queries_per_s']:>10,.0f}  "
              f"{r['speed_vs_exact_torch']:>12.2f}x  {r['recall_at_1']:>8.3f}  {r['recall_at_10']:>9.3f}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "bench_index", "data": args.data, "quick": args.quick, "n_queries": n_queries, "dim": dim, "k": K,
               "sizes": sizes, "n_clusters": len(centres), "repeats": repeats, "machine": info,
               "load_average_1_5_15min_at_end": list(os.getloadavg()),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": rows}
    out_path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
