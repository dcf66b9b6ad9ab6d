"""Every numbered notebook runs through the study runner (papermill) on the tiny profile, in order.

The notebooks share one run folder, as in a real study run: 03 trains the models that 04-07 read.
"""

from __future__ import annotations

import datetime
import json
import os
import math
import re

import nbformat
import papermill
import pytest

from vericar import study
from vericar.report import is_rate

NOTEBOOKS = study.notebooks()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tmp_path_factory.mktemp("study") / "tiny"


def test_every_notebook_declares_its_parameters():
    """papermill silently drops a parameter line it cannot parse; every assignment in the cell must be declared."""
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(nb_path, as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, f"{nb_path.name} needs exactly one parameters cell"
        assigned = re.findall(r"^(\w+)\s*=", cells[0].source, flags=re.M)
        declared = set(papermill.inspect_notebook(str(nb_path)))
        assert set(assigned) == declared, f"{nb_path.name}: unparsed parameters {set(assigned) - declared}"
        for name in ("dataset", "data_dir", "run_dir", "seed"):
            assert name in declared, f"{nb_path.name} lacks the parameter {name}"
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_tiny_profile(notebook, tiny_run):
    extra = ["-p", "ssb_file", _synthetic_ssb_file(tiny_run)] if notebook.name.startswith("06") else []
    code = study.main(["--profile", "tiny", "--only", notebook.name[:2], "--no-progress",
                       "-p", "run_dir", str(tiny_run), *extra])
    assert code == 0, f"{notebook.name} failed; see {tiny_run / 'notebooks' / notebook.name}"
    results = tiny_run / "results" / f"{notebook.stem}.json"
    assert results.is_file(), f"{notebook.name} wrote no results file"
    payload = json.loads(results.read_text())
    entries = payload.get("entries", [payload])
    for entry in entries:
        for key in ("dataset", "protocol", "backbone", "image_size", "device", "metrics"):
            assert key in entry, f"{results.name} entry lacks {key}"
        assert entry["dataset"] == "synthetic"
        for name, value in entry["metrics"].items():  # values, not only keys: numbers, rates within [0, 1]
            assert value is None or (isinstance(value, (int, float)) and math.isfinite(value)), (name, value)
            if value is not None and is_rate(name):
                assert 0 <= value <= 1, f"{results.name}: {name} = {value} is not a rate"
    assert payload["command"].startswith("python -m vericar.study")
    assert list((tiny_run / "figures").glob(f"{notebook.name[:2]}_*.png")), f"{notebook.name} saved no figure"
    if notebook.name.startswith("06"):  # the SSB section ran on the stand-in split: every score, every group
        ssb = [e for e in entries if e.get("experiment") == "ssb-open-set"]
        assert {e["unknown"] for e in ssb} == {"easy", "hard (medium+hard)", "medium", "hard"}
        assert {"knn_plus", "knn_plus_pooled", "nn1"} <= {e["method"] for e in ssb}
        assert all(0 <= e["metrics"]["auroc"] <= 1 and 0 <= e["metrics"]["oscr"] <= 1 for e in ssb)
        # scores and k chosen on the validation models (ssb-val, open-world-val): one score per split, flagged
        for group in (ssb, [e for e in entries if e.get("experiment") == "open-set-scores"]):
            flagged = {e["method"] for e in group if e.get("chosen_on_validation")}
            assert len(flagged) == 1 and all(0 <= e["validation_auroc"] <= 1 for e in group)
            assert all(e["k_chosen_on"] == "validation model" for e in group if e["method"] == "knn_plus")


def _synthetic_ssb_file(tiny_run) -> str:
    """An SSB-style class split of the tiny SynthCars (every 2nd class known, the rest easy/medium/hard), so
    that notebook 06's SSB section runs in the tests too."""
    import pandas as pd

    from vericar.data import open_dataset

    params = {**study.PROFILES["tiny"]["all"]}
    cars = open_dataset("synthetic", study.PROJECT_ROOT / params["data_dir"], synth_config=params["synth_preset"],
                        progress=False)
    kinds = ["known", "easy", "known", "medium", "known", "hard"]
    path = tiny_run / "ssb_splits.csv"
    pd.DataFrame({"class_id": range(1, cars.num_classes + 1), "class_name": cars.class_names,
                  "ssb_split": [kinds[i % len(kinds)] for i in range(cars.num_classes)]}).to_csv(path, index=False)
    return str(path)


def test_failing_notebook_names_the_cell(tmp_path, capsys):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("run_dir = 'x'\nseed = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    path = tmp_path / "99_fail.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(study.NotebookFailed, match=r"99_fail.ipynb failed in cell \d+ \(execution count \d+\): ValueError: boom"):
        study.run_notebook(path, tmp_path / "out" / path.name, {"run_dir": str(tmp_path)}, progress=False)


def test_parameters_are_filtered_to_declared_and_paths_made_absolute():
    nb = next(p for p in NOTEBOOKS if p.name.startswith("01"))
    params = study.parameters_for(nb, "quick", {"epochs": 3, "data_dir": "data/x"})
    assert "epochs" not in params  # 01 does not declare it
    assert params["data_dir"] == str((study.PROJECT_ROOT / "data" / "x").resolve())
    assert params["dataset"] == "synthetic"


def test_publish_refuses_synthetic_results(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "01_eda.json").write_text(json.dumps({"dataset": "synthetic"}))
    with pytest.raises(SystemExit, match="refusing to publish SynthCars"):
        study.publish(tmp_path, project_root=tmp_path / "repo")


def _executed(path, dataset="stanford_cars", quick=False, exception=None):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01 · x")])
    nb.metadata["papermill"] = {"parameters": {"dataset": dataset, "quick": quick}, "exception": exception}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_publish_copies_the_executed_notebooks(tmp_path):
    run, repo = tmp_path / "run", tmp_path / "repo"
    (run / "results").mkdir(parents=True)
    (run / "results" / "01_eda.json").write_text(json.dumps({"dataset": "stanford_cars"}))
    _executed(run / "notebooks" / "01_eda.ipynb")
    (repo / "notebooks").mkdir(parents=True)
    copied = study.publish(run, project_root=repo)
    assert repo / "notebooks" / "01_eda.ipynb" in copied and repo / "results" / "01_eda.json" in copied
    assert nbformat.read(repo / "notebooks" / "01_eda.ipynb", 4).metadata["papermill"]["parameters"]["quick"] is False


def test_publish_refuses_notebooks_run_from_other_sources(tmp_path):
    """An edited notebook in the repository is not overwritten by the run's older executed copy."""
    run, repo = tmp_path / "run", tmp_path / "repo"
    (run / "results").mkdir(parents=True)
    (run / "results" / "01_eda.json").write_text(json.dumps({"dataset": "stanford_cars"}))
    _executed(run / "notebooks" / "01_eda.ipynb")
    edited = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01 · x"),
                                             nbformat.v4.new_code_cell("print('a new cell')")])
    (repo / "notebooks").mkdir(parents=True)
    nbformat.write(edited, repo / "notebooks" / "01_eda.ipynb")
    with pytest.raises(SystemExit, match=r"01_eda.ipynb were run from other sources.*--only 01"):
        study.publish(run, project_root=repo)
    assert "a new cell" in (repo / "notebooks" / "01_eda.ipynb").read_text() and not (repo / "results").exists()
    # papermill's injected parameters cell is not a source difference
    nb = nbformat.read(run / "notebooks" / "01_eda.ipynb", 4)
    injected = nbformat.v4.new_code_cell("quick = False")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells = [nb.cells[0], injected, nbformat.v4.new_code_cell("print('a new cell')")]
    nbformat.write(nb, run / "notebooks" / "01_eda.ipynb")
    assert repo / "notebooks" / "01_eda.ipynb" in study.publish(run, project_root=repo)


