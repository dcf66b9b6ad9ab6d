"""Tests for the library functions behind notebooks 05-08's story (one function per notebook step) and for the
closing "what we found" Markdown of those notebooks (``vericar.findings.nb05`` .. ``nb08``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from vericar.analyses import open_set, open_world as ow  # noqa: E402
from vericar.data import Split  # noqa: E402
from vericar.findings import findings, headline  # noqa: E402
from vericar import plots  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------------------
# 06 · open world
# ---------------------------------------------------------------------------------------------------


def _clusters(n_classes: int, per_class: int, dim: int = 8, spread: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.repeat(np.eye(dim)[:n_classes], per_class, axis=0) + spread * rng.standard_normal((n_classes * per_class, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(n_classes), per_class)


def _toy_split(y: np.ndarray, known: list[int], per_class_db: int) -> Split:
    rows = np.arange(len(y))
    pos = np.concatenate([np.arange((y == c).sum()) for c in np.unique(y)])
    is_db, is_known = pos < per_class_db, np.isin(y, known)
    return Split("open-world", train=rows[is_db & is_known], database=rows[is_db & is_known],
                 query=rows[~is_db & is_known], ood_query=rows[~is_db & ~is_known],
                 ood_database=rows[is_db & ~is_known], heldout_class_ids=np.unique(y[~is_known]) + 1)


def _toy_runs(n_classes: int = 8, per_class: int = 10):
    """Two holdouts on the same well-separated clusters: the trained embedding separates the classes, the
    "frozen" features are noise (so every comparison has a known winner)."""
    x, y = _clusters(n_classes, per_class)
    frozen = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    runs = {}
    for h, known in (("model", list(range(6))), ("make", [0, 1, 2, 3, 6, 7])):
        runs[h] = SimpleNamespace(embeddings=x, frozen=frozen, split=_toy_split(y, known, per_class_db=6),
                                  metrics={"trained": {"precision_at_1": 0.9}, "frozen": {"precision_at_1": 0.4},
                                           "device": "cpu"}, path=Path(f"/runs/{h}"))
    return runs, y


def test_holdout_summary_counts_and_names():
    runs, y = _toy_runs()
    hierarchy = pd.DataFrame({"class_id": range(1, 9), "class_name": [f"car {i}" for i in range(1, 9)]})
    t = ow.holdout_summary(runs, hierarchy, examples=1)
    assert list(t.index) == ["model", "make"]
    assert t.loc["model", "query"] == 6 * 4 and t.loc["model", "ood_query"] == 2 * 4
    assert t.loc["model", "heldout_classes"] == 2
    assert t.loc["model", "held out, e.g."] == "car 7" and t.loc["make", "held out, e.g."] == "car 5"
    assert t.loc["make", "known P@1 (frozen)"] == 0.4


def test_k_selection_chooses_on_validation_and_sweeps_test():
    runs, y = _toy_runs()
    sweeps, chosen, chosen_frozen = ow.k_selection(runs, y, [1, 2, 3, 100], seed=0)
    assert set(chosen) == set(chosen_frozen) == {"model", "make"}
    assert set(sweeps["on"]) == {"validation", "test"} and set(sweeps["features"]) == {"trained", "frozen"}
    # k = 100 exceeds every database: dropped from both sweeps
    assert sweeps["k"].max() == 3
    # separated clusters: validation FPR95 is zero for the trained embedding at every k, ties -> smallest k
    val = sweeps[(sweeps["on"] == "validation") & (sweeps["features"] == "trained")]
    assert (val["fpr95"] == 0).all() and chosen == {"model": 1, "make": 1}


def test_compare_methods_and_against_bars():
    runs, y = _toy_runs()
    sweeps, chosen, chosen_frozen = ow.k_selection(runs, y, [1, 2, 3], seed=0)
    table, scores = ow.compare_methods(runs, y, chosen, chosen_frozen, seed=0)
    assert len(table) == 2 * len(ow.METHODS) and set(scores) == {"model", "make"}
    t = table.set_index(["holdout", "method"])
    assert t.loc[("model", "knn_plus"), "fpr95"] == 0.0 and t.loc[("model", "knn_plus"), "auroc"] == 1.0
    assert t.loc[("model", "knn_plus_frozen"), "auroc"] < 0.9  # noise features cannot separate
    bars, verdict = ow.against_bars(table, sweeps, "model", {"fpr95": 0.2872, "auroc": 0.931},
                                    {"fpr95": 0.2, "auroc": 0.95})
    assert verdict["beats_claim"] and verdict["meets_target"] and verdict["k"] == 1
    assert verdict["hindsight_fpr95"] == 0.0 and verdict["validation_fpr95"] == 0.0
    assert bars.loc["seed's claim", "fpr95"] == 0.2872 and len(bars) == 5
    # a target no detector meets flips the verdict
    _, strict = ow.against_bars(table, sweeps, "model", {"fpr95": 0.2872, "auroc": 0.931}, {"fpr95": -1, "auroc": 2})
    assert not strict["meets_target"] and strict["beats_claim"]


def test_relation_acceptance_and_most_familiar():
    emb = np.array([[1, 0], [0, 1], [1, 0.01], [0.01, 1], [-1, 0], [1, 0.02]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 2, 1, 3, 0, 1])
    hierarchy = pd.DataFrame({"class_id": [1, 2, 3, 4], "make": ["A", "A", "A", "B"],
                              "model": ["m1", "m1", "m2", "m3"], "class_name": list("abcd")})
    split = Split("open-world", train=np.array([0, 1]), database=np.array([0, 1]), query=np.array([4]),
                  ood_query=np.array([2, 3]), ood_database=np.array([5]))
    run = SimpleNamespace(embeddings=emb, split=split)
    table = pd.DataFrame({"holdout": ["model"], "method": ["knn_plus"], "threshold": [0.5]})
    scores = {"model": {"knn_plus": {"ood": np.array([0.9, 0.1])}}}
    rel = ow.relation_acceptance({"model": run}, table, scores, hierarchy, labels)
    assert rel.loc[("model", "same model, other year"), "accepted_share"] == 1.0
    assert rel.loc[("model", "other make"), "accepted_share"] == 0.0
    q, nn, s = ow.most_familiar_unknowns(emb, split, np.array([0.1, 0.9]), n=1)
    assert list(q) == [3] and list(nn) == [1] and list(s) == [0.9]


def test_add_classes_all_summary_and_entries():
    runs, y = _toy_runs()
    add = ow.add_classes_all(runs, y, {"model": 1, "make": 1}, shots=[1, None], seeds=[0, 1])
    assert list(add["holdout"]) == ["model"] * 3 + ["make"] * 3
    summary = ow.add_classes_summary(add)
    assert summary.loc[("model", "1"), ("n_added", "mean")] == 2
    assert summary.loc[("model", "all"), ("new_p1", "mean")] == 1.0
    table = pd.DataFrame({"holdout": ["model"], "method": ["knn_plus"], "name": ["KNN+"], "k": [1], "fpr95": [0.25],
                          "fpr95_lo": [0.2], "fpr95_hi": [0.3], "auroc": [0.9], "aupr": [0.8], "aupr_out": [0.7],
                          "n_id": [24], "n_ood": [8]})
    common = {"dataset": "synthetic", "protocol": "open-world", "backbone": "tiny", "image_size": 32}
    entries = ow.ood_results_entries(common, runs, table, add, {"model": 1, "make": 1})
    assert len(entries) == 1 + 4
    assert entries[0]["fpr95_ci95"] == [0.2, 0.3] and entries[0]["k_chosen_on"].startswith("pseudo-open set")
    assert entries[0]["heldout_classes"] == 2 and entries[0]["device"] == "cpu"
    adds = [e for e in entries if e["experiment"] == "add-without-retraining"]
    assert [e["shots"] for e in adds] == ["1", "all", "1", "all"] and adds[0]["seeds"] == [0, 1]
    assert adds[1]["metrics"]["new_precision_at_1"] == 1.0


def _toy_ssb_eval():
    rng = np.random.default_rng(0)
    known, easy, hard = np.arange(0, 20), np.arange(20, 30), np.arange(30, 36)
    good = np.r_[rng.normal(1, 0.1, 20), rng.normal(0, 0.1, 16)]
    table = pd.DataFrame([{"score": s, "name": open_set.SCORES[s], "unknown": g, "auroc": a, "fpr95": 0.5,
                           "aupr_in": 0.5, "aupr_out": 0.5, "oscr": 0.6, "closed_set_accuracy": 0.8,
                           "auroc_lo": a - 0.05, "auroc_hi": a + 0.05, "n_known": 20, "n_unknown": 10}
                          for s, base in (("knn_plus", 0.7), ("mls", 0.9)) for g, a in
                          (("easy", base), ("hard (medium+hard)", base - 0.1))])
    return {"table": table, "scores": {"knn_plus": rng.normal(size=36), "mls": good},
            "groups": {"easy": easy, "hard (medium+hard)": hard}, "k": 3, "k_pooled": None}, known


def test_ssb_entries_best_score_and_figures():
    ssb_eval, known = _toy_ssb_eval()
    run = SimpleNamespace(metrics={"device": "cpu", "train_seconds": 12.0}, path=Path("/runs/ssb"))
    entries = open_set.open_set_results_entries({"dataset": "synthetic", "backbone": "tiny", "image_size": 32}, run,
                                           ssb_eval)
    assert len(entries) == 4 and all(e["protocol"] == "ssb" for e in entries)
    assert entries[0]["k"] == 3 and entries[2]["k"] is None and entries[0]["auroc_ci95"] == pytest.approx([0.65, 0.75])
    assert plots.best_ssb_score(ssb_eval) == "mls"
    fig = plots.ssb_roc_figure(ssb_eval, known, names=open_set.SCORES)
    assert len(fig.axes) >= 2
    fig2 = plots.ssb_histogram_figure(ssb_eval, known, names=open_set.SCORES)
    assert fig2.axes[0].get_xlabel() == open_set.SCORES["mls"]
    plt.close("all")


def test_familiar_unknowns_figure_titles():
    cars = SimpleNamespace(labels=np.array([0, 1]), class_names=["Audi A", "BMW B"],
                           image=lambda i: np.zeros((4, 4, 3), dtype=np.uint8))
    fig = plots.familiar_unknowns_figure(cars, [1], [0], [0.25], title="t")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["unknown: BMW B (score\n0.250)", "nearest known: Audi A"] or \
        [t.replace("\n", " ") for t in titles] == ["unknown: BMW B (score 0.250)", "nearest known: Audi A"]
    plt.close("all")


def test_nb06_on_the_reference_results():
    result = _results("06_ood")
    knn = next(e for e in result["entries"] if e.get("experiment") == "ood-detection" and e["method"] == "knn_plus"
               and e["holdout"] == "model")
    first = headline("06", result)
    assert first.startswith("**") and first.endswith("**")
    assert f"{100 * knn['metrics']['fpr95']:.1f}%" in first and "59.5%" in first
    assert "57.1–61.9%" in first and "worse than the seed's claimed FPR95 28.72%" in first
    text = findings("06", result)
    assert "level with KNN+ (the intervals overlap)" in text  # 1-NN raw vs KNN+ on the reference run
    assert "stanford_cars, open-world, efficientnet_lite0 @ 192 px" in text and "SynthCars" not in text
    assert 2 <= sum(line.startswith("- ") for line in text.splitlines()) <= 6


def test_nb06_verdict_flips():
    result = _results("06_ood")
    better = copy.deepcopy(result)
    for e in better["entries"]:
        if e.get("experiment") == "ood-detection" and e["method"] == "knn_plus":
            e["metrics"].update(fpr95=0.10, auroc=0.97)
            e["fpr95_ci95"] = [0.08, 0.12]
            e["dataset"] = "synthetic"
    text = findings("06", better)
    first = text.splitlines()[0]
    assert "better than the seed's claimed" in first and "10.0%" in first and "SynthCars (synthetic data)" in first
    assert "is met" in text and "KNN+ is better" in text
    level = copy.deepcopy(result)
    for e in level["entries"]:
        if e.get("experiment") == "ood-detection" and e["method"] == "knn_plus":
            e["fpr95_ci95"] = [0.25, 0.30]
    assert "level with the seed's claimed" in headline("06", level)


def test_nb06_open_set_targets_follow_the_chosen_scores():
    result = _results("06_ood")
    text = findings("06", result)
    assert "validation AUROC 83.4%" in text and "AUROC 90.7% (95% CI 89.9–91.4%), FPR95 52.1%" in text
    assert "AUROC at least 90% is met, FPR95 at most 40% is not" in text
    assert "met on Hard only" in text and "89.2% (95% CI 88.4–89.9%) on Easy" in text

    def moved(auroc=None, fpr95=None, easy=None, hard=None):
        r = copy.deepcopy(result)
        for e in r["entries"]:
            if not e.get("chosen_on_validation"):
                continue
            if e["experiment"] == "open-set-scores":
                e["metrics"].update({k: v for k, v in (("auroc", auroc), ("fpr95", fpr95)) if v is not None})
            elif e["unknown"] == "easy" and easy is not None:
                e["metrics"]["auroc"] = easy
            elif e["unknown"] == "hard (medium+hard)" and hard is not None:
                e["metrics"]["auroc"] = hard
        return findings("06", r)

    def heldout(text):
        return next(line for line in text.splitlines() if line.startswith("- Of every score"))

    assert heldout(moved(auroc=0.95, fpr95=0.30)).endswith("FPR95 30.0%; the target (AUROC at least 90% with FPR95 "
                                                           "at most 40%) is met.")
    assert heldout(moved(auroc=0.85, fpr95=0.60)).endswith("is not met.")
    assert "FPR95 at most 40% is met, AUROC at least 90% is not" in moved(auroc=0.85, fpr95=0.30)
    assert "met on both" in moved(easy=0.93)
    assert "met on neither" in moved(hard=0.70)
    assert "met on Easy only" in moved(easy=0.93, hard=0.70)
    # without a validation model's choice, the SSB bullet says its score is the best in hindsight
    bare = copy.deepcopy(result)
    for e in bare["entries"]:
        e.pop("chosen_on_validation", None)
    assert "in hindsight: no validation model chose it" in findings("06", bare)
    assert "chosen on a validation model" not in findings("06", bare)


# ---------------------------------------------------------------------------------------------------
# 05 · error analysis
# ---------------------------------------------------------------------------------------------------

from vericar.analyses import errors as err  # noqa: E402
from vericar.data.dataset import CarsDataset  # noqa: E402

# the hand-built world of tests/test_errors.py: six classes on the unit circle, 8 queries, 3 of them right
NAMES = ["Audi S4 Sedan 2007", "Audi S4 Sedan 2012", "Audi TTS Coupe 2012", "Honda Accord Coupe 2012",
         "Honda Accord Sedan 2012", "BMW M3 Coupe 2012"]
ROWS = [(0, 0, "train", 0), (1, 1, "train", 10), (2, 2, "train", 30), (3, 3, "train", 80), (4, 4, "train", 90),
        (5, 5, "train", 150), (6, 0, "train", 335),
        (7, 0, "test", 1), (8, 0, "test", 9), (9, 4, "test", 82), (10, 1, "test", 38), (11, 5, "test", 88),
        (12, 3, "test", 79), (13, 1, "test", 11), (14, 3, "test", 89)]


def _world(root, rows):
    table = pd.DataFrame({"filename": [f"images/{s}/{r:05d}.jpg" for r, _, s, _ in rows],
                          "split": [s for _, _, s, _ in rows], "class_id": [c + 1 for _, c, _, _ in rows],
                          "class_name": [NAMES[c] for _, c, _, _ in rows], "width": [100 + 10 * r for r, *_ in rows]})
    cars = CarsDataset(root=root, table=table, class_names=NAMES)
    ang = np.deg2rad([a for *_, a in rows])
    emb = np.stack([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    train = np.array([r for r, _, s, _ in rows if s == "train"])
    split = Split("official", train=train, database=train, query=np.arange(7, 15))
    return cars, split, emb, err.nearest_neighbour_table(emb, cars, split)


@pytest.fixture
def world(tmp_path):
    return _world(tmp_path, ROWS)


@pytest.fixture
def big_world(tmp_path):
    """The same world with four more BMW database images far from every query (so that retrieval metrics up
    to k = 10 have enough database images); every query's nearest neighbour is unchanged."""
    return _world(tmp_path, ROWS + [(15 + i, 5, "train", 200 + 10 * i) for i in range(4)])


