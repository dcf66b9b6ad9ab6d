"""Benchmark: training throughput and peak memory per training mode and precision, on the CPU.

    python benchmarks/bench_train.py            # Lite0 at 128 and 160 px, Lite2 fine-tune, inference
    python benchmarks/bench_train.py --quick    # a smoke test (tiny_cnn, few steps)

Each setting runs in a fresh subprocess (so its peak resident memory is its own) and times ``--steps`` training
steps after ``--warmup`` steps, as vericar.train runs them: the trainable part's forward, the MS loss with its
miner, backward and an AdamW step, on class-balanced batches (32 classes x 4). Modes:

* ``head``: the projection head on pooled backbone features (cached);
* ``last k``: the last k EfficientNet stages + head on cached trunk outputs (``trainable_stages=k``), k = 1..4;
* ``full``: the whole backbone + head on images, with the on-the-fly augmentation of vericar.embed.augment.

Precision: fp32, or bf16 autocast of the forward (``TrainConfig.cpu_bf16``). Batch 128 in the cached modes,
64 in the fine-tune (the sizes the recipes use). Inputs are random tensors of the real shapes: a step's cost
does not depend on the values. ``cache_gib`` is what the mode's cache of the whole dataset (16,185 images,
plain + mirrored views, float16) holds in memory on top of the step's own peak. Ratios are to the full
fine-tune in fp32 at the same input size, from the same run. Writes benchmarks/results/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DATASET_IMAGES = 16_185


def one(backbone: str, mode: str, size: int, bf16: bool, steps: int, warmup: int) -> dict:
    """Time one setting in this process; returns images/s and peak RSS."""
    import torch
    import torch.nn.functional as F

    from vericar.embed import augment
    from vericar.losses import make_loss
    from vericar.models import build_model, split_backbone

    torch.manual_seed(0)
    model = build_model(backbone, 256, pretrained=False)
    batch = 64 if mode == "full" else 128
    labels = torch.arange(batch // 4).repeat_interleave(4)
    loss_fn = make_loss("ms")
    cache_shape = None
    if mode == "infer":
        model.eval()
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

        def step():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)
    else:
        if mode == "full":
            fwd, params = model, list(model.parameters())
            images = torch.rand(batch, 3, size, size)
            gen = torch.Generator().manual_seed(0)
            make_input = lambda: augment(images, gen).contiguous(memory_format=torch.channels_last)  # noqa: E731
        else:
            k = 0 if mode == "head" else int(mode.split()[-1])
            trunk, tail = split_backbone(model.backbone, k if k else 1)
            if k == 0:  # head only: pooled features
                with torch.no_grad():
                    shape = tail(trunk(torch.zeros(1, 3, size, size))).shape[1:]
                tail = torch.nn.Identity()
            else:
                with torch.no_grad():
                    shape = trunk.eval()(torch.zeros(1, 3, size, size)).shape[1:]
            cache_shape = list(shape)
            feats = torch.randn(batch, *shape)
            params = list(tail.parameters()) + list(model.head.parameters())
            fwd = lambda x: F.normalize(model.head(tail(x)), dim=-1)  # noqa: E731
            make_input = lambda: feats  # noqa: E731
            model.backbone.eval()
            tail.train()
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                emb = fwd(make_input())
            loss = loss_fn(emb.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    out = {"images_per_s": steps * batch / seconds, "batch": batch,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if cache_shape is not None:
        n = 1
        for d in cache_shape:
            n *= d
        out.update(cache_shape=cache_shape, cache_gib=DATASET_IMAGES * n * 2 * 2 / 2**30)
    return out


def settings(quick: bool) -> list[tuple[str, str, int]]:
    if quick:
        return [("tiny_cnn", m, 32) for m in ("head", "last 1", "full", "infer")]
    out = []
    for size in (128, 160):
        out += [("efficientnet_lite0", m, size) for m in ("head", "last 1", "last 2", "last 3", "last 4", "full")]
    out += [("efficientnet_lite2", "full", 160), ("efficientnet_lite2", "last 2", 160)]
    out += [(b, "infer", s) for b, s in (("efficientnet_lite0", 128), ("efficientnet_lite0", 160),
                                         ("efficientnet_lite2", 160))]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--one", nargs=4, metavar=("BACKBONE", "MODE", "SIZE", "BF16"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 6)
    if args.one:
        b, mode, size, bf16 = args.one
        print(json.dumps(one(b, mode, int(size), bf16 == "1", steps, args.warmup)))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_retrieval import machine_info

    rows = []
    for backbone, mode, size in settings(args.quick):
        for bf16 in (False, True):
            cmd = [sys.executable, __file__, "--one", backbone, mode, str(size), "1" if bf16 else "0",
                   "--steps", str(steps), "--warmup", str(args.warmup)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                             .splitlines()[-1])
            row = {"backbone": backbone, "mode": mode, "image_size": size,
                   "precision": "bf16 autocast" if bf16 else "fp32", **res}
            rows.append(row)
            print(f"{backbone:20s} {mode:7s} {size:4d}px {row['precision']:13s} {res['images_per_s']:8.1f} img/s "
                  f"peak {res['peak_rss_gib']:.2f} GiB", flush=True)
    for row in rows:
        ref = next((r for r in rows if r["backbone"] == row["backbone"] and r["image_size"] == row["image_size"]
                    and r["mode"] == "full" and r["precision"] == "fp32"), None)
        row["speed_vs_full_fp32"] = row["images_per_s"] / ref["images_per_s"] if ref and row["mode"] != "infer" \
            else None
    payload = {"benchmark": "bench_train", "kind": "train", "timestamp": datetime.now(timezone.utc).isoformat(),
               "steps": steps, "warmup": args.warmup, "machine": machine_info(), "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("bench_train_quick.json" if args.quick else "bench_train.json")
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
