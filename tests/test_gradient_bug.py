"""vericar.analyses.gradient_bug: the label corruption, batch coverage, the comparison grid and the verdicts of notebook 02."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REAL_SMALL, requires_real_data

from vericar import plots
from vericar.analyses.seed_losses import (ACCUMULATION_VARIANTS, GRAPH_CUTTING_VARIANTS, GRAPH_PRESERVING_VARIANTS,
                                          RAISING_VARIANTS, gradient_report)
from vericar.losses import make_loss
from vericar.models import build_model
from vericar.analyses.gradient_bug import (SUSPECTS, Comparison, class_subset, classify_outcomes,
                                   comparison_variants, corrupted_test_accuracy, expected_gradient_verdict,
                                   gradient_verdicts, label_corruption_summary, positive_coverage, real_batch,
                                   run_comparison, unlabelled_test_file_labels, verdict_groups)

matplotlib.use("Agg")


# --------------------------------------------------------------------------------------------------
# Label corruption
# --------------------------------------------------------------------------------------------------

def _toy_table():
    # 3 classes; box bottoms repeat across classes (rows 0/3 share 120, rows 1/4/5 share 300)
    return pd.DataFrame({
        "class_id": [1, 1, 2, 2, 3, 3, 3],
        "bbox_y2": [11, 12, 13, 14, 15, 16, 17],            # stored-image boxes: ignored when orig_* exists
        "orig_bbox_y2": [120, 300, 250, 120, 300, 300, 1103],
        "split": ["test"] * 7,
    })


def test_corruption_reads_the_devkit_box_bottom():
    t = _toy_table()
    np.testing.assert_array_equal(unlabelled_test_file_labels(t), [120, 300, 250, 120, 300, 300, 1103])
    np.testing.assert_array_equal(unlabelled_test_file_labels(t, [6, 0]), [1103, 120])
    # without orig_* (devkit layout, SynthCars) the table's own bbox_y2
    np.testing.assert_array_equal(unlabelled_test_file_labels(t.drop(columns="orig_bbox_y2")), t["bbox_y2"])
    np.testing.assert_array_equal(unlabelled_test_file_labels(t, column="bbox_y2"), t["bbox_y2"])
    # mod: folded into the class id range
    np.testing.assert_array_equal(unlabelled_test_file_labels(t, mode="mod", num_classes=196),
                                  np.array([120, 300, 250, 120, 300, 300, 1103]) % 196)
    assert unlabelled_test_file_labels(t).dtype == np.int64


def test_corruption_errors():
    t = _toy_table()
    with pytest.raises(ValueError, match="mode"):
        unlabelled_test_file_labels(t, mode="shift")
    with pytest.raises(ValueError, match="num_classes"):
        unlabelled_test_file_labels(t, mode="mod")
    with pytest.raises(ValueError, match="no box"):
        unlabelled_test_file_labels(t.drop(columns=["bbox_y2", "orig_bbox_y2"]))
    with pytest.raises(ValueError, match="no column"):
        unlabelled_test_file_labels(t, column="y2")


def test_corruption_summary_counts():
    t = _toy_table()
    s = label_corruption_summary(t["class_id"] - 1, unlabelled_test_file_labels(t))
    assert s["images"] == 7 and s["true_classes"] == 3
    assert s["pseudo_classes"] == 4                          # 120, 300, 250, 1103
    assert s["singleton_fraction"] == pytest.approx(2 / 7)  # 250 and 1103 are alone
    assert s["images_per_pseudo_class"] == pytest.approx(7 / 4)
    assert s["agreement"] == 0.0
    # same-pseudo pairs: 120 -> (0,3): classes 1,2 differ; 300 -> (1,4),(1,5),(4,5): only (4,5) same class
    assert s["pair_precision"] == pytest.approx(1 / 4)
    # same-true pairs 1 + 1 + 3 = 5 of 21
    assert s["chance_pair_precision"] == pytest.approx(5 / 21)
    with pytest.raises(ValueError):
        label_corruption_summary([1, 2], [1])


def test_corrupted_test_accuracy_on_a_toy_dataset():
    # 2 train images per class (database), test images whose box bottom equals their class id for one image
    table = pd.DataFrame({"class_id": [1, 2, 3, 1, 2, 3], "split": ["train"] * 3 + ["test"] * 3,
                          "bbox_y2": [50, 60, 70, 1, 90, 95]})

    class Toy:
        pass

    cars = Toy()
    cars.table, cars.num_classes = table, 3
    emb = np.eye(3)[[0, 1, 2, 0, 1, 2]].astype(np.float32)  # a perfect embedding
    out = corrupted_test_accuracy(emb, cars, database_rows=[0, 1, 2])
    assert out["test_images"] == 3 and out["pseudo_classes"] == 3
    assert out["accuracy_true_labels"] == 1.0
    assert out["accuracy_corrupted_labels"] == pytest.approx(1 / 3)   # only the image with bbox_y2 == class 1
    assert out["oracle_corrupted"] == pytest.approx(1 / 3)
    assert out["chance_corrupted"] == pytest.approx((1 / 3) / 3)      # one value inside 1..3, hit with p 1/3


@requires_real_data
def test_real_test_file_gives_1103_classes():
    t = pd.read_csv(REAL_SMALL / "labels.csv")
    test = np.flatnonzero((t["split"] == "test").to_numpy())
    assert len(np.unique(unlabelled_test_file_labels(t, test))) == 1103   # the seed's reported count


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------

def test_positive_coverage():
    labels = np.repeat(np.arange(40), 10)
    assert positive_coverage(labels, 32, "m_per_class", 4) == 1.0
    shuffled = positive_coverage(labels, 32, "shuffle", epochs=3)
    expected = 1 - (1 - 9 / 399) ** 31  # chance that one of 31 others shares the class (without replacement, approx.)
    assert shuffled == pytest.approx(expected, abs=0.08) and shuffled < 1
    assert positive_coverage(np.arange(64), 32, "shuffle") == 0.0  # every image its own class


def test_real_batch_and_class_subset(tiny_synth):
    cars = tiny_synth
    model = build_model("tiny_cnn", pretrained=False, embedding_dim=16, hidden_dim=32)
    x, y, rows = real_batch(cars, np.arange(len(cars)), model.spec, 32, n_classes=3, m_per_class=2, seed=1)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert len(np.unique(y.numpy())) == 3 and np.all(np.bincount(y.numpy())[np.unique(y.numpy())] == 2)
    np.testing.assert_array_equal(y.numpy(), cars.labels[rows])
    sub = class_subset(cars, 4, seed=0)
    assert sub.table["class_id"].nunique() == 4 and sub.num_classes == cars.num_classes
    assert class_subset(cars, None) is cars
    kept = set(sub.table["class_id"])
    assert len(sub) == int(cars.table["class_id"].isin(kept).sum())


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    from vericar.data import open_dataset

    return open_dataset("synthetic", tmp_path_factory.mktemp("synth") / "tiny", synth_config="tiny", progress=False)


# --------------------------------------------------------------------------------------------------
# Gradients: the notebook's classification agrees with vericar.analyses.seed_losses
# --------------------------------------------------------------------------------------------------

def test_gradient_verdicts_agree_with_losses_module():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", pretrained=False, embedding_dim=32, hidden_dim=64)
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    report = gradient_verdicts(gradient_report(model, images, labels))
    got = dict(zip(report["variant"], report["verdict"]))
    assert got.pop("ms") == "reference"
    assert got == {v: expected_gradient_verdict(v) for v in ACCUMULATION_VARIANTS}
    assert {v for v, g in got.items() if g == "same gradient as pml"} == set(GRAPH_PRESERVING_VARIANTS)
    assert {v for v, g in got.items() if g == "no gradient reaches the model"} == set(GRAPH_CUTTING_VARIANTS)
    assert {v for v, g in got.items() if g == "raises"} == set(RAISING_VARIANTS)
    # every variant that runs reports the reference's loss value: the value cannot tell them apart
    ok = report[report["verdict"] != "raises"]
    assert ok["loss_matches"].all()
    fig = plots.gradient_norms_figure(report)
    assert fig.axes
    with pytest.raises(ValueError):
        expected_gradient_verdict("sum")


def test_gradient_verdicts_flags_a_different_gradient():
    report = pd.DataFrame([
        {"variant": "ms", "role": "reference", "loss": 1.0, "error": None, "reaches_backbone": True,
         "reaches_head": True, "cos_all": 1.0, "rel_diff_all": 0.0},
        {"variant": "x", "role": "variant", "loss": 2.0, "error": None, "reaches_backbone": True,
         "reaches_head": True, "cos_all": 0.5, "rel_diff_all": 0.9},
    ])
    out = gradient_verdicts(report)
    assert list(out["verdict"]) == ["reference", "different gradient"]
    assert list(out["loss_matches"]) == [True, False]


# --------------------------------------------------------------------------------------------------
# The grid and the verdicts
# --------------------------------------------------------------------------------------------------

def test_comparison_variants():
    vs = comparison_variants()
    names = [v.name for v in vs]
    assert names[0] == "ms" and len(names) == len(set(names))
    assert [n for n in names if n.startswith("accum:")] == [f"accum:{a}" for a in ACCUMULATION_VARIANTS]
    by = {v.name: v for v in vs}
    assert by["accum:detach"].overrides == {"loss": "ms_accum:detach"}
    assert by["shuffle"].overrides == {"sampler": "shuffle"}
    assert by["corrupt_labels"].corrupt_labels and not by["corrupt_labels"].overrides
    assert by["finetune_eval_augment"].overrides == {"eval_augment": True}
    assert by["finetune_eval_augment"].reference == "finetune" and by["finetune_eval_augment"].affects == "evaluation"
    assert by["finetune"].kind == "finetune" and by["finetune"].reference == "finetune"
    assert by["accum:no_grad"].folder_name == "accum_no_grad"
    assert [v.name for v in comparison_variants([], [])] == ["ms"]
    assert set(SUSPECTS) == {"shuffle", "corrupt_labels", "seed_hier_clamp", "hims_min", "eval_augment"}
    for s in ("seed_hier_clamp", "hims_min"):
        make_loss(by[s].overrides["loss"])  # a registered loss
    with pytest.raises(ValueError, match="unknown variants"):
        comparison_variants(["sum"])


def _final(rows):
    cols = dict(group="g", kind="cached", affects="training", error=None, n_query=400, frozen_precision_at_1=0.40,
                loss_first=1.0, loss_last=0.5, loss_change=-0.5, description="")
    return pd.DataFrame([{**cols, **r} for r in rows])


def test_classify_outcomes():
    final = _final([
        {"variant": "ms", "reference": "ms", "precision_at_1": 0.70},
        {"variant": "same", "reference": "ms", "precision_at_1": 0.69},
        {"variant": "slow", "reference": "ms", "precision_at_1": 0.55},
        {"variant": "broken", "reference": "ms", "precision_at_1": 0.38},
        {"variant": "better", "reference": "ms", "precision_at_1": 0.85},
        {"variant": "boom", "reference": "ms", "precision_at_1": np.nan, "error": "RuntimeError: leaf\nmore"},
        {"variant": "late", "reference": "ms", "precision_at_1": 0.70},
        {"variant": "ft", "reference": "ft", "precision_at_1": 0.60},
        {"variant": "ft_aug", "reference": "ft", "precision_at_1": 0.45, "affects": "evaluation"},
    ])
    hist = pd.DataFrame(
        [{"variant": "ms", "epoch": e, "precision_at_1": p} for e, p in zip(range(1, 6), [0.5, 0.66, 0.7, 0.7, 0.7])]
        + [{"variant": "late", "epoch": e, "precision_at_1": p} for e, p in zip(range(1, 6), [0.4, 0.45, 0.5, 0.6, 0.7])])
    out = classify_outcomes(final, hist).set_index("variant")
    assert out.loc["ms", "verdict"] == "reference"
    assert out.loc["same", "verdict"] == "no change"
    assert out.loc["slow", "verdict"] == "slows learning"
    assert out.loc["broken", "verdict"] == "breaks learning"
    assert out.loc["better", "verdict"] == "better"
    assert out.loc["boom", "verdict"] == "raises" and out.loc["boom", "reason"] == "RuntimeError: leaf"
    assert out.loc["late", "verdict"] == "slows learning" and "epochs later" in out.loc["late", "reason"]
    assert out.loc["ft_aug", "verdict"] == "lowers measured accuracy"
    # without histories, 'late' cannot be told from the reference
    assert classify_outcomes(final).set_index("variant").loc["late", "verdict"] == "no change"
    groups = verdict_groups(out.reset_index())
    assert groups["breaks learning"] == ["broken"] and "ms" not in sum(groups.values(), [])
    fig = plots.final_precision_figure(out.reset_index())
    assert fig.axes


def test_classify_outcomes_inconclusive_when_reference_learns_nothing():
    final = _final([{"variant": "ms", "reference": "ms", "precision_at_1": 0.41},
                    {"variant": "x", "reference": "ms", "precision_at_1": 0.10}])
    assert classify_outcomes(final).set_index("variant").loc["x", "verdict"] == "inconclusive"


def test_run_comparison_on_tiny_data(tiny_synth, tmp_path):
    from vericar.config import TrainConfig

    cars = tiny_synth
    base = TrainConfig(protocol="seed", backbone="tiny_cnn", image_size=32, train_backbone=False, trainable_stages=0,
                       epochs=1, batch_size=16, m_per_class=4, device="cpu")
    variants = comparison_variants(["item_accumulate", "inplace_leaf"], ["corrupt_labels"])
    comp = run_comparison(cars, variants, base, tmp_path, cache_dir=tmp_path / "cache")
    assert isinstance(comp, Comparison)
    assert comp.runs["accum:inplace_leaf"] is None
    assert "leaf Variable" in comp.errors["accum:inplace_leaf"]
    assert comp.folders["accum:item_accumulate"] == tmp_path / "models" / "02_accum_item_accumulate"
    assert comp.runs["accum:item_accumulate"].config.loss == "ms_accum:item_accumulate"
    final = comp.final().set_index("variant")
    assert math.isnan(final.loc["accum:inplace_leaf", "precision_at_1"])
    assert final.loc["corrupt_labels", "epochs"] == 1
    h = comp.histories()
    assert set(h["variant"]) == {"ms", "accum:item_accumulate", "corrupt_labels"}
    # a cut graph trains nothing: the head's weights stay at their (seeded) initial values
    from vericar.runs import load_model

    torch.manual_seed(base.seed)  # train() seeds, then builds the model
    init = build_model("tiny_cnn", base.embedding_dim, pretrained=False, dropout=base.dropout,
                       hidden_dim=base.hidden_dim)
    cut = load_model(comp.runs["accum:item_accumulate"])
    trained = load_model(comp.runs["ms"])
    for (k, a), b, c in zip(init.head.state_dict().items(), cut.head.state_dict().values(),
                            trained.head.state_dict().values()):
        if a.is_floating_point() and a.ndim > 1:
            torch.testing.assert_close(b, a)
            assert not torch.allclose(c, a)
    outcomes = classify_outcomes(comp.final(), h)
    fig = plots.comparison_curves_figure(h, outcomes)
    assert fig.axes
    # idempotent: a second call loads the finished folders
    again = run_comparison(cars, variants[:1], base, tmp_path, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.runs["ms"].embeddings, comp.runs["ms"].embeddings)


def test_label_corruption_figure():
    fig = plots.label_corruption_figure([0, 0, 1, 1, 2], [5, 6, 7, 7, 8])
    assert len(fig.axes) == 3


def test_batch_gradient_check_depends_on_its_seed_only(tiny_synth):
    # notebook 02's one-batch check: the head (here the whole tiny model) is drawn under `seed` in a forked RNG,
    # so what ran before (other draws from torch's global generator) cannot change the report
    from vericar.analyses.gradient_bug import batch_gradient_check

    def check(seed):
        return batch_gradient_check(tiny_synth, np.arange(len(tiny_synth)), backbone="tiny_cnn", embedding_dim=16,
                                    image_size=32, n_classes=3, m_per_class=2, seed=seed)

    torch.manual_seed(123)
    a = check(0)
    after_a = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(1000)  # another global state
    b = check(0)
    numbers = ["loss", "grad_norm_backbone", "grad_norm_head"]
    pd.testing.assert_frame_equal(a.report[numbers], b.report[numbers])
    np.testing.assert_array_equal(a.rows, b.rows)
    torch.manual_seed(123)
    check(0)
    assert torch.rand(1) == after_a  # the global generator is left where it was
    c = check(1)
    assert not np.allclose(a.report["grad_norm_head"], c.report["grad_norm_head"])
    assert a.report.loc[a.report["role"] == "variant", "expected"].notna().all()
    assert a.head_parameters > 0 and len(a.labels) == 6