def test_group_extremes(world):
    cars, split, emb, nn = world
    ext = err.group_extremes(err.group_accuracy_tables(nn), by=("make",)).set_index("which")
    # Audi queries 7, 8, 10, 13 (7 and 13 right), Honda 9, 12, 14 (12 right), BMW 11 (wrong)
    assert ext.loc["worst", "group"] == "BMW" and ext.loc["worst", "accuracy"] == 0.0 and ext.loc["worst", "n"] == 1
    assert ext.loc["best", "group"] == "Audi" and ext.loc["best", "accuracy"] == 0.5 and ext.loc["best", "n"] == 4
    assert ext.loc["worst", "ci_high"] > 0.5 and (ext["groups"] == 3).all()


def test_size_effects(world):
    cars, split, emb, nn = world
    sizes = err.size_effects(nn, cars, split, bins=2)
    cs = sizes["class_sizes"]
    assert cs.set_index("class_index").loc[0, "n_train"] == 2 and cs["n_train"].min() == 1
    assert sizes["class_bins"]["n"].sum() == 8 and sizes["image_bins"]["n"].sum() == 8
    assert list(sizes["widths"]) == [170, 180, 190, 200, 210, 220, 230, 240]
    rho, p = err.spearman(sizes["widths"], nn["correct"].astype(float))
    assert sizes["rho_width"] == pytest.approx(rho) and sizes["p_width"] == pytest.approx(p)


