"""How long a newcomer waits for a real Stanford Cars identifier: a fresh clone, `make setup`, the identifier's
training (`python -m vericar.identify --profile full --epochs 10 --image-size 160`, what `make identifier`
runs) with a cold
feature cache, then the app until `GET /health` answers.

    python benchmarks/bench_fresh_identifier.py                     # on every core this process may use
    taskset -c 1 python benchmarks/bench_fresh_identifier.py        # on one core: an upper bound for two

The clone goes beside this repository (so that ``../shared/data`` resolves as it does here) and is deleted
afterwards unless ``--keep``; the identifier's home (feature cache ``~/.cache/vericar``) is a new temporary
folder, so nothing cached here is reused; pip's cache is not used either. Writes
benchmarks/results/bench_fresh_identifier.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="the identifier's epochs (make identifier: 10)")
    parser.add_argument("--image-size", type=int, default=160, help="the identifier's input size (make identifier: 160)")
    parser.add_argument("--keep", action="store_true", help="keep the clone and its logs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_fresh_identifier.json")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()
    clone = ROOT.parent / f"vericar-fresh-clone-{os.getpid()}"
    home = Path(tempfile.mkdtemp(prefix="vericar-fresh-home-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "OMP_", "MKL_"))}
    env |= {"PIP_NO_CACHE_DIR": "1"}
    if cores == 1:
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if (Path.home() / ".config/pip").is_dir():  # the package index settings, not a cache
        shutil.copytree(Path.home() / ".config/pip", home / ".config/pip")
    rows, app = [], None
    try:
        t0 = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        rows.append({"step": "git clone", "seconds": time.perf_counter() - t0})
        rows.append({"step": "make setup", "seconds": timed(["make", "setup"], clone, env, clone / "setup.log")})
        identify_env = env | {"HOME": str(home)}  # a cold feature cache
        t0 = time.perf_counter()
        with open(clone / "identify.log", "w") as log:
            cmd = [str(clone / ".venv/bin/python"), "-m", "vericar.identify", "--profile", "full",
                   "--epochs", str(args.epochs), "--image-size", str(args.image_size)]
            run_dir = subprocess.run(cmd, cwd=clone, env=identify_env, stdout=subprocess.PIPE, stderr=log, text=True,
                                     check=True).stdout.strip().splitlines()[-1]
        rows.append({"step": f"python -m vericar.identify --profile full --epochs {args.epochs} --image-size {args.image_size}",
                     "seconds": time.perf_counter() - t0})
        port = free_port()
        t0 = time.perf_counter()
        app = subprocess.Popen([str(clone / ".venv/bin/python"), "-m", "vericar.app", "--run", run_dir,
                                "--port", str(port)], cwd=clone, env=identify_env,
                               stdout=open(clone / "app.log", "w"), stderr=subprocess.STDOUT)
        while True:
            try:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
                break
            except OSError:
                if app.poll() is not None:
                    raise SystemExit(f"the app stopped: see {clone / 'app.log'}")
                time.sleep(1)
        rows.append({"step": "app until GET /health answers", "seconds": time.perf_counter() - t0})
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
        config = json.loads((Path(run_dir) / "config.json").read_text())
    finally:
        if app is not None:
            app.terminate()
            app.wait()
        if not args.keep:
            shutil.rmtree(clone, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    total = sum(r["seconds"] for r in rows)
    rows.append({"step": "total", "seconds": total})
    for r in rows:
        r["minutes"] = r["seconds"] / 60
    import torch

    payload = {"benchmark": "bench_fresh_identifier", "results": rows,
               "identifier": {"run": Path(run_dir).name, "protocol": config["protocol"],
                              "precision_at_1": metrics["trained"]["precision_at_1"],
                              "train_seconds": metrics["train_seconds"], "threshold_from": health.get("calibration")},
               "target_minutes": 30, "within_target": total <= 30 * 60,
               "machine": {"cpu_count": cores, "torch": torch.__version__,
                           "torch_threads": 1 if cores == 1 else None, "load_average_1_5_15min_at_start": load},
               "command": "python benchmarks/bench_fresh_identifier.py" if cores == os.cpu_count()
               else f"taskset -c <{cores} core(s)> python benchmarks/bench_fresh_identifier.py",
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
