"""Load test of the web app on localhost: concurrent clients posting photos to ``POST /identify``.

    python benchmarks/bench_app.py --run runs/full/models/official     # 20 clients x 10 requests, a real run

Every client sends its requests one after another (a photo from the run's query set each time); a probe asks
``GET /health`` meanwhile, to show that inference does not block the event loop. Reports errors, latency
percentiles (p50/p95/max), requests/s and the batch sizes the app ran, and writes
``benchmarks/results/app_load.json`` (the test suite writes ``app_load_test.json`` with its tiny model).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


async def _load(url: str, photos: list[bytes], clients: int, requests: int) -> dict:
    import httpx

    latencies, statuses, health, failures = [], [], [], []
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=120) as http:
        async def client(c: int) -> None:
            for i in range(requests):
                photo = photos[(c * requests + i) % len(photos)]
                t0 = time.perf_counter()
                try:
                    r = await http.post(f"{url}/identify", files=[("photos", (f"c{c}-{i}.jpg", photo, "image/jpeg"))])
                    statuses.append(r.status_code if r.status_code != 200 or r.json()["results"] else -1)
                except httpx.HTTPError as err:  # counted as an error, named in the result
                    statuses.append(-2)
                    failures.append(f"{type(err).__name__}: {err}")
                latencies.append(time.perf_counter() - t0)

        async def probe() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                await http.get(f"{url}/health")
                health.append(time.perf_counter() - t0)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
        done.set()
        await prober
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests_per_client": requests, "requests": len(latencies),
            "errors": int(sum(s != 200 for s in statuses)), "failures": failures[:5],
            "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "max_ms": float(ms.max()), "requests_per_second": len(ms) / wall,
            "health_probe_p95_ms": float(np.percentile(np.array(health) * 1000, 95)) if health else None}


def load_test(app, photos: list[bytes], clients: int = 20, requests: int = 10) -> dict:
    """Serve ``app`` on localhost and run the load; adds the app's batch sizes and the machine load."""
    from vericar.app import serving

    load_before = os.getloadavg()
    with serving(app) as url:
        result = asyncio.run(_load(url, photos, clients, requests))
    batches = app.state.batcher.batches
    return {**result, "batches": len(batches), "largest_batch": max(batches, default=0),
            "mean_batch": float(np.mean(batches)) if batches else 0.0, "backend": app.state.service.backend,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count()}


def query_photos(service, run, n: int = 20) -> list[bytes]:
    out = []
    from vericar.identify import test_photo_rows

    for r in test_photo_rows(run, service.cars)[:n]:  # photos the database does not hold
        buf = io.BytesIO()
        service.cars.image(int(r)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def write(result: dict, name: str | Path, **extra) -> Path:
    """Write ``benchmarks/results/<name>.json``, or to ``name`` itself when it is a path."""
    path = Path(name) if isinstance(name, Path) else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, **result, "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())},
                               indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    from vericar.app import create_app
    from vericar.identify import IdentifyService, open_run

    service = IdentifyService.from_run(args.run, backend=args.backend)
    run, _ = open_run(args.run)
    result = load_test(create_app(service), query_photos(service, run), args.clients, args.requests)
    path = write(result, "app_load", command="python benchmarks/bench_app.py " + " ".join(argv or sys.argv[1:]),
                 run=str(args.run), backbone=run.config.backbone, image_size=run.config.image_size)
    print(json.dumps(result, indent=2), f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
