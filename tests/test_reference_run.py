"""scripts/reference_run.py: the long models split over the cores, longest first, then the study."""

from __future__ import annotations

from conftest import load_script


def test_models_are_balanced_over_the_cores_longest_first():
    run = load_script("scripts/reference_run.py")
    two = run.queues(list(run.COST), 2)
    assert sorted(m for q in two for m in q) == sorted(run.COST) and len(two) == 2
    loads = [sum(run.COST[m] for m in q) for q in two]
    assert max(loads) - min(loads) <= min(run.COST.values())  # no queue ends more than one short model late
    assert two[0][0] == "official"  # the longest starts first
    assert run.queues(["seed"], 2) == [["seed"]]  # never an empty queue
    assert run.queues(list(run.COST), 1) == [sorted(run.COST, key=lambda m: -run.COST[m])]


def test_dry_run_prints_one_pinned_single_threaded_queue_per_core_then_the_study(tmp_path, capsys):
    run = load_script("scripts/reference_run.py")
    assert run.main(["--run-dir", str(tmp_path / "ref"), "--cores", "1", "--models", "seed", "ssb",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "taskset -c" in out[0] and "reference_models.py seed ssb --run-dir" in out[0]
    assert out[1].endswith(f"-m vericar.study --profile full -p run_dir {tmp_path / 'ref'} --no-progress --publish")
    assert not (tmp_path / "ref").exists()  # a dry run makes nothing


def test_the_hierarchy_job_trains_the_models_notebook_07_would(tmp_path):
    """Trained ahead, notebook 07 must find its nine models finished with its own configs (else it refuses them
    and retrains): its parameter defaults and the config it builds from the official model's folder."""
    import json

    import papermill as pm

    from vericar import study
    from vericar.analyses import hierarchy as hier

    models = load_script("scripts/reference_models.py")
    params = {k: v["default"] for k, v in pm.inspect_notebook(str(study.NOTEBOOKS_DIR / "07_hierarchy_ablation.ipynb")).items()}
    assert "07" not in study.PROFILES["full"]["per_notebook"]  # the full profile keeps 07's defaults
    for key, value in models.HIERARCHY.items():
        assert eval(params[key]) == value, key  # noqa: S307 (the notebook's own literal)
    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text(json.dumps({**models.config_for("official").to_json(), "dataset": "x"}))
    given = hier.reference_settings(official, {"backbone": None, "image_size": None, "epochs": None,
                                               "batch_size": None, "m_per_class": None}, {})
    base, _ = hier.base_config(official, **given, train_backbone=False, trainable_stages=0, device="auto", seed=0,
                               loss="ms", loss_kwargs={})
    notebook = hier.grid_configs(base, models.HIERARCHY["losses"], models.HIERARCHY["protocols"],
                                 hierarchical_kwargs={"order": "fine_to_coarse", "level_weights": [1.0] * 4})
    ahead = models.hierarchy_configs()
    assert list(ahead) == list(notebook) and len(ahead) == 9
    assert all(ahead[key].to_json() == notebook[key].to_json() for key in ahead)
    assert ahead["hims_max", "seed"].image_size == models.config_for("official").image_size