def test_error_metrics_and_tables(world):
    cars, split, emb, nn = world
    levels = pd.concat([err.level_table(nn, cars.hierarchy).assign(stage=s) for s in ("frozen backbone", "trained")],
                       ignore_index=True)
    structures = {s: err.confusion_structure(nn) for s in ("frozen backbone", "trained")}
    sizes = err.size_effects(nn, cars, split, bins=2)
    claims = pd.DataFrame({"key": ["popular_makes"], "accuracy": [0.4]})
    m = err.error_metrics(nn, nn, levels, structures, sizes, {"errors": 5}, claims)
    assert m["precision_at_1"] == 3 / 8 and m["n_errors"] == 5 and m["n_queries"] == 8
    assert m["errors_share_other_make"] == pytest.approx(1 / 5)
    assert m["errors_share_same_family_other_body"] == pytest.approx(2 / 5)
    assert m["accuracy_make"] == pytest.approx(7 / 8)  # every error but the BMW one keeps the make
    assert m["near_duplicates_errors"] == 5 and m["claim_popular_makes_accuracy"] == 0.4
    groups = err.group_accuracy_tables(nn)
    t = err.error_tables(levels, groups, structures, err.confused_pairs(nn), sizes, claims, top_pairs=2)
    assert len(t["levels"]) == 8 and len(t["confused_pairs"]) == 2 and t["accuracy_per_make"][0]["group"] == "BMW"
    assert t["image_size_measure"] == sizes["width_label"] and set(t["confusion_structure"]) == {"frozen backbone",
                                                                                                 "trained"}


