"""The training-recipe search on a validation split carved from the official training images (protocol ``val``).

    python scripts/recipe_search.py ms-k2 pa-k2 ...        # run the named recipes in order (resumable)
    python scripts/recipe_search.py --table                 # only rebuild results/recipe_search.{csv,md}
    python scripts/recipe_search.py --test pa-k2-aug4-e20   # a chosen recipe on the official test set

Each recipe is a set of ``python -m vericar.train`` flags on top of :data:`BASE`; each run is a resumable run
folder under ``--runs`` (default ``~/.cache/vericar/search``, outside the work tree, so a run cut off by a
session's end resumes in the next one). No official test image is read: protocol ``val`` trains on 80% of
each class's training images and queries the other 20%. The table has one row per finished run, read from
its run folder (config.json, metrics.json), or, for a run whose folder is not on this machine, kept from the
committed table. Test-set numbers only for recipes chosen on it (``--test``:
results/recipe_search_test.md; the reference recipe's is notebook 03's official model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BASE = {"dataset": "stanford_cars", "data-dir": str(ROOT.parent / "shared/data/stanford_cars_small"),
        "protocol": "val", "image-size": 160, "train-backbone": False, "trainable-stages": 2,
        "backbone-lr": 1e-3, "head-lr": 1e-3, "flip-tta": True, "epochs": 10, "eval-every": 5,
        "batch-size": 128, "m-per-class": 4, "aug-views": 0, "device": "cpu"}  # aug-views: TrainConfig's is 4 now

RECIPES: dict[str, dict] = {
    # loss, at the depth the issue measured best per hour (last 2 stages on the cached trunk)
    "ms-k2": {"loss": "ms"},
    "pa-k2": {"loss": "proxy_anchor", "proxy-lr": 1e-2},
    "nsm-k2": {"loss": "norm_softmax", "proxy-lr": 1e-2},
    "arc-k2": {"loss": "arcface", "proxy-lr": 1e-2},
    "pa-k2-plr1e-1": {"loss": "proxy_anchor", "proxy-lr": 1e-1},
    "nsm-k2-plr1e-1": {"loss": "norm_softmax", "proxy-lr": 1e-1},
    # augmentation carried by the cache
    "ms-k2-aug4": {"loss": "ms", "aug-views": 4},
    "pa-k2-aug4": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "aug-views": 4},
    "nsm-k2-aug4": {"loss": "norm_softmax", "proxy-lr": 1e-2, "aug-views": 4},
    # depth
    "ms-k1": {"loss": "ms", "trainable-stages": 1},
    "ms-k3": {"loss": "ms", "trainable-stages": 3},
    "pa-k3": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "trainable-stages": 3},
    "nsm-k3": {"loss": "norm_softmax", "proxy-lr": 1e-2, "trainable-stages": 3},
    # precision, length
    "ms-k2-bf16": {"loss": "ms", "cpu-bf16": True},
    "ms-k2-e20": {"loss": "ms", "epochs": 20},
    # input size and backbone
    "ms-k2-128px": {"loss": "ms", "image-size": 128},
    "ms-k2-192px": {"loss": "ms", "image-size": 192},
    "ms-k2-lite2": {"loss": "ms", "backbone": "efficientnet_lite2"},
    # the levers again on the chosen loss (Proxy-Anchor)
    "pa-k2-e20": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "epochs": 20},
    "pa-k2-128px": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "image-size": 128},  # the crops' own size
    "pa-k2-192px": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "image-size": 192},
    "pa-k2-lite2": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "backbone": "efficientnet_lite2"},
    "pa-k1": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "trainable-stages": 1},
    # the two levers that paid at 10 epochs (Proxy-Anchor, 4 cached augmented views), at the reference length
    "pa-k2-aug4-e20": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "aug-views": 4, "epochs": 20},
    # and with the next lever per hour (input size)
    "pa-k2-aug4-e20-192px": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "aug-views": 4, "epochs": 20,
                             "image-size": 192},
    # or with the other lever measured alone at 10 epochs (one more trainable stage)
    "pa-k3-aug4": {"loss": "proxy_anchor", "proxy-lr": 1e-2, "aug-views": 4, "trainable-stages": 3},
    # a full fine-tune that starts from the best partial model (its weights and proxies; "{runs}/NAME" is that
    # recipe's run folder, NAME@official under --test), gently: 10x lower rates, 3 epochs, evaluated each epoch
    "ft3-from-pa-k2-aug4-e20-192px": {"loss": "proxy_anchor", "proxy-lr": 1e-3, "image-size": 192,
                                      "train-backbone": True, "trainable-stages": 0, "aug-views": 0,
                                      "backbone-lr": 1e-4, "head-lr": 1e-4, "batch-size": 64, "epochs": 3,
                                      "eval-every": 1, "init-from": "{runs}/pa-k2-aug4-e20-192px"},
}


def flags(recipe: dict, runs: Path | None = None, test: bool = False) -> list[str]:
    """``python -m vericar.train`` flags; ``{runs}/NAME`` (a recipe starting from another's run) becomes that
    run folder under ``runs`` (``NAME@official`` for a test run: official from official, no validation leak)."""
    out = []
    for key, value in {**BASE, **recipe}.items():
        if isinstance(value, str) and value.startswith("{runs}/"):
            value = str(Path(runs) / (value.removeprefix("{runs}/") + ("@official" if test else "")))
        out += [f"--{key}", str(value)]
    return out


def run(name: str, runs: Path, log, *, test: bool = False) -> None:
    """Train recipe ``name`` on protocol ``val`` into ``runs/<name>``; with ``test``, on protocol ``official``
    (the test set) into ``runs/<name>@official``: only for a recipe chosen on validation."""
    run_dir = runs / (f"{name}@official" if test else name)
    if (run_dir / "metrics.json").is_file():
        print(f"{run_dir.name}: finished already", file=log, flush=True)
        return
    if test and not (runs / name / "metrics.json").is_file():
        raise SystemExit(f"{name} has no finished validation run in {runs / name}: test numbers are only for "
                         f"recipes chosen on validation; run `python scripts/recipe_search.py {name}` first")
    recipe = {**RECIPES[name], "protocol": "official"} if test else RECIPES[name]
    cmd = [sys.executable, "-m", "vericar.train", *flags(recipe, runs, test), "--run-dir", str(run_dir)]
    print(f"{time.strftime('%H:%M:%S')} {name}: {' '.join(cmd)}", file=log, flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    load = os.getloadavg()[0]
    (run_dir / "search.json").write_text(json.dumps({"recipe": name, "wall_seconds": time.time() - t0,
                                                     "load_at_end": load}, indent=1))
    print(f"{time.strftime('%H:%M:%S')} {name}: done in {time.time() - t0:.0f} s", file=log, flush=True)


def table(runs: Path) -> pd.DataFrame:
    rows = []
    for name in RECIPES:
        d = runs / name
        if not (d / "metrics.json").is_file():
            continue
        cfg, m = json.loads((d / "config.json").read_text()), json.loads((d / "metrics.json").read_text())
        extra = json.loads((d / "search.json").read_text()) if (d / "search.json").is_file() else {}
        hist = pd.read_csv(d / "history.csv")
        curve = " / ".join(f"{p:.3f}" for p in hist["precision_at_1"].dropna())
        mode = ("full fine-tune" + (f" from {Path(cfg['init_from']).name}" if cfg.get("init_from") else "")
                if cfg["train_backbone"] else
                f"last {cfg['trainable_stages']} stages, cached trunk" if cfg["trainable_stages"] else "head only")
        views = "plain+mirror" + (f"+{cfg.get('aug_views', 0)} aug" if cfg.get("aug_views") else "")
        rows.append({"recipe": name, "mode": mode, "trainable_stages": cfg["trainable_stages"], "views": views,
                     "loss": cfg["loss"] + (f" (proxy lr {cfg['proxy_lr']:g})" if cfg["loss"] in
                                            ("proxy_anchor", "norm_softmax", "arcface") else ""),
                     "backbone": cfg["backbone"], "input_px": cfg["image_size"], "epochs": cfg["epochs"],
                     "precision": "bf16 autocast" if cfg.get("cpu_bf16") else "fp32",
                     "device": m["device"], "train_seconds": round(m["train_seconds"]), "images_per_second": round(m["images_per_second"]),
                     "peak_memory_gib": round(m.get("peak_memory_gib", float("nan")), 2),
                     "val_precision_at_1": round(m["trained"]["precision_at_1"], 4),
                     "val_map_at_r": round(m["trained"]["map_at_r"], 4),
                     "val_p1_curve (each evaluation)": curve,
                     "load_at_end": round(extra.get("load_at_end", float("nan")), 1)})
    return pd.DataFrame(rows)


def test_table(runs: Path) -> pd.DataFrame:
    """The chosen recipes on the official test set (``<name>@official`` run folders), beside their validation P@1."""
    from vericar.metrics import wilson_interval

    rows = []
    for name in RECIPES:
        d = runs / f"{name}@official"
        if not (d / "metrics.json").is_file():
            continue
        m = json.loads((d / "metrics.json").read_text())
        val = runs / name / "metrics.json"
        p1, n = m["trained"]["precision_at_1"], m["trained"]["n_queries"]
        low, high = wilson_interval(round(p1 * n), n)
        rows.append({"recipe": name, "epochs": json.loads((d / "config.json").read_text())["epochs"],
                     "device": m["device"], "train_seconds": round(m["train_seconds"]),
                     "val_precision_at_1": round(json.loads(val.read_text())["trained"]["precision_at_1"], 4)
                     if val.is_file() else None,
                     "test_precision_at_1": round(p1, 4), "test_p1_ci95": f"{low:.3f}-{high:.3f}",
                     "test_map_at_r": round(m["trained"]["map_at_r"], 4), "test_queries": n})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", choices=[[], *RECIPES], metavar="RECIPE")
    parser.add_argument("--runs", type=Path, default=Path.home() / ".cache/vericar/search")
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--table", action="store_true", help="only rebuild the table")
    parser.add_argument("--test", action="store_true", help="train the named (chosen) recipes on protocol official "
                        "and report their test P@1 (results/recipe_search_test.md)")
    args = parser.parse_args(argv)
    log = open(args.log, "a") if args.log else sys.stdout
    for name in args.recipes:
        if not args.table:
            run(name, args.runs, log, test=args.test)
        write(args.runs)
    write(args.runs)
    return 0


def merged(fresh: pd.DataFrame, committed: Path) -> pd.DataFrame:
    """``fresh`` rows (run folders on this machine) plus the committed table's rows of recipes whose run folders
    are not here (trained on an earlier machine: the work tree and ~/.cache are laid anew), in RECIPES order."""
    if not committed.is_file():
        return fresh
    old = pd.read_csv(committed)
    kept = old[~old["recipe"].isin(fresh["recipe"] if not fresh.empty else [])]
    both = pd.concat([kept, fresh], ignore_index=True) if not fresh.empty else kept
    order = {name: i for i, name in enumerate(RECIPES)}
    return both.sort_values("recipe", key=lambda c: c.map(order).fillna(len(order)), kind="stable",
                            ignore_index=True)


def write(runs: Path, out: Path = ROOT / "results") -> None:
    t = merged(table(runs), out / "recipe_search.csv")
    if t.empty:
        return
    t.to_csv(out / "recipe_search.csv", index=False)
    header = ("Recipe search (protocol `val`: 80/20 per class of the official training images of "
              "stanford_cars_small, bbox crops 128 px; CPU, 2 cores; `python scripts/recipe_search.py`). "
              "Validation numbers only; `val_p1_curve` is validation P@1 at each evaluation (every `eval_every` epochs: "
              "5, and 1 for the fine-tune); `load_at_end` is the 1-min load average when the run ended (other "
              "work on the machine slows the wall times; runs here used one thread each, two side by side).\n\n")
    (out / "recipe_search.md").write_text(header + t.to_markdown(index=False) + "\n")
    tt = merged(test_table(runs), out / "recipe_search_test.csv")
    if not tt.empty:
        tt.to_csv(out / "recipe_search_test.csv", index=False)
        (out / "recipe_search_test.md").write_text(
            "The recipes chosen on validation (results/recipe_search.md), trained on protocol official (all "
            "official training images) and measured once on the official test set of stanford_cars_small "
            "(Lite0, CPU, 1 thread per run; `python scripts/recipe_search.py --test RECIPE`; 95% Wilson "
            "interval over the test queries).\n\n" + tt.to_markdown(index=False) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
