"""Train the reference run's models ahead of the notebooks, one per call, so that they can run in parallel.

    python scripts/reference_models.py official --run-dir ~/.cache/vericar/full     # then: seed, zero-shot, ...
    python -m vericar.study --profile full -p run_dir ~/.cache/vericar/full            # loads them, trains nothing

Each model is trained exactly as the notebook that owns it would train it (same config, same run folder), so
the notebooks find it finished and load it: ``official``, ``seed``, ``zero-shot`` and ``open-world`` as
notebook 03 does (the full profile's recipe, :func:`vericar.study.reference_recipe`), ``open-world-year``,
``open-world-make`` and ``ssb`` as notebook 06 does (the open-world config with another holdout, or protocol
``ssb`` with the pooled features saved), ``open-world-val`` and ``ssb-val``, the validation models notebook 06
trains beside ``open-world`` and ``ssb`` to choose its open-set scores on (``validation=True``), and ``hierarchy``: the nine models of notebook 07's ablation (MS, HiMS-Min,
HiMS-Max x seed, zero-shot, open-world; head only, on the reference run's settings). On two CPU cores, two calls side by side (each ``OMP_NUM_THREADS=1``
and pinned to a core with ``taskset``) train two models in the time of one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from vericar import study
from vericar.analyses import hierarchy as hier, open_set
from vericar.config import TrainConfig
from vericar.data import open_dataset
from vericar.train import train

MODELS = ("official", "seed", "zero-shot", "open-world", "open-world-year", "open-world-make", "ssb", "ssb-val",
          "open-world-val", "hierarchy")


def config_for(name: str) -> TrainConfig:
    """The config notebook 03 (protocols) or notebook 06 (holdouts, SSB) builds for ``name``."""
    full = study.PROFILES["full"]["all"]
    base = TrainConfig(protocol="official", device=full["device"], seed=full["seed"], **study.reference_recipe())
    if name in ("official", "seed", "zero-shot", "open-world"):
        return dataclasses.replace(base, protocol=name)
    if name.endswith("-val"):  # the validation model notebook 06 trains beside it (open_set.train_validation_run)
        return open_set.validation_config(config_for(name[:-len("-val")]))
    if name.startswith("open-world-"):
        return dataclasses.replace(base, protocol="open-world", holdout=name.split("-")[-1])
    return open_set.ssb_config(base)


def hierarchy_configs() -> dict[tuple[str, str], TrainConfig]:
    """The configs notebook 07 trains in the full profile (its parameters, :func:`hierarchy.ablation_configs`),
    with the official model's settings, which the notebook reads from that model's ``config.json``, taken from
    its config here (it may not be written yet); folders ``07_<loss>_<protocol>``."""
    notebook = study.NOTEBOOKS_DIR / "07_hierarchy_ablation.ipynb"
    params = {**study.notebook_parameters(notebook), **study.parameters_for(notebook, "full", {})}
    official = config_for("official")
    given = {k: getattr(official, k) if params[k] is None else params[k] for k in hier.ABLATION_FALLBACK}
    return hier.ablation_configs(None, losses=params["losses"], protocols=params["protocols"],
                                 trainable_stages=params["trainable_stages"], hierarchy_order=params["hierarchy_order"],
                                 level_weights=params["level_weights"], device=params["device"], seed=params["seed"],
                                 **given)[3]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", choices=MODELS)
    parser.add_argument("--run-dir", type=Path, required=True, help="the study run folder (models go to models/)")
    args = parser.parse_args(argv)
    data_dir = (study.PROJECT_ROOT / study.PROFILES["full"]["all"]["data_dir"]).resolve()
    cars = open_dataset("stanford_cars", str(data_dir))
    for name in args.models:
        start = time.perf_counter()
        if name == "hierarchy":
            runs = hier.train_grid(cars, hierarchy_configs(), args.run_dir / "models", progress=True)
            done = {"train_seconds": sum(r.metrics["train_seconds"] for r in runs.values())}
        else:
            run = train(cars, config_for(name), args.run_dir / "models" / name)
            done = {"trained": run.metrics["trained"]["precision_at_1"], "train_seconds": run.metrics["train_seconds"]}
        # wall_seconds: this call's time, with the trunk cache and evaluations that train_seconds leaves out (all
        # of it when the model was trained here from the start: reference_run.COST is made of these)
        print(json.dumps({"model": name, **done, "wall_seconds": round(time.perf_counter() - start),
                          "finished_at": time.strftime("%H:%M:%S")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