def test_error_figures_titles():
    cars = SimpleNamespace(class_names=["Audi A", "BMW B"], image=lambda i: np.zeros((4, 4, 3), dtype=np.uint8))
    examples = pd.DataFrame({"query": [3], "neighbour": [1], "true_example": [-1], "true_class": [1],
                             "pred_class": [0], "distance": [0.5], "true_distance": [np.nan]})
    fig = plots.confused_pairs_figure(cars, examples)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["query:\nBMW B", "wrong 1-NN, distance 0.50:\nAudi A", "no other image of its class"]
    explained = pd.DataFrame({"query": [3, 4], "neighbour": [1, 2], "true_class_name": ["BMW B", "Audi A"],
                              "pred_class_name": ["Audi A", "BMW B"], "distance": [0.01, 0.02]})
    fig = plots.near_duplicate_errors_figure(cars, explained, n=1)
    assert [ax.get_title() for ax in fig.axes] == ["query:\nBMW B", "1-NN, distance 0.01:\nAudi A"]
    plt.close("all")


def test_nb05_on_the_reference_results():
    result = _results("05_error_analysis")
    first = headline("05", result)
    assert first.startswith("**") and first.endswith("**")
    assert f"{100 * result['metrics']['precision_at_1']:.1f}%" in first and "87.0%" in first and "36.7%" in first
    assert "86.3–87.7%" in first and "another make (43% of 1043 errors)" in first
    text = findings("05", result)
    assert "stanford_cars, official, efficientnet_lite0 @ 192 px, cpu" in text
    assert "holds (CI straddles the claim)" in text and "higher here" in text and "no evidence of a link" in text
    assert 2 <= sum(line.startswith("- ") for line in text.splitlines()) <= 6


