"""Run the study: every numbered notebook, in order, through papermill, into one run folder.

    python -m vericar.study --profile quick                 # SynthCars, CI-sized, runs/quick/
    python -m vericar.study --profile full                  # real Stanford Cars copy, runs/full/
    python -m vericar.study --profile full --publish        # ... and copy notebooks/figures/results to the repo
    python -m vericar.study --only 01 03 -p epochs 2        # some notebooks, with parameter overrides

A run folder holds ``notebooks/`` (the executed notebooks), ``figures/``, ``results/`` and the artifacts later
notebooks read (checkpoints, embeddings). Each notebook gets only the parameters its ``parameters`` cell
declares; overrides given with ``-p`` apply to every notebook that declares them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .results import COMMAND_ENV, NOTEBOOK_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"

#: The training settings notebook 03 takes as parameters. The ``full`` profile takes them from
#: :class:`~vericar.config.TrainConfig`'s defaults (the reference recipe: one recipe, no per-notebook copy);
#: notebooks 04-07 read the models notebook 03 trained, 06 and 07 train theirs with the same config.
RECIPE_FIELDS = ("backbone", "image_size", "embedding_dim", "train_backbone", "trainable_stages", "epochs",
                 "batch_size", "m_per_class", "backbone_lr", "head_lr", "weight_decay", "flip_tta", "loss", "proxy_lr",
                 "aug_views", "cpu_bf16", "eval_every")


def reference_recipe() -> dict[str, Any]:
    """The reference recipe as notebook 03's parameters: :class:`~vericar.config.TrainConfig`'s defaults."""
    defaults = TrainConfig()
    return {name: getattr(defaults, name) for name in RECIPE_FIELDS}


#: Profiles: parameters for every notebook, then per-notebook overrides keyed by the notebook's number. The
#: notebooks' parameter cells hold the ``quick`` profile (a test checks it).
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "all": {"dataset": "synthetic", "data_dir": "data/synthcars", "run_dir": "runs/quick", "quick": True,
                "device": "auto", "seed": 0},
        "per_notebook": {
            "03": {"image_size": 128, "epochs": 15, "batch_size": 64, "trainable_stages": 0, "aug_views": 0},
            "02": {"image_size": 128, "epochs": 10, "batch_size": 64, "trainable_stages": 0},
        },
    },
    "full": {
        "all": {"dataset": "stanford_cars", "data_dir": "../shared/data/stanford_cars_small", "run_dir": "runs/full",
                "quick": False, "device": "auto", "seed": 0},
        "per_notebook": {
            "03": reference_recipe(),
            "02": {"image_size": 160, "epochs": 10, "batch_size": 64, "trainable_stages": 0,
                   "gradient_image_size": 160,
                   "accumulation_variants": ["list_stack_mean", "writeup_wrong_loop", "item_accumulate", "no_grad",
                                             "inplace_leaf"]},
            # held-out models only: each other holdout (year, make) is one more ~1 h model on a CPU core
            # (scripts/reference_models.py open-world-year / open-world-make; then -p holdouts '["year","model","make"]')
            "06": {"holdouts": ["model"]},
        },
    },
    # the smallest settings that still exercise every cell; used by the tests
    "tiny": {
        "all": {"dataset": "synthetic", "data_dir": "data/synthcars_tiny", "run_dir": "runs/tiny", "quick": True,
                "device": "cpu", "seed": 0, "synth_preset": "tiny"},
        "per_notebook": {
            "03": {"backbone": "tiny_cnn", "image_size": 32, "epochs": 2, "batch_size": 16, "m_per_class": 4,
                   "trainable_stages": 1},
            "02": {"backbone": "tiny_cnn", "image_size": 32, "epochs": 2, "batch_size": 16,
                   "accumulation_variants": ["writeup_wrong_loop", "item_accumulate", "inplace_leaf"],
                   "suspects": ["shuffle", "corrupt_labels", "eval_augment"], "gradient_image_size": 32,
                   "gradient_classes": 4, "finetune_image_size": 32, "finetune_epochs": 1, "finetune_classes": 6,
                   "finetune_batch_size": 16, "torch_threads": 1},
            "04": {"purity_k": 5},
            "05": {"top_pairs": 3},
            "07": {"backbone": "tiny_cnn", "image_size": 32, "epochs": 1, "batch_size": 16, "m_per_class": 4,
                   "loss_batches": 3, "torch_threads": 1},
        },
    },
}
PATH_PARAMETERS = ("data_dir", "run_dir", "checkpoint", "train_run_dir")


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


def notebooks(only: list[str] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order, optionally only those whose number or name is given."""
    found = sorted(p for p in notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = set(only)
        found = [p for p in found if p.name[:2] in wanted or p.stem in wanted or p.name in wanted]
        if not found:
            raise SystemExit(f"no notebook matches {only} in {notebooks_dir}")
    return found


def declared_parameters(path: Path) -> dict[str, Any]:
    import papermill

    return papermill.inspect_notebook(str(path))


def notebook_parameters(path: Path) -> dict:
    """The default values of a notebook's ``parameters`` cell (its literal assignments)."""
    import ast
    import json

    cells = [c for c in json.loads(Path(path).read_text())["cells"]
             if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path} needs exactly one cell tagged 'parameters', found {len(cells)}")
    tree = ast.parse("".join(cells[0]["source"]))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def parameters_for(notebook: Path, profile: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The profile's parameters plus overrides, restricted to those the notebook declares, paths made absolute."""
    spec = PROFILES[profile]
    params = {**spec["all"], **spec["per_notebook"].get(notebook.name[:2], {}), **overrides}
    for key in PATH_PARAMETERS:
        if isinstance(params.get(key), str) and params[key]:
            params[key] = str((PROJECT_ROOT / params[key]).resolve()) if not os.path.isabs(params[key]) else params[key]
    declared = declared_parameters(notebook)
    return {k: v for k, v in params.items() if k in declared}


def run_notebook(notebook: Path, output: Path, parameters: dict[str, Any], *, progress: bool = True) -> float:
    """Execute one notebook with papermill from the notebooks' folder; return seconds; raise NotebookFailed."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    before = os.environ.get(NOTEBOOK_ENV)
    os.environ[NOTEBOOK_ENV] = notebook.stem  # the kernel inherits it: models trained here say so (run_cost)
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(notebook.parent), progress_bar=progress, request_save_on_cell_execute=True)
    except PapermillExecutionError as err:
        raise NotebookFailed(
            f"{notebook.name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}\n  the executed notebook, with the traceback, is {output}") from None
    finally:
        if before is None:
            os.environ.pop(NOTEBOOK_ENV, None)
        else:
            os.environ[NOTEBOOK_ENV] = before
    return time.perf_counter() - start


def run_cost(run_dir: Path) -> dict[str, Any]:
    """What a study run cost in wall time on its machine: each executed notebook's papermill duration, plus the
    ``train_seconds`` of every model trained outside the notebooks (ahead, by ``scripts/reference_models.py``,
    or copied in). A model trained by one of the run's notebooks during that notebook's run (its
    ``metrics.json`` names the notebook, ``trained_in_notebook``, and its training lies inside that notebook's
    papermill window) is already in the notebook's duration, so it is listed, not added again. A model trained
    alongside in another process (``scripts/reference_models.py`` while a notebook runs) names no notebook and
    is added, whatever its times. Older run folders, whose models name no notebook, fall back to the time
    window alone: inside when the whole training lies inside some notebook's run."""
    import datetime as dt
    import json

    notebooks, windows = {}, {}
    for nb in sorted((run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        meta = json.loads(nb.read_text())["metadata"].get("papermill", {})
        notebooks[nb.stem] = float(meta.get("duration") or 0)
        if meta.get("start_time") and meta.get("end_time"):
            windows[nb.stem] = tuple(dt.datetime.fromisoformat(meta[k]).timestamp() for k in ("start_time", "end_time"))
    ahead, inside = {}, {}
    for metrics in sorted((run_dir / "models").glob("*/metrics.json")):
        record = json.loads(metrics.read_text())
        seconds = record.get("train_seconds")
        if seconds is None:
            continue
        written = metrics.stat().st_mtime
        if "trained_in_notebook" in record:
            candidates = [windows[record["trained_in_notebook"]]] if record["trained_in_notebook"] in windows else []
        else:  # a run folder from before the field: the time window alone
            candidates = list(windows.values())
        trained_within = any(a <= written - seconds and written <= b for a, b in candidates)
        (inside if trained_within else ahead)[metrics.parent.name] = float(seconds)
    total = sum(notebooks.values()) + sum(ahead.values())
    return {"notebook_seconds": notebooks, "train_seconds_ahead": ahead, "train_seconds_in_notebooks": inside,
            "metrics": {"notebooks_seconds": sum(notebooks.values()), "training_seconds": sum(ahead.values()),
                        "total_hours": total / 3600, "models": len(ahead) + len(inside), "notebooks": len(notebooks)}}


def source_cells(path: Path) -> list[tuple[str, str]]:
    """A notebook's cells as ``(type, source)``, without the cell papermill injects: what it was run from."""
    import json

    cells = json.loads(path.read_text())["cells"]
    return [(c["cell_type"], "".join(c["source"])) for c in cells
            if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def refuse_stale(run_dir: Path, project_root: Path = PROJECT_ROOT, skip: set[str] = frozenset()) -> None:
    """Refuse (SystemExit) when an executed notebook of ``run_dir`` (but those named in ``skip``, about to be
    rerun) was run from other cells than the repository's: publishing it would undo the edits."""
    stale = [nb.name for nb in sorted((run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb"))
             if nb.name not in skip and (project_root / "notebooks" / nb.name).is_file()
             and source_cells(nb) != source_cells(project_root / "notebooks" / nb.name)]
    if stale:
        raise SystemExit(f"refusing to publish: the run's executed {', '.join(stale)} were run from other sources "
                         "than the repository's notebooks/ (edited since?); copying them would undo those edits. "
                         f"Rerun them into the run first (--only {' '.join(n[:2] for n in stale)}), then publish.")


def publish(run_dir: Path, project_root: Path = PROJECT_ROOT) -> list[Path]:
    """Copy a run's figures, results and executed notebooks into the repository's ``figures/``, ``results/`` and
    ``notebooks/`` (the reference run: the committed notebooks are its executed copies, outputs kept).

    Refuses, copying nothing, SynthCars results, notebooks not run on the full profile, and executed notebooks
    whose cells differ from the repository's (run from older sources: copying them would undo edits)."""
    import json

    results = sorted((run_dir / "results").glob("*.json"))
    synthetic = [p.name for p in results if json.loads(p.read_text()).get("dataset") == "synthetic"]
    if synthetic:
        raise SystemExit(f"refusing to publish SynthCars results as the reference run: {synthetic}")
    executed = sorted((run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for nb in executed:
        meta = json.loads(nb.read_text()).get("metadata", {}).get("papermill", {})
        params = meta.get("parameters", {})
        if meta.get("exception") or params.get("dataset") != "stanford_cars" or params.get("quick", True):
            raise SystemExit(f"refusing to publish {nb}: the published notebooks are the full profile's, executed "
                             f"on real data without errors (parameters: dataset={params.get('dataset')!r}, "
                             f"quick={params.get('quick')!r}, exception={meta.get('exception')!r})")
    refuse_stale(run_dir, project_root)
    from .results import write_results
    cost = run_cost(run_dir)
    write_results(run_dir, "reference_cost", {"dataset": "stanford_cars", "device": f"cpu ({os.cpu_count()} cores)", **cost},
                  note="wall time of the run on the device named: papermill durations of the executed notebooks + "
                       "train_seconds of the models trained outside them (training_seconds)")
    copied = []
    for nb in executed:
        shutil.copy2(nb, project_root / "notebooks" / nb.name)
        copied.append(project_root / "notebooks" / nb.name)
    for kind in ("figures", "results"):
        target = project_root / kind
        target.mkdir(exist_ok=True)
        for src in sorted((run_dir / kind).glob("*")):
            shutil.copy2(src, target / src.name)
            copied.append(target / src.name)
    readme = project_root / "README.md"
    if readme.is_file():
        from .report import update_readme
        update_readme(readme, project_root / "results", project_root / "benchmarks" / "results")
    return copied


def _parse_value(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vericar.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="override a parameter (Python literal or string); repeatable")
    parser.add_argument("--only", nargs="+", help="notebook numbers or names to run (default: all)")
    parser.add_argument("--publish", action="store_true",
                        help="copy the run's executed notebooks, figures/ and results/ into the repository (real data only)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    overrides = {k: _parse_value(v) for k, v in args.parameter}
    command = "python -m vericar.study " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    os.environ[COMMAND_ENV] = command
    selected = notebooks(args.only)
    run_dir = None
    if args.publish and selected:  # before hours of running, not after: the others are published as they are
        first = parameters_for(selected[0], args.profile, overrides).get("run_dir")
        refuse_stale(Path(first or PROJECT_ROOT / PROFILES[args.profile]["all"]["run_dir"]),
                     skip={nb.name for nb in selected})
    total = time.perf_counter()
    for nb in selected:
        params = parameters_for(nb, args.profile, overrides)
        run_dir = Path(params.get("run_dir") or (PROJECT_ROOT / PROFILES[args.profile]["all"]["run_dir"]))
        output = run_dir / "notebooks" / nb.name
        print(f"[vericar.study] {nb.name} -> {output}", flush=True)
        try:
            seconds = run_notebook(nb, output, params, progress=not args.no_progress)
        except NotebookFailed as err:
            print(f"[vericar.study] FAILED: {err}", file=sys.stderr, flush=True)
            return 1
        print(f"[vericar.study] {nb.name} done in {seconds:.0f} s", flush=True)
    print(f"[vericar.study] {len(selected)} notebooks in {time.perf_counter() - total:.0f} s; outputs in {run_dir}")
    if args.publish and run_dir is not None:
        copied = publish(run_dir)
        print(f"[vericar.study] published {len(copied)} files into notebooks/, figures/ and results/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
