"""scripts/reference_run.py: the long models split over the cores, longest first, then the study."""

from __future__ import annotations

import pytest
from conftest import load_script
from vericar.config import TrainConfig


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
    and retrains): the notebook reads the official model's settings from its config.json (written here as
    notebook 03 builds it, vericar.identify.recipe_config), the job from scripts' config_for."""
    import json

    from vericar import study
    from vericar.analyses import hierarchy as hier
    from vericar.identify import recipe_config

    models = load_script("scripts/reference_models.py")
    official = tmp_path / "official"
    official.mkdir()
    (official / "config.json").write_text(json.dumps({**recipe_config("full", "official")[0].to_json(),
                                                      "dataset": "Stanford Cars 196"}))
    notebook = study.NOTEBOOKS_DIR / "07_hierarchy_ablation.ipynb"
    params = {**study.notebook_parameters(notebook), **study.parameters_for(notebook, "full", {})}
    keys = ("losses", "protocols", "trainable_stages", "hierarchy_order", "level_weights", "device", "seed",
            *hier.ABLATION_FALLBACK)
    base, source, _, built = hier.ablation_configs(official, **{k: params[k] for k in keys})
    assert source == official / "config.json"
    ahead = models.hierarchy_configs()
    assert list(ahead) == list(built) and len(ahead) == 9
    assert all(ahead[key].to_json() == built[key].to_json() for key in ahead)
    assert base.image_size == TrainConfig().image_size and base.trainable_stages == 0 and not base.train_backbone
    # without the official model's folder the notebook falls back to other settings: the job must not
    assert hier.ablation_configs(tmp_path / "none", **{k: params[k] for k in keys})[0].image_size != base.image_size


def test_validation_models_are_their_models_configs_with_validation():
    from vericar.analyses import open_set

    models = load_script("scripts/reference_models.py")
    for name in ("ssb", "open-world"):
        val = models.config_for(f"{name}-val")
        assert val.validation and not models.config_for(name).validation
        assert val.to_json() == open_set.validation_config(models.config_for(name)).to_json()
        # the folder notebook 06 looks in (open_set.validation_folder) is the one this job trains into
        assert open_set.validation_folder(f"models/{name}").name == f"{name}-val"
    assert models.config_for("ssb").save_pooled and models.config_for("ssb-val").save_pooled


@pytest.mark.parametrize("model", ["ssb", "open-world"])
def test_open_set_levers_deepen_the_open_set_models_by_one_stage(model):
    levers = load_script("scripts/open_set_levers.py")
    models = load_script("scripts/reference_models.py")
    k = models.config_for(model).trainable_stages
    (test, test_dir), (val, val_dir) = levers.deeper(model), levers.deeper(f"{model}-val")
    assert (str(test_dir), str(val_dir)) == (f"{model}-k{k + 1}", f"{model}-k{k + 1}-val")
    assert test.trainable_stages == val.trainable_stages == k + 1 and val.validation and not test.validation
    assert {f for f in TrainConfig.__dataclass_fields__ if getattr(test, f) != getattr(models.config_for(model), f)} \
        == {"trainable_stages"}
