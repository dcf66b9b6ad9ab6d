"""Tests of vericar.analyses.hierarchy on a hand-built world of points on the unit circle (every number worked out here)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binomtest

from conftest import FINE_TUNE_MS
from vericar.analyses import hierarchy as ablation
from vericar.analyses.hierarchy import (DEPTH_LABELS, _sources, base_config, compare_variants, effective_level_weights,
                              error_depth, grid_configs, holm, level_outcomes, outcome_metrics, paired_comparison,
                              run_folder, train_grid)
from vericar.data.splits import Split
from vericar.losses import HierarchicalMSLoss
from vericar.metrics import level_accuracy
from vericar.retrieval import KNNIndex, hierarchical_predict

# class index: make  type    model       year
CLASSES = pd.DataFrame([
    ("A", "Sedan", "A1 Sedan", 2010),   # 0
    ("A", "Sedan", "A1 Sedan", 2012),   # 1  same model as 0, other year
    ("A", "Coupe", "A2 Coupe", 2012),   # 2
    ("B", "Sedan", "B1 Sedan", 2012),   # 3
    ("C", "SUV", "C1 SUV", 2012),       # 4  held out: make C in no database
    ("A", "Coupe", "A3 Coupe", 2012),   # 5  held out: make A and type (A, Coupe) known
    ("B", "Van", "B2 Van", 2012),       # 6  held out: make B known, (B, Van) not
], columns=["make", "type", "model", "year"])

# (class, angle in degrees): database rows 0-3, queries 4-7, held-out queries 8-10
ROWS = [(0, 0), (1, 20), (2, 40), (3, 60),
        (0, 1),    # -> row 0 (class 0): all right                       depth year
        (0, 19),   # -> row 1 (class 1): make, type, model right         depth model
        (1, 39),   # -> row 2 (class 2): make right, type wrong          depth make
        (2, 59),   # -> row 3 (class 3): make wrong                      depth none
        (5, 41),   # -> row 2 (class 2): make + type right, model wrong; make and type known
        (4, 61),   # -> row 3 (class 3): make wrong; make unknown
        (6, 58)]   # -> row 3 (class 3): make right, type wrong; make known, type unknown
LABELS = np.array([c for c, _ in ROWS])
ANGLES = np.deg2rad([a for _, a in ROWS])
EMB = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1).astype(np.float32)
SPLIT = Split("open-world", train=np.arange(4), database=np.arange(4), query=np.arange(4, 8),
              ood_query=np.arange(8, 11), heldout_class_ids=np.array([5, 6, 7]))


def outcomes(queries="query", k=1, emb=EMB):
    return level_outcomes(emb, LABELS, SPLIT, CLASSES, queries=queries, k=k)


def test_level_outcomes_by_hand():
    o = outcomes()
    assert list(o["row"]) == [4, 5, 6, 7]
    assert list(o["pred_class"]) == [0, 1, 2, 3]
    assert list(o["correct_make"]) == [True, True, True, False]
    assert list(o["correct_type"]) == [True, True, False, False]
    assert list(o["correct_model"]) == [True, True, False, False]
    assert list(o["correct_year"]) == [True, False, False, False]
    assert list(o["depth"]) == ["year", "model", "make", "none"]
    for level in ("make", "type", "model", "year"):
        assert o[f"known_{level}"].all()


def test_level_outcomes_agree_with_level_accuracy():
    o = outcomes()
    index = KNNIndex(EMB[:4], LABELS[:4])
    dist, nb = index.search(EMB[4:8], 1)
    expected = level_accuracy(hierarchical_predict(index.labels[nb], dist, CLASSES), LABELS[4:8], CLASSES)
    got = outcome_metrics(o)
    for key in ("accuracy_make", "accuracy_type", "accuracy_model", "accuracy_year",
                "make_right_given_class_wrong", "type_right_given_class_wrong", "n_queries", "n_class_wrong"):
        assert got[key] == pytest.approx(expected[key])
    assert got["accuracy_make"] == 0.75 and got["make_right_given_class_wrong"] == pytest.approx(2 / 3)


def test_held_out_queries_known_levels_and_metrics():
    o = outcomes("ood_query")
    assert list(o["row"]) == [8, 9, 10]
    assert list(o["correct_make"]) == [True, False, True]
    assert list(o["correct_type"]) == [True, False, False]
    assert not o["correct_model"].any() and not o["correct_year"].any()
    assert list(o["known_make"]) == [True, False, True]
    assert list(o["known_type"]) == [True, False, False]
    assert not o["known_model"].any() and not o["known_year"].any()
    m = outcome_metrics(o, prefix="ood_")
    assert m["ood_accuracy_make"] == pytest.approx(2 / 3)
    assert m["ood_accuracy_make_known"] == 1.0          # both queries whose make exists get it right
    assert m["ood_make_known_fraction"] == pytest.approx(2 / 3)
    assert m["ood_accuracy_type_known"] == 1.0 and m["ood_type_known_fraction"] == pytest.approx(1 / 3)
    assert np.isnan(m["ood_accuracy_model_known"])      # no held-out model is in the database
    assert m["ood_n_class_wrong"] == 3


def test_leave_one_out_known_excludes_the_query_itself():
    # class 0 has two images, class 1 one: under leave-one-out class 1's own year key is not in the database,
    # its model key (shared with class 0) is.
    labels = np.array([0, 0, 1])
    emb = np.array([[1, 0], [1, 0.05], [0.9, 0.4]], dtype=np.float32)
    split = Split("zero-shot", train=np.zeros(0, np.int64), database=np.arange(3), query=np.arange(3))
    o = level_outcomes(emb, labels, split, CLASSES)
    assert list(o["pred_class"]) == [0, 0, 0]  # never itself
    assert list(o["known_year"]) == [True, True, False]
    assert o["known_model"].all()
    assert list(o["correct_year"]) == [True, True, False]
    assert list(o["depth"]) == ["year", "year", "model"]


def test_depth_needs_every_coarser_level_right():
    # k=5 votes: two neighbours of (A, Coupe), three of B with three different types. make -> B (3 votes),
    # type -> (A, Coupe) (2 votes). A query of class 2 is type-right but make-wrong: depth "none".
    table = pd.DataFrame([("A", "Coupe", "A2 Coupe", 2012), ("B", "Sedan", "B1", 2012), ("B", "SUV", "B2", 2012),
                          ("B", "Van", "B3", 2012)], columns=["make", "type", "model", "year"])
    labels = np.array([0, 0, 1, 2, 3, 0])
    ang = np.deg2rad([0, 1, 2, 3, 4, 0.5])
    emb = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    split = Split("seed", train=np.arange(5), database=np.arange(5), query=np.array([5]))
    o = level_outcomes(emb, labels, split, table, k=5)
    assert not o.loc[0, "correct_make"] and o.loc[0, "correct_type"]
    assert o.loc[0, "depth"] == "none"


def test_level_outcomes_errors_and_empty():
    with pytest.raises(ValueError, match="queries"):
        level_outcomes(EMB, LABELS, SPLIT, CLASSES, queries="database")
    with pytest.raises(ValueError, match="labels"):
        level_outcomes(EMB, LABELS[:3], SPLIT, CLASSES)
    empty = Split("seed", train=np.arange(4), database=np.arange(4), query=np.arange(4, 8))
    o = level_outcomes(EMB, LABELS, empty, CLASSES, queries="ood_query")
    assert len(o) == 0 and "correct_make" in o and "depth" in o
    assert np.isnan(outcome_metrics(o)["accuracy_make"])


def test_error_depth_shares():
    d = error_depth(outcomes())
    assert list(d.index) == list(DEPTH_LABELS.values())
    # class-wrong queries: depth model, make, none
    assert d.to_dict() == pytest.approx({"other make": 1 / 3, "right make": 1 / 3, "right make + type": 0.0,
                                         "right model, other year": 1 / 3})
    assert d.attrs["n"] == 3
    d_all = error_depth(outcomes(), relative_to="all")
    assert d_all.sum() == pytest.approx(0.75) and d_all.attrs["n"] == 4
    held = error_depth(outcomes("ood_query"))
    assert held["right make + type"] == pytest.approx(1 / 3) and held["other make"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        error_depth(outcomes(), relative_to="queries")


def test_paired_comparison_counts_ci_and_mcnemar():
    base = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 1], bool)
    var = np.array([1, 0, 1, 1, 1, 1, 1, 0, 1, 1], bool)
    r = paired_comparison(base, var)
    assert (r["n"], r["base_only"], r["variant_only"]) == (10, 1, 4)
    assert r["accuracy_base"] == 0.5 and r["accuracy_variant"] == 0.8
    assert r["diff"] == pytest.approx(0.3)
    se = np.sqrt((1 + 4 - 3**2 / 10) / 100)
    assert r["ci_high"] - r["diff"] == pytest.approx(1.959964 * se, rel=1e-5)
    assert r["p_value"] == pytest.approx(binomtest(4, 5, 0.5).pvalue) == pytest.approx(0.375)
    same = paired_comparison(base, base)
    assert same["p_value"] == 1.0 and same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0
    assert np.isnan(paired_comparison([], [])["p_value"])
    with pytest.raises(ValueError):
        paired_comparison(base, var[:3])


def test_holm():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.5, np.nan, 0.01])
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.5) and out[2] == pytest.approx(0.02)
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 * 0.8 capped at 1; monotone
    assert np.isnan(holm([np.nan])).all()


def test_compare_variants_pairs_with_the_baseline():
    base = outcomes()
    better = base.copy()
    better["correct_year"] = True  # the variant gets every class right
    table = compare_variants({("ms", "seed"): base, ("hims_min", "seed"): better, ("hims_max", "seed"): base},
                             levels=["make", "year"])
    assert set(table["variant"]) == {"hims_min", "hims_max"} and set(table["group_0"]) == {"seed"}
    row = table[(table["variant"] == "hims_min") & (table["level"] == "year")].iloc[0]
    assert (row["base_only"], row["variant_only"], row["diff"]) == (0, 3, 0.75)
    assert row["p_holm"] == pytest.approx(min(1.0, 4 * binomtest(3, 3, 0.5).pvalue))
    assert (table["verdict"] == "no significant difference").all()  # 3 queries cannot be significant
    # restricted to queries whose label exists in the database
    held = outcomes("ood_query")
    t2 = compare_variants({("ms", "ow"): held, ("hims_min", "ow"): held}, levels=["make", "type"],
                          restrict_to_known=True)
    assert list(t2["n"]) == [2, 1]
    with pytest.raises(KeyError):
        compare_variants({("hims_min", "seed"): base})
    with pytest.raises(ValueError, match="different queries"):
        compare_variants({("ms", "seed"): base, ("hims_min", "seed"): base.iloc[:2]})


@pytest.mark.parametrize("constraint", ["min", "max", "none"])
@pytest.mark.parametrize("order", ["fine_to_coarse", "coarse_to_fine"])
def test_sources_match_the_loss_constraint(constraint, order):
    rng = np.random.default_rng(0)
    loss = HierarchicalMSLoss(constraint=constraint, order=order)
    for _ in range(20):
        raw = rng.random(4)
        constrained = [float(c) for c in loss.constrain([torch.tensor(r) for r in raw])]
        assert raw[_sources(raw, constraint, order)] == pytest.approx(constrained)


def test_sources_by_hand():
    falling = np.array([4.0, 3.0, 2.0, 1.0])  # make loss largest, year smallest
    assert list(_sources(falling, "min", "fine_to_coarse")) == [3, 3, 3, 3]  # everything is the year loss
    assert list(_sources(falling, "max", "fine_to_coarse")) == [0, 1, 2, 3]  # inactive
    assert list(_sources(falling, "max", "coarse_to_fine")) == [0, 0, 0, 0]
    assert list(_sources(falling, "min", "coarse_to_fine")) == [0, 1, 2, 3]


def test_effective_level_weights_shares():
    rng = np.random.default_rng(1)
    ci = np.repeat(np.arange(4), 6)
    emb = rng.normal(size=(len(ci), 8)).astype(np.float32)
    w = effective_level_weights(emb, ci, CLASSES.iloc[:4], constraints=["min", "max", "none"], batch_size=16,
                                m_per_class=4, n_batches=3)
    assert list(w["constraint"]) == ["min", "max", "none"]
    levels = ["make", "type", "model", "year"]
    assert w[levels].sum(axis=1).to_numpy() == pytest.approx(1.0)
    none = w.set_index("constraint").loc["none"]
    assert [none[l] for l in levels] == pytest.approx([0.25] * 4) and none["binding"] == 0
    raw = w.iloc[0][[f"raw_{l}" for l in levels]].to_numpy(dtype=float)
    assert np.isfinite(raw).all() and (raw >= 0).all()
    with pytest.raises(ValueError):
        effective_level_weights(emb, ci[:-1], CLASSES.iloc[:4])


def test_base_config_reads_reference_and_applies_overrides(tmp_path):
    from vericar.config import TrainConfig

    ref = tmp_path / "official"
    ref.mkdir()
    (ref / "config.json").write_text(json.dumps({**TrainConfig(backbone="tiny_cnn", image_size=48, epochs=3)
                                                 .to_json(), "dataset": "x", "data_root": "y"}))
    cfg, source = base_config(ref, image_size=None, epochs=5, trainable_stages=0)
    assert source == ref / "config.json"
    assert (cfg.backbone, cfg.image_size, cfg.epochs, cfg.trainable_stages) == ("tiny_cnn", 48, 5, 0)
    cfg2, source2 = base_config(tmp_path / "missing", image_size=96)
    assert source2 is None and cfg2.image_size == 96 and cfg2.backbone == TrainConfig().backbone
    with pytest.raises(ValueError, match="unknown"):
        base_config(None, not_a_field=1)


def test_grid_configs_change_only_loss_protocol_and_kwargs():
    from vericar.config import TrainConfig

    base = TrainConfig(**FINE_TUNE_MS, backbone="tiny_cnn", image_size=32, epochs=2, batch_size=16)
    grid = grid_configs(base, ["ms", "hims_min"], ["seed", "zero-shot"], hierarchical_kwargs={"order": "coarse_to_fine"})
    assert list(grid) == [("ms", "seed"), ("ms", "zero-shot"), ("hims_min", "seed"), ("hims_min", "zero-shot")]
    assert grid[("ms", "seed")].loss_kwargs == {}
    assert grid[("hims_min", "zero-shot")].loss_kwargs == {"order": "coarse_to_fine"}
    for (loss, protocol), cfg in grid.items():
        differing = {k for k, v in cfg.to_json().items() if base.to_json()[k] != v}
        assert differing <= {"loss", "protocol", "loss_kwargs"}
        assert (cfg.loss, cfg.protocol) == (loss, protocol)


def test_train_grid_folders(monkeypatch, tmp_path):
    from vericar import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "train", lambda cars, config, folder, **kw: calls.append((config, folder, kw))
                        or folder)
    from vericar.config import TrainConfig

    grid = grid_configs(TrainConfig(), ["ms", "hims_max"], ["open-world"])
    runs = train_grid(None, grid, tmp_path)
    assert runs == {("ms", "open-world"): tmp_path / "07_ms_open-world",
                    ("hims_max", "open-world"): tmp_path / "07_hims_max_open-world"}
    assert calls[0][2] == {"progress": False}
    assert run_folder("m", "hims_min", "seed", prefix="08").as_posix() == "m/08_hims_min_seed"
    assert ablation.ABLATION_LOSSES["hims_min"] == "HiMS-Min"


def test_heldout_level_table_counts_only_eligible_queries():
    import pandas as pd

    from vericar.analyses.hierarchy import heldout_level_table

    o = pd.DataFrame({"known_make": [True, True, True, False], "correct_make": [True, True, False, False],
                      "known_type": [True, False, False, False], "correct_type": [True, False, False, False]})
    t = heldout_level_table({("ms", "open-world"): o}, {"ms": "MS"}).set_index("level")
    assert t.loc["make", "accuracy"] == 2 / 3 and t.loc["make", "eligible"] == 3
    assert t.loc["make", "accuracy_all_ood"] == 0.5 and t.loc["type", "accuracy"] == 1.0
    assert t.loc["make", "ci_low"] < 2 / 3 < t.loc["make", "ci_high"] and set(t["loss"]) == {"MS"}
