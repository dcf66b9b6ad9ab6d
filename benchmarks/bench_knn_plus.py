"""Benchmark: KNN+ out-of-distribution scores against a large database, exact and through faiss indexes.

    python benchmarks/bench_knn_plus.py                    # 100k and 1M database items
    python benchmarks/bench_knn_plus.py --sizes 100000     # leave out the million
    python benchmarks/bench_knn_plus.py --quick            # small sizes, a smoke test

Data as bench_index.py's ``latent`` set (196 clusters of intrinsic dimension 32 lifted to 256-d, unit norm).
Queries: 500 known (from the database's clusters) and 500 unknown (from 40 clusters near known ones). Scores: KNN+ with
k = 10, minus the distance to the 10th neighbour:

* ``exact torch``: :func:`vericar.ood.knn_scores` (chunked matmul + top-k), the reference;
* ``faiss flat`` / ``faiss IVF`` / ``faiss HNSW``: :func:`vericar.ood.index_knn_scores` through a
  :func:`vericar.index.build_index` index (build time reported apart; an index is built once per database).

Reports queries/s (best of ``--repeats``), the speed ratio to exact torch at the same size, the share of
queries whose score equals the exact one (1e-4) and the AUROC (known vs unknown) from each method's scores next
to the exact AUROC. Writes benchmarks/results/bench_knn_plus.json and benchmarks/figures/bench_knn_plus.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_index import LATENT_DIM, latent_clustered  # noqa: E402
from bench_retrieval import best_time, machine_info  # noqa: E402

from vericar.index import build_index  # noqa: E402
from vericar.ood import index_knn_scores, knn_scores, ood_metrics  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "benchmarks" / "figures"
K = 10


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hnsw-max", type=int, default=200_000, help="largest database HNSW is built for (slow build)")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([5_000, 20_000] if args.quick else [100_000, 1_000_000])
    rng = np.random.default_rng(0)
    dim = 256
    centres = rng.standard_normal((236, LATENT_DIM), dtype=np.float32)
    centres[196:] = centres[:40] + 0.6 * rng.standard_normal((40, LATENT_DIM), dtype=np.float32)  # near-OOD
    lift = rng.standard_normal((LATENT_DIM, dim), dtype=np.float32) / np.sqrt(LATENT_DIM)
    known, _ = latent_clustered(rng, 500, centres[:196], lift)
    unknown, _ = latent_clustered(rng, 500, centres[196:], lift)
    queries = np.concatenate([known, unknown])
    info = machine_info()
    rows = []
    for n in sizes:
        db, lab = latent_clustered(rng, n, centres[:196], lift)
        t_exact, exact = best_time(lambda: knn_scores(queries, db, K), args.repeats)
        auroc_exact = ood_metrics(exact[:500], exact[500:])["auroc"]
        rows.append({"db_size": n, "method": "exact torch", "build_s": 0.0, "queries_per_s": len(queries) / t_exact,
                     "speed_vs_exact": 1.0, "same_score_share": 1.0, "auroc": auroc_exact, "auroc_exact": auroc_exact})
        print(f"{n:>9,} exact torch   {rows[-1]['queries_per_s']:9.0f} q/s  AUROC {auroc_exact:.4f}", flush=True)
        for kind in ("flat", "ivf", "hnsw"):
            if kind == "hnsw" and n > args.hnsw_max:
                continue
            t0 = time.perf_counter()
            index = build_index(db, lab, kind, nprobe=16, ef_search=64)
            build = time.perf_counter() - t0
            t, scores = best_time(lambda: index_knn_scores(queries, index, K), args.repeats)
            auroc = ood_metrics(scores[:500], scores[500:])["auroc"]
            rows.append({"db_size": n, "method": f"faiss {kind}" + (" nprobe=16" if kind == "ivf" else
                                                                     " ef=64" if kind == "hnsw" else ""),
                         "build_s": build, "queries_per_s": len(queries) / t, "speed_vs_exact": t_exact / t,
                         "same_score_share": float(np.isclose(scores, exact, atol=1e-4).mean()), "auroc": auroc,
                         "auroc_exact": auroc_exact})
            print(f"{n:>9,} {rows[-1]['method']:22s} {rows[-1]['queries_per_s']:9.0f} q/s ({t_exact / t:5.1f}x) "
                  f"same score {rows[-1]['same_score_share']:.3f}  AUROC {auroc:.4f}  build {build:.0f} s", flush=True)
            del index
            gc.collect()
        del db, lab
        gc.collect()
    payload = {"benchmark": "bench_knn_plus", "timestamp": datetime.now(timezone.utc).isoformat(), "k": K,
               "dim": dim, "n_queries": len(queries), "data": "latent", "machine": info, "results": rows}
    name = "bench_knn_plus_quick" if args.quick else "bench_knn_plus"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    figure(rows, FIGURES / f"{name}.png")
    print(f"wrote {RESULTS / (name + '.json')}")
    return 0


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    table = df.pivot_table(index="method", columns="db_size", values="queries_per_s", sort=False)
    table.plot.barh(ax=ax, logx=True)
    ax.set_xlabel("KNN+ scoring, queries per second (log scale), k = 10, 2 CPU cores")
    ax.set_ylabel("")
    ax.legend(title="database items", fontsize=8)
    ax.set_title("KNN+ through the retrieval index: exact torch vs faiss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