def test_publish_writes_what_the_run_cost(tmp_path):
    """reference_cost.json: notebooks' papermill durations + the train_seconds of models trained outside them."""
    run, repo = tmp_path / "run", tmp_path / "repo"
    (run / "results").mkdir(parents=True)
    (run / "results" / "03_training.json").write_text(json.dumps({"dataset": "stanford_cars"}))
    _executed(run / "notebooks" / "03_training.ipynb")
    nb = nbformat.read(run / "notebooks" / "03_training.ipynb", 4)
    nb.metadata["papermill"].update(duration=600.0, start_time="2026-01-01T10:00:00+00:00",
                                    end_time="2026-01-01T10:10:00+00:00")
    nbformat.write(nb, run / "notebooks" / "03_training.ipynb")
    inside = datetime.datetime(2026, 1, 1, 10, 5, tzinfo=datetime.timezone.utc).timestamp()
    for name, seconds, notebook, written in (
            ("official", 3000.0, None, None),
            ("seed", 1800.0, None, None),
            ("07_ms_seed", 100.0, "absent", inside),  # an older run folder: no field, the time window decides
            ("alongside", 900.0, "absent", inside),  # finished while 03 ran, began before it: not inside
            ("zero-shot", 200.0, "03_training", inside),  # trained by notebook 03 during its run
            ("open-world", 250.0, None, inside),  # trained by another process while 03 ran: added
            ("earlier", 150.0, "03_training", None)):  # by an earlier run of 03, loaded by this one: added
        (run / "models" / name).mkdir(parents=True)
        record = {"train_seconds": seconds} | ({} if notebook == "absent" else {"trained_in_notebook": notebook})
        (run / "models" / name / "metrics.json").write_text(json.dumps(record))
        if written:
            os.utime(run / "models" / name / "metrics.json", (written, written))
    (run / "models" / "unfinished").mkdir()  # no metrics.json: not counted
    (repo / "notebooks").mkdir(parents=True)
    study.publish(run, project_root=repo)
    cost = json.loads((repo / "results" / "reference_cost.json").read_text())
    assert cost["train_seconds_ahead"] == {"official": 3000.0, "seed": 1800.0, "alongside": 900.0,
                                           "open-world": 250.0, "earlier": 150.0}
    # in the notebook's duration already
    assert cost["train_seconds_in_notebooks"] == {"07_ms_seed": 100.0, "zero-shot": 200.0}
    assert cost["notebook_seconds"] == {"03_training": 600.0}
    assert cost["metrics"]["total_hours"] == pytest.approx((600 + 3000 + 1800 + 900 + 250 + 150) / 3600)
    assert cost["dataset"] == "stanford_cars" and cost["device"].startswith("cpu (")