def test_nb05_verdicts_flip():
    result = copy.deepcopy(_results("05_error_analysis"))
    result["dataset"] = "synthetic"
    m = result["metrics"]
    m.update(errors_share_other_make=0.1, errors_share_same_model_other_year=0.6,
             spearman_class_size_accuracy=0.5, spearman_class_size_p=0.001)
    for k in [k for k in m if k.startswith("near_duplicates_")]:
        del m[k]
    result["accuracy_per_make"][0].update(ci_high=0.9)
    text = findings("05", result)
    assert text.startswith("**On SynthCars (synthetic data), the trained model")
    assert "up from 36.7%" in text.splitlines()[0]
    m["frozen_precision_at_1"] = 0.9
    assert "down from 90.0% with the frozen backbone" in headline("05", result)
    assert "another year of the same model (60% of" in text.splitlines()[0]
    assert "accuracy rises with it" in text and "interval overlapping the overall" in text
    assert "Label noise: not checked" in text


# ---------------------------------------------------------------------------------------------------
# 07 · hierarchy ablation
# ---------------------------------------------------------------------------------------------------

from vericar.analyses import hierarchy as hier  # noqa: E402


def _grid_runs(world, hims_emb=None):
    cars, split, emb, nn = world
    cfg = SimpleNamespace(backbone="tiny", image_size=32, loss_kwargs={}, epochs=1, batch_size=8, m_per_class=2, seed=0)
    metrics = {"device": "cpu", "train_seconds": 1.0, "images_per_second": 10.0}
    return {("ms", "seed"): SimpleNamespace(embeddings=emb, split=split, config=cfg, metrics=metrics),
            ("hims_min", "seed"): SimpleNamespace(embeddings=emb if hims_emb is None else hims_emb, split=split,
                                                  config=cfg, metrics=metrics)}


