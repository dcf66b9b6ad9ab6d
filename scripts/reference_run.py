"""The whole reference run on a CPU machine in one command: the long models (and notebook 07's nine small ones)
trained ahead, one queue per core, then every notebook through the study runner, then ``--publish``.

    nohup python scripts/reference_run.py --run-dir ~/.cache/vericar/ref > ~/.cache/vericar/ref.log 2>&1 &
    python scripts/reference_run.py --run-dir DIR --dry-run        # print the commands, run nothing

Two single-threaded trainings pinned to two cores (``taskset``, ``OMP_NUM_THREADS=1``) train two models in the
time of one two-threaded training, so the models go in as many queues as there are cores, longest first.
Resumable: a finished model is loaded, a model cut off resumes from its checkpoint, and the study then finds
every model finished (``scripts/reference_models.py`` trains each exactly as its notebook would). Keep the run
folder outside the work tree (``~/.cache/vericar/...``): a new session may lay the work tree anew.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Relative cost of each model: wall seconds on one core of the 2026-12-03 reference run (192 px; the trunk caches
# of the last-2-stage modes were warm, notebook 07's full-trunk cache was built by ``hierarchy``; ``official``
# resumed at epoch 7: its 13 epochs took 2,004 s, 2,950 is the whole; ssb-val and open-world-val: 2026-12-04,
# side by side on the two cores, trunk caches warm). The queues are balanced on these; only their ratios matter.
COST = {"official": 2950, "zero-shot": 2673, "seed": 2427, "open-world": 2236, "ssb": 1591, "hierarchy": 2366,
        "ssb-val": 1340, "open-world-val": 1660}


def queues(models: list[str], cores: int) -> list[list[str]]:
    """Longest first, each model to the queue with the least work so far (the LPT rule)."""
    out: list[list[str]] = [[] for _ in range(max(1, min(cores, len(models))))]
    for name in sorted(models, key=lambda m: -COST.get(m, 0)):
        min(out, key=lambda q: sum(COST.get(m, 0) for m in q)).append(name)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="the study run folder (outside the work tree)")
    parser.add_argument("--models", nargs="+", default=list(COST), choices=list(COST))
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-publish", action="store_true", help="run the notebooks, copy nothing into the repo")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.expanduser().resolve()
    cores = sorted(os.sched_getaffinity(0))[:args.cores]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    trainers = []
    for core, queue in zip(cores, queues(args.models, len(cores))):
        cmd = ["taskset", "-c", str(core), sys.executable, str(ROOT / "scripts/reference_models.py"), *queue,
               "--run-dir", str(run_dir)]
        print(f"{time.strftime('%H:%M:%S')} core {core}: {shlex.join(cmd)}", flush=True)
        if not args.dry_run:
            trainers.append((queue, subprocess.Popen(cmd, cwd=ROOT, env=env)))
    failed = [queue for queue, p in trainers if p.wait() != 0]
    if failed:
        raise SystemExit(f"training failed for {failed} (its output is above); rerun the same command to resume")
    study = [sys.executable, "-m", "vericar.study", "--profile", "full", "-p", "run_dir", str(run_dir),
             "--no-progress", *([] if args.no_publish else ["--publish"])]
    print(f"{time.strftime('%H:%M:%S')} models ready; notebooks: {shlex.join(study)}", flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(study, cwd=ROOT).returncode


if __name__ == "__main__":
    raise SystemExit(main())