def test_a_notebook_run_by_the_study_tells_its_kernel_its_name(tmp_path):
    """The kernel sees VERICAR_NOTEBOOK (models trained there record it for run_cost); the runner's own
    environment is left as it was."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os\nassert os.environ['VERICAR_NOTEBOOK'] == '99_probe', os.environ.get('VERICAR_NOTEBOOK')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "99_probe.ipynb")
    study.run_notebook(tmp_path / "99_probe.ipynb", tmp_path / "out" / "99_probe.ipynb", {}, progress=False)
    assert "VERICAR_NOTEBOOK" not in os.environ


@pytest.mark.parametrize("bad", [{"quick": True}, {"dataset": "synthetic"}, {"exception": True}])
def test_publish_refuses_notebooks_not_of_the_full_real_run(tmp_path, bad):
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    _executed(run / "notebooks" / "01_eda.ipynb", **bad)
    with pytest.raises(SystemExit, match="refusing to publish .*01_eda.ipynb"):
        study.publish(run, project_root=tmp_path / "repo")
    assert not (tmp_path / "repo" / "notebooks").exists()


def _cell_defaults(name: str) -> dict:
    import ast

    nb = next(p for p in NOTEBOOKS if p.name.startswith(name))
    return {k: ast.literal_eval(v["default"]) for k, v in papermill.inspect_notebook(str(nb)).items()}


def test_one_set_of_defaults():
    """TrainConfig's defaults are the full profile's recipe; the notebooks' parameter cells are the quick profile."""
    from vericar.config import TrainConfig

    defaults = TrainConfig()
    assert study.PROFILES["full"]["per_notebook"]["03"] == {f: getattr(defaults, f) for f in study.RECIPE_FIELDS}
    cell = _cell_defaults("03")
    quick = study.PROFILES["quick"]["per_notebook"]["03"]
    for f in study.RECIPE_FIELDS:  # the quick profile changes only what it names; the rest is the recipe
        assert cell[f] == quick.get(f, getattr(defaults, f)), f"notebook 03's {f} = {cell[f]!r}"
    for number, overrides in study.PROFILES["quick"]["per_notebook"].items():
        cell = _cell_defaults(number)
        for k, v in overrides.items():
            assert cell[k] == v, f"notebook {number}'s {k} = {cell[k]!r}, the quick profile says {v!r}"
    for k, v in study.PROFILES["quick"]["all"].items():
        for number in ("01", "03", "06"):
            if k in (cell := _cell_defaults(number)) and k not in ("data_dir", "run_dir"):
                assert cell[k] == v, f"notebook {number}'s {k} = {cell[k]!r}, the quick profile says {v!r}"


def test_publish_checks_the_notebooks_it_will_not_rerun_before_running_any(tmp_path, monkeypatch):
    run, repo = tmp_path / "run", tmp_path / "repo"
    _executed(run / "notebooks" / "01_eda.ipynb")
    (repo / "notebooks").mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01 · edited")]),
                   repo / "notebooks" / "01_eda.ipynb")
    with pytest.raises(SystemExit, match="01_eda.ipynb were run from other sources"):
        study.refuse_stale(run, repo)
    study.refuse_stale(run, repo, skip={"01_eda.ipynb"})  # about to be rerun: fine
    ran = []
    monkeypatch.setattr(study, "run_notebook", lambda *a, **k: ran.append(a) or 0.0)
    with pytest.raises(SystemExit, match="were run from other sources"):  # 01 differs from the repository's
        study.main(["--profile", "full", "--only", "02", "--publish", "-p", "run_dir", str(run)])
    assert not ran  # refused before running anything