def test_reference_settings(tmp_path):
    given = {"backbone": None, "epochs": 3}
    fallback = {"backbone": "efficientnet_lite0", "epochs": 30}
    assert hier.reference_settings(tmp_path, given, fallback) == {"backbone": "efficientnet_lite0", "epochs": 3}
    (tmp_path / "config.json").write_text("{}")
    assert hier.reference_settings(tmp_path, given, fallback) == given


def test_evaluate_grid_depths_and_comparison(big_world):
    cars = big_world[0]
    runs = _grid_runs(big_world)
    grid = hier.evaluate_grid(runs, cars, k=1)
    assert grid["metrics"][("ms", "seed")]["precision_at_1"] == pytest.approx(3 / 8)
    lt = grid["level_table"]
    assert len(lt) == 8 and set(lt["loss"]) == {"MS", "HiMS-Min"}
    assert lt.set_index(["loss", "level"]).loc[("MS", "make"), "accuracy"] == pytest.approx(7 / 8)
    assert grid["ood_outcomes"] == {} and len(grid["summary"]) == 2
    depths = hier.error_depth_table(grid["outcomes"]).set_index("loss")
    assert depths.loc["MS", "other make"] == pytest.approx(1 / 5) and depths.loc["MS", "n"] == 5
    assert depths.loc["MS", "right model, other year"] == pytest.approx(1 / 5)
    comp = hier.ms_comparison(grid["outcomes"], grid["ood_outcomes"])
    assert len(comp) == 4 and (comp["diff"] == 0).all() and (comp["verdict"] == "no significant difference").all()
    lines, helps = hier.ablation_verdict(comp)
    assert not helps and len(lines) == 1 and "never above MS" in lines[0] and "better at 0 and worse at 0 of 4" in lines[0]
    entries = hier.ablation_entries(runs, grid, comp, dataset="synthetic", mode="head only", k=1)
    assert [e["loss"] for e in entries] == ["ms", "hims_min"] and entries[0]["vs_ms"] == []
    assert len(entries[1]["vs_ms"]) == 4 and entries[1]["metrics"]["precision_at_1"] == pytest.approx(3 / 8)
    assert entries[1]["error_depth"]["query"]["other make"] == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="baseline"):
        hier.ms_comparison({k: v for k, v in grid["outcomes"].items() if k[0] != "ms"}, {})


def test_ablation_verdict_flips():
    comp = pd.DataFrame({"variant": ["hims_max", "hims_max"], "panel": ["seed", "seed"], "level": ["make", "year"],
                         "diff": [0.05, -0.01], "p_holm": [0.001, 0.9],
                         "verdict": ["better", "no significant difference"]})
    lines, helps = hier.ablation_verdict(comp)
    assert helps and "better at 1 and worse at 0 of 2" in lines[0] and "(better: seed/make +5.0%)" in lines[0]


def test_heldout_eligibility():
    t = pd.DataFrame({"level": ["make", "make", "type", "type"], "eligible": [30, 30, 12, 12], "ood_queries": 40})
    e = hier.heldout_eligibility(t)
    assert (e["n_ood"], e["make"], e["type"]) == (40, 30, 12) and "make known: 30" in e["panel"]


