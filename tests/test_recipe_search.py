"""scripts/recipe_search.py: the table keeps the rows of runs trained on an earlier machine."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from conftest import load_script


def _finished_run(folder: Path, p1: float) -> None:
    folder.mkdir(parents=True)
    config = {"train_backbone": False, "trainable_stages": 2, "aug_views": 0, "loss": "proxy_anchor", "proxy_lr": 0.01,
              "backbone": "efficientnet_lite0", "image_size": 160, "epochs": 10, "cpu_bf16": False}
    metrics = {"device": "cpu", "train_seconds": 100.0, "images_per_second": 50.0, "peak_memory_gib": 1.0,
               "trained": {"precision_at_1": p1, "map_at_r": 0.5}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    pd.DataFrame({"precision_at_1": [p1 - 0.1, p1]}).to_csv(folder / "history.csv", index=False)


def test_rebuilding_the_table_on_a_new_machine_keeps_the_committed_rows(tmp_path):
    search = load_script("scripts/recipe_search.py")
    runs, out = tmp_path / "runs", tmp_path / "results"
    out.mkdir()
    _finished_run(runs / "pa-k2", 0.70)
    search.write(runs, out)  # first machine: one row
    assert list(pd.read_csv(out / "recipe_search.csv")["recipe"]) == ["pa-k2"]
    runs2 = tmp_path / "runs2"  # a new machine: pa-k2's folder is gone, ms-k2 is trained here
    _finished_run(runs2 / "ms-k2", 0.65)
    search.write(runs2, out)
    table = pd.read_csv(out / "recipe_search.csv")
    assert list(table["recipe"]) == ["ms-k2", "pa-k2"]  # in RECIPES order
    assert list(table["val_precision_at_1"]) == [0.65, 0.70]
    _finished_run(runs2 / "pa-k2", 0.72)  # retrained here: the run folder wins over the committed row
    search.write(runs2, out)
    assert list(pd.read_csv(out / "recipe_search.csv")["val_precision_at_1"]) == [0.65, 0.72]
    assert "| pa-k2 " in (out / "recipe_search.md").read_text()


def test_a_recipe_starting_from_another_points_at_its_run_folder_official_from_official(tmp_path):
    search = load_script("scripts/recipe_search.py")
    name = "ft3-from-pa-k2-aug4-e20-192px"
    val = search.flags(search.RECIPES[name], tmp_path)
    test = search.flags({**search.RECIPES[name], "protocol": "official"}, tmp_path, test=True)
    assert val[val.index("--init-from") + 1] == str(tmp_path / "pa-k2-aug4-e20-192px")
    assert test[test.index("--init-from") + 1] == str(tmp_path / "pa-k2-aug4-e20-192px@official")
    assert val[val.index("--train-backbone") + 1] == "True" and "{runs}" not in " ".join(val + test)
