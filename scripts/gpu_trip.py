"""One trip to a lent GPU: fine-tune on the GPU copy of Stanford Cars, measure throughput, bring the runs home.

Prepared to run as ONE device call (see README "GPU trip"); tried here on CPU with tiny settings first:

    python scripts/gpu_trip.py --dataset synthetic --data-dir data/synthcars_tiny --synth-preset tiny \\
        --backbone tiny_cnn --image-size 32 --epochs 1 --seed-budget-s 5 --out /tmp/gpu_out   # CPU rehearsal

On the device (``scripts/gpu_trip.sh`` unpacks the carried data and wheels, then calls this):

    python scripts/gpu_trip.py --data-dir /tmp/cars/stanford_cars_small_gpu --out $OUT

Per protocol, one fine-tune run (``vericar.train.train``, ``train_backbone=True``: images decoded once onto
the device, augmented there, bf16, channels_last). Protocol ``seed`` gets a training-time budget
(``--seed-budget-s``, the issue's "<= 30 s"): a one-epoch probe measures the epoch time, and the run gets as
many epochs as fit. Each finished run is exported small (:func:`vericar.runs.export_run`: half-precision
weights, trained embeddings, no frozen features) and packed as ``$OUT/<protocol>.tar`` (config, metrics,
history, embeddings) plus ``$OUT/<protocol>-model.pt``, so each file stays under the 16 MiB return limit;
``$OUT/gpu_trip.json`` sums up (metrics, seconds, images/s, device). At home:
``python scripts/gpu_trip.py --unpack <files_at> --to runs/gpu/models`` restores the run folders, which
``load_run`` and notebook 03 read (``-p run_dir runs/gpu -p render_only true``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the carried working tree, not an installed package

RUN_FILES = ("config.json", "metrics.json", "history.csv", "embeddings.npz")


def pack(export_dir: Path, out: Path, name: str) -> list[Path]:
    """``<name>.tar`` (everything but the weights) and ``<name>-model.pt`` under ``out``."""
    tar_path = out / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for f in RUN_FILES:
            if (export_dir / f).is_file():
                tar.add(export_dir / f, arcname=f)
    model = out / f"{name}-model.pt"
    shutil.copy2(export_dir / "model.pt", model)
    return [tar_path, model]


def unpack(files_at: Path, to: Path) -> list[Path]:
    """Restore run folders from a trip's files: ``to/<protocol>/`` with ``model.pt``."""
    restored = []
    for tar_path in sorted(Path(files_at).glob("*.tar")):
        name = tar_path.stem
        folder = to / name
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path) as tar:
            tar.extractall(folder, filter="data")
        model = tar_path.with_name(f"{name}-model.pt")
        if model.is_file():
            shutil.copy2(model, folder / "model.pt")
        restored.append(folder)
    summary = Path(files_at) / "gpu_trip.json"
    if summary.is_file():
        shutil.copy2(summary, to / "gpu_trip.json")
    return restored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="stanford_cars")
    parser.add_argument("--data-dir")
    parser.add_argument("--synth-preset", default="default")
    parser.add_argument("--out")
    parser.add_argument("--work", default="/tmp/gpu_runs")
    parser.add_argument("--protocols", nargs="+", default=["seed", "official", "zero-shot"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=25, help="epochs of the runs other than seed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--m-per-class", type=int, default=4)
    parser.add_argument("--backbone-lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--seed-budget-s", type=float, default=30.0, help="training seconds for protocol seed")
    parser.add_argument("--flip-tta", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--unpack", help="a trip's returned files: restore run folders (with --to) and stop")
    parser.add_argument("--to", default="runs/gpu/models")
    args = parser.parse_args(argv)
    if args.unpack:
        for folder in unpack(Path(args.unpack), Path(args.to)):
            print("restored", folder)
        return 0
    if not args.data_dir or not args.out:
        parser.error("--data-dir and --out are needed (or --unpack)")

    import torch

    from vericar.data import open_dataset
    from vericar.config import TrainConfig
    from vericar.runs import export_run
    from vericar.train import train

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    cars = open_dataset(args.dataset, args.data_dir, synth_config=args.synth_preset)
    base = TrainConfig(backbone=args.backbone, image_size=args.image_size, train_backbone=True,
                       epochs=args.epochs, batch_size=args.batch_size, m_per_class=args.m_per_class,
                       backbone_lr=args.backbone_lr, head_lr=args.head_lr, warmup_epochs=1.0,
                       flip_tta=args.flip_tta, eval_every=max(args.epochs, 1), device="auto")
    summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "data_dir": str(args.data_dir), "dataset": cars.name,
               "images": len(cars), "runs": {}}
    t_start = time.perf_counter()
    for protocol in args.protocols:
        config = dataclasses.replace(base, protocol=protocol)
        if protocol == "seed" and args.seed_budget_s:
            probe = train(cars, dataclasses.replace(config, epochs=1, eval_every=1), work / "seed-probe",
                          progress=False, cache_dir=None)
            epoch_s = probe.metrics["train_seconds"]
            epochs = max(1, math.floor(args.seed_budget_s / max(epoch_s, 1e-6)))
            summary["seed_probe"] = {"epoch_seconds": epoch_s, "images_per_second": probe.metrics["images_per_second"],
                                     "epochs_in_budget": epochs}
            config = dataclasses.replace(config, epochs=epochs, eval_every=epochs)
        t0 = time.perf_counter()
        run = train(cars, config, work / protocol, progress=False, cache_dir=None)
        wall = time.perf_counter() - t0
        m = run.metrics
        summary["runs"][protocol] = {"config": dataclasses.asdict(config), "frozen": m["frozen"],
                                     "trained": m["trained"], "train_seconds": m["train_seconds"],
                                     "images_per_second": m["images_per_second"], "wall_seconds": wall}
        print(f"{protocol}: P@1 {m['frozen']['precision_at_1']:.3f} -> {m['trained']['precision_at_1']:.3f}, "
              f"{m['train_seconds']:.1f} s training, {m['images_per_second']:.0f} images/s", flush=True)
        export_dir = work / f"{protocol}-export"
        export_run(work / protocol, export_dir)
        files = pack(export_dir, out, protocol)
        summary["runs"][protocol]["returned_files"] = {f.name: f.stat().st_size for f in files}
        summary["total_seconds"] = time.perf_counter() - t_start
        (out / "gpu_trip.json").write_text(json.dumps(summary, indent=2))  # after each run: a timeout keeps it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