def test_loss_shares_sum_to_one(world):
    cars, split, emb, nn = world
    shares = hier.loss_shares(_grid_runs(world), cars, n_batches=2, seed=0)
    assert list(shares["label"]) == ["HiMS-Min | seed"]
    assert shares[["make", "type", "model", "year"]].sum(axis=1).iloc[0] == pytest.approx(1.0)
    assert 0 <= shares["binding"].iloc[0] <= 1


def test_nb07_on_the_reference_results():
    result = _results("07_hierarchy_ablation")
    first = headline("07", result)
    assert first.startswith("**Neither HiMS variant is significantly better than flat MS at any of 28")
    assert "HiMS-Min +0.9 points at zero-shot/year" in first and "does not survive the adjustment" in first
    text = findings("07", result)
    ms_ow = next(e for e in result["entries"] if e["loss"] == "ms" and e["protocol"] == "open-world")
    assert f"MS {100 * ms_ow['metrics']['precision_at_1']:.1f}%" in text and "MS 61.8%" in text
    assert "stanford_cars, open-world, efficientnet_lite0 @ 192 px" in text and "not reproduced" in text
    assert 2 <= sum(line.startswith("- ") for line in text.splitlines()) <= 6


def test_nb07_verdict_flips():
    result = copy.deepcopy(_results("07_hierarchy_ablation"))
    hit = next(c for e in result["entries"] for c in e["vs_ms"] if c["diff"] > 0.008)  # the largest gain (+0.9 points)
    hit.update(verdict="better", p_holm=0.01)
    for e in result["entries"]:
        e["dataset"] = "synthetic"
    first = headline("07", result)
    assert first.startswith("**On SynthCars (synthetic data), a hierarchical loss beats flat MS significantly at 1 of 28")
    assert "here it does at the comparisons above" in findings("07", result)


# ---------------------------------------------------------------------------------------------------
# 08 · identify a car
# ---------------------------------------------------------------------------------------------------

_CLASSES_08 = pd.DataFrame({"make": ["A", "A", "B"], "type": ["Sedan", "Coupe", "Sedan"], "model": ["A1", "A2", "B1"],
                            "year": [2010, 2011, 2012]})


def test_identify_level_accuracy_is_the_prefix_one():
    """The type answer's make is kept in its key: "Sedan" of make B is wrong for an A Sedan, even with make A right."""
    from vericar.identify import confidence_table, level_accuracy
    from vericar.metrics import level_accuracy as prefix

    predicted = pd.DataFrame({
        "make": ["A", "A", "B"], "type": ["Sedan", "Sedan", "Sedan"], "model": ["A1", "A1", "B1"],
        "year": [2010, 2010, 2012], "class_name": ["a", "a", "c"], "class_index": [0, 0, 2],
        "make_key": [("A",), ("A",), ("B",)], "type_key": [("A", "Sedan"), ("B", "Sedan"), ("B", "Sedan")],
        "model_key": [("A", "Sedan", "A1"), ("B", "Sedan", "B1"), ("B", "Sedan", "B1")],
        "year_key": [("A", "Sedan", "A1", 2010), ("B", "Sedan", "B1", 2012), ("B", "Sedan", "B1", 2012)],
        **{f"{lv}_confidence": [1.0, 0.6, 0.9] for lv in ("make", "type", "model", "year")}})
    truth = [0, 0, 1]
    acc = level_accuracy(predicted, truth, _CLASSES_08)
    assert acc == {"accuracy_make": pytest.approx(2 / 3), "accuracy_type": pytest.approx(1 / 3),
                   "accuracy_model": pytest.approx(1 / 3), "accuracy_year": pytest.approx(1 / 3),
                   "accuracy_class": pytest.approx(1 / 3)}
    assert all(acc[k] == v for k, v in prefix(predicted, truth, _CLASSES_08).items() if k in acc)
    trust = confidence_table(predicted, truth, _CLASSES_08, at=0.8)
    assert trust.loc["share confident", "type"] == pytest.approx(2 / 3)
    assert trust.loc["accuracy if confident", "type"] == 0.5 and trust.loc["accuracy otherwise", "type"] == 0.0


