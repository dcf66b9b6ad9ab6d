"""Benchmark: glibc's malloc defaults against vericar's setting (vericar/allocator.py), side by side.

    python benchmarks/bench_allocator.py            # Lite0 (ImageNet weights), the study's batch sizes
    python benchmarks/bench_allocator.py --quick    # tiny_cnn at 32 px, a smoke test

Each workload runs in a fresh process per setting (the allocator is set once per process, when ``vericar`` is
imported; ``VERICAR_MALLOC=default`` keeps glibc's defaults), the settings alternating over ``--rounds``; best
round per setting. Per workload: images per second, minor page faults per batch, the share of CPU time spent in
the kernel, and the process's peak memory. Workloads are the study's hot loops: the trunk cache at 160 px (the
frozen stages' outputs, what the cached training modes compute once per view), a training step of the last 2
stages on those features, a full fine-tune step at 128 px, and embedding with the whole model at 160 px.
Writes ``benchmarks/results/bench_allocator.json`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORKLOADS = ("trunk cache, {size} px", "train last 2 stages on cached trunk, {size} px",
             "full fine-tune step, {small} px", "embed (whole model), {size} px")


def worker(backbone: str, quick: bool, steps: int) -> list[dict]:
    """Time every workload in this process (its allocator setting is the environment's)."""
    sys.path.insert(0, str(ROOT))
    import torch

    import vericar.allocator
    from vericar.models import build_backbone, build_model, split_backbone

    torch.manual_seed(0)
    size, small, batch = (32, 32, 16) if quick else (160, 128, 128)

    def measure(name: str, step, n_images: int) -> dict:
        name = name.format(size=size, small=small)
        step()  # warm-up: the first pass allocates
        usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            step()
        seconds, usage = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
        return {"workload": name, "images_per_second": steps * n_images / seconds,
                "minor_faults_per_batch": (usage.ru_minflt - usage0.ru_minflt) / steps,
                "kernel_cpu_share": (usage.ru_stime - usage0.ru_stime) / max(cpu, 1e-9),
                "peak_memory_gib": usage.ru_maxrss / 2**20}

    rows = []
    backbone_net, _ = build_backbone(backbone, pretrained=backbone != "tiny_cnn")
    trunk, top = split_backbone(backbone_net, 2)
    trunk = trunk.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        rows.append(measure(WORKLOADS[0], lambda: trunk(x), batch))
        features = trunk(x).float()
    top.train()
    opt = torch.optim.AdamW(top.parameters(), 1e-3)

    def top_step():
        loss = top(features).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows.append(measure(WORKLOADS[1], top_step, batch))
    model = build_model(backbone, pretrained=backbone != "tiny_cnn").train()
    full_opt = torch.optim.AdamW(model.parameters(), 1e-4)
    xs = torch.randn(batch // 2, 3, small, small)

    def full_step():
        loss = model(xs).float().pow(2).mean()
        full_opt.zero_grad()
        loss.backward()
        full_opt.step()
    rows.append(measure(WORKLOADS[2], full_step, batch // 2))
    model.eval()
    with torch.no_grad():
        rows.append(measure(WORKLOADS[3], lambda: model(x), batch))
    for r in rows:
        r["allocator_applied"] = vericar.allocator.applied
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    backbone = "tiny_cnn" if args.quick else "efficientnet_lite0"
    if args.worker:
        print(json.dumps(worker(backbone, args.quick, args.steps)))
        return 0
    load_before = os.getloadavg()
    settings = {"glibc defaults": {"VERICAR_MALLOC": "default"}, "vericar (no mmap, 1 GiB trim)": {}}
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for setting, extra in settings.items():
            env = {k: v for k, v in os.environ.items() if k != "VERICAR_MALLOC"} | extra
            out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps),
                                  *(["--quick"] if args.quick else [])], env=env, check=True, capture_output=True,
                                 text=True).stdout
            for row in json.loads(out.strip().splitlines()[-1]):
                key = (setting, row["workload"])
                if key not in best or row["images_per_second"] > best[key]["images_per_second"]:
                    best[key] = {"setting": setting, **row}
    rows = list(best.values())
    for row in rows:
        base = best[("glibc defaults", row["workload"])]["images_per_second"]
        row["ratio_to_glibc_defaults"] = row["images_per_second"] / base
    import torch

    payload = {"benchmark": "bench_allocator", "backbone": backbone, "results": rows,
               "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "torch": torch.__version__, "platform": platform.platform(),
                           "load_average_1_5_15min_at_start": load_before,
                           "load_average_1_5_15min_at_end": os.getloadavg()},
               "command": "python benchmarks/bench_allocator.py" + (" --quick" if args.quick else ""),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = RESULTS / f"bench_allocator{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    for row in rows:
        print(f"{row['setting']:32s} {row['workload']:45s} {row['images_per_second']:7.0f} img/s "
              f"x{row['ratio_to_glibc_defaults']:.2f}  faults/batch {row['minor_faults_per_batch']:9.0f}  "
              f"kernel {row['kernel_cpu_share']:.0%}  peak {row['peak_memory_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