def _identify_result(**changes) -> dict:
    common = {"dataset": "stanford_cars", "protocol": "open-world", "backbone": "efficientnet_lite0", "image_size": 160,
              "device": "cpu"}
    test = {**common, "experiment": "identify test photos", "setting": "head only", "n_photos": 1000,
            "levels": "prefix", "metrics": {"accuracy_make": 0.9, "accuracy_type": 0.85, "accuracy_model": 0.8,
                                            "accuracy_year": 0.75, "accuracy_class": 0.75, "known_share": 0.6},
            "confidence": {lv: {"share confident": 0.8, "accuracy if confident": 0.95, "accuracy otherwise": 0.5}
                           for lv in ("make", "type", "model", "year")}}
    add = {**common, "experiment": "unknown car added without retraining", "setting": "5 photos added",
           "car": "Zentra Volo Sedan 2013", "n_test_photos": 40, "n_added": 5,
           "metrics": {"flagged_before": 1.0, "flagged_after": 0.9, "named_before": 0.0, "named_after": 0.1,
                       "model_before": 0.0, "model_after": 0.2}}
    test["metrics"].update(changes.pop("test", {}))
    add["metrics"].update(changes.pop("add", {}))
    return {"entries": [test, add], **changes}


def test_nb08_on_the_committed_results():
    result = _results("08_identify")
    first = headline("08", result)
    assert first.startswith("**On 6,421 test photos of known cars, the identifier gets the make right for 94.1% "
                            "(95% CI 93.5-94.6%) and the exact class for 86.7%")
    assert "yet flags 47.1% of these known cars as unknown" in first and "14.9% of its 47 test photos" in first
    text = findings("08", result)
    assert "make + body type 90.9% (95% CI 90.2-91.6%)" in text and "scored each level alone" not in text
    assert "Mitsubishi Lancer Sedan 2012" in text and "mostly not recognised" in text
    assert ("threshold set on the 1,635 training photos it never trained on accepts 95.0% (95% CI 94.5-95.4%) of the test photos"
            in text and "against 75.7% (95% CI 74.7-76.6%)" in text and "is what the app should use" in text)


def test_nb08_wording_follows_the_numbers():
    text = findings("08", _identify_result())
    assert "make + body type 85.0% (95% CI" in text and "exact class 75.0%" in text
    assert "yet flags 40.0% of these known cars as unknown" in text and "too strict for new photos" in text
    assert "95.0% right when the vote share is high (80% of answers) against 50.0% otherwise: worth reading" in text
    assert "flagged unknown 100.0% -> 90.0%, named right 0.0% -> 10.0%" in text and "model right 0.0% -> 20.0%" in text
    assert "mostly not recognised" in text
    good = findings("08", _identify_result(test={"known_share": 0.94}, add={"named_after": 0.9}))
    assert "and accepts 94.0% of them as known" in good and "close to what it was set for" in good
    assert ": recognised." in good
    flat = _identify_result()
    flat["entries"][0]["confidence"] = {lv: {"share confident": 0.5, "accuracy if confident": 0.8,
                                             "accuracy otherwise": 0.78} for lv in ("make", "type", "model", "year")}
    flat["entries"][0]["dataset"] = "synthetic"
    text = findings("08", flat)
    assert "not told apart, the intervals overlap" in text and text.startswith("**On SynthCars (synthetic data), on 1,000")


def test_nb08_reports_the_threshold_set_on_held_out_photos():
    result = _identify_result()
    cal = {"experiment": "unknown threshold calibration", "dataset": "stanford_cars", "protocol": "seed",
           "backbone": "efficientnet_lite0", "image_size": 160, "device": "cpu", "setting": "recipe", "n_photos": 8041,
           "calibration_photos": {"every database photo": 8144, "held-out photos only": 1635},
           "metrics": {"accepted_every": 0.751, "accepted_heldout": 0.945, "threshold_every": -0.665,
                       "threshold_heldout": -0.771, "trained_share_every": 0.799, "accuracy_make": 0.884,
                       "accuracy_year": 0.799}}
    result["entries"].append(cal)
    text = findings("08", result)
    assert "set on the 1,635 training photos it never trained on accepts 94.5% (95% CI 94.0-95.0%) of the test photos" in text
    assert "against 75.1% (95% CI" in text and "(80% of them trained on)" in text
    assert "is what the app should use" in text and "exact class for 79.9%" in text
    cal["metrics"]["accepted_heldout"] = 0.6
    assert "still too strict" in findings("08", result)
    assert "The fix" not in findings("08", _identify_result())  # older results without the entry
