"""The library functions behind notebooks 01-04's story and their closing "what we found" Markdown.

Every test asserts values: the findings are checked on the committed real-data results (the headline carries the
number formatted from the JSON) and on crafted results where the verdict flips.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from vericar.config import TrainConfig
from vericar.findings import findings, headline

ROOT = Path(__file__).resolve().parents[1]


def committed(name: str) -> dict:
    return json.loads((ROOT / "results" / f"{name}.json").read_text())


# -- 03 · training ---------------------------------------------------------------------------------------------

def _run(protocol: str, frozen_p1: float, trained_p1: float, n: int = 100):
    metrics = {"frozen": {"precision_at_1": frozen_p1, "map_at_r": frozen_p1 / 4, "n_queries": n},
               "trained": {"precision_at_1": trained_p1, "map_at_r": trained_p1 / 2, "n_queries": n},
               "train_seconds": 12.0, "images_per_second": 5.0, "device": "cpu"}
    return SimpleNamespace(config=TrainConfig(protocol=protocol, image_size=96, epochs=3), metrics=metrics,
                           path=Path("/runs") / protocol)


def test_frozen_vs_trained_table_has_one_row_per_protocol_and_stage():
    from vericar.analyses.training import frozen_vs_trained_table

    table = frozen_vs_trained_table({"official": _run("official", 0.3, 0.7), "seed": _run("seed", 0.2, 0.6)})
    assert list(zip(table["protocol"], table["stage"])) == [("official", "frozen"), ("official", "trained"),
                                                          ("seed", "frozen"), ("seed", "trained")]
    assert table["precision_at_1"].tolist() == [0.3, 0.7, 0.2, 0.6]
    assert table.loc[1, "map_at_r"] == pytest.approx(0.35)


def test_training_entries_and_gain_summary():
    from vericar.analyses.training import gain_summary, training_entries

    entries = training_entries({"official": _run("official", 0.3, 0.7)}, "synthetic", "data/x")
    (e,) = entries
    assert (e["dataset"], e["protocol"], e["image_size"], e["epochs"], e["run_folder"]) == (
        "synthetic", "official", 96, 3, "/runs/official")
    assert e["metrics"]["precision_at_1"] == 0.7 and e["metrics"]["train_seconds"] == 12.0
    assert e["frozen_metrics"]["precision_at_1"] == 0.3
    summary = gain_summary(entries)
    assert summary.loc["official", "gain"] == pytest.approx(0.4)
    assert summary.loc["official", "trained precision_at_1"] == 0.7


def test_nb03_on_the_committed_results():
    result = committed("03_training")
    official = next(e for e in result["entries"] if e["protocol"] == "official")
    first = headline("03", result)
    assert first.startswith("**") and first.endswith("**")
    assert f"{100 * official['metrics']['precision_at_1']:.1f}%" in first
    assert f"{100 * official['frozen_metrics']['precision_at_1']:.1f}%" in first
    text = findings("03", result)
    # the reference (192 px, 4 cached augmented views, 20 epochs): seed 84.2% on 1,635 queries, CI 82.3-85.8%, so
    # the seed's claim lies below it
    assert "72.45%" in text and "the claim is below our 95% interval" in text
    assert "82.3-85.8%" in text
    assert "real Stanford Cars" in text and "synthetic" not in text


def test_nb03_verdicts_flip():
    result = copy.deepcopy(committed("03_training"))
    seed = next(e for e in result["entries"] if e["protocol"] == "seed")
    seed["metrics"]["precision_at_1"] = 0.60  # far below the seed's 72.45%
    seed["frozen_metrics"]["precision_at_1"] = 0.59  # and no clear gain over the frozen backbone
    for e in result["entries"]:
        e["dataset"] = "synthetic"
    text = findings("03", result)
    assert "above our 95% interval: the seed did better" in text
    assert "no clear difference, the intervals overlap" in text
    assert "SynthCars (synthetic" in text


# -- 02 · the gradient bug -------------------------------------------------------------------------------------

def _grad_report(writeup_verdict: str = "same gradient as pml"):
    rows = [("ms", "reference", 0.8, 1.0, 2.0, 1.0, 0.0, "reference", None, None),
            ("writeup_wrong_loop", "variant", 0.8, 1.0, 2.0, 1.0, 0.0, writeup_verdict, None, "same gradient as pml"),
            ("no_grad", "variant", 0.8, 0.0, 0.0, float("nan"), float("nan"), "no gradient reaches the model", None,
             "no gradient reaches the model"),
            ("inplace_leaf", "variant", float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), "raises",
             "RuntimeError: leaf", "raises")]
    return pd.DataFrame(rows, columns=["variant", "role", "loss", "grad_norm_backbone", "grad_norm_head", "cos_all",
                                       "rel_diff_all", "verdict", "error", "expected"])


def test_gradient_check_lines():
    from vericar.analyses.gradient_bug import gradient_check_lines

    lines = gradient_check_lines(_grad_report())
    assert len(lines) == 5
    assert lines[0].split(":")[0].strip() == "writeup_wrong_loop" and "gradient norm backbone 1 / head 2" in lines[0]
    assert "RuntimeError: leaf" in lines[2]
    assert lines[3].endswith("yes")
    assert "same gradient as pml; cosine with pml's gradient 1.000000" in lines[4]
    lines = gradient_check_lines(_grad_report("different gradient"))
    assert lines[3].endswith("NO for ['writeup_wrong_loop']")


def _toy_cars():
    table = pd.DataFrame({"class_id": [1, 1, 2, 2, 1, 2, 3, 3],
                          "bbox_y2": [50, 50, 50, 60, 70, 70, 80, 80],
                          "split": ["train"] * 4 + ["test"] * 4})
    return SimpleNamespace(table=table, labels=table["class_id"].to_numpy() - 1, num_classes=3)


def test_label_corruption_study():
    from vericar.analyses.gradient_bug import label_corruption_study

    lc = label_corruption_study(_toy_cars(), [0, 1, 2, 3], protocol="seed")
    assert list(lc.table.index) == ["official test set", "seed training rows"]
    assert lc.table.loc["official test set", "pseudo_classes"] == 2  # box bottoms 70 and 80
    assert lc.table.loc["seed training rows", "pseudo_classes"] == 2  # 50 and 60
    # training pairs sharing a pseudo-class (50): (0,1) same class, (0,2) and (1,2) not -> 1/3
    assert lc.table.loc["seed training rows", "pair_precision"] == pytest.approx(1 / 3)
    assert lc.train_corrupt.tolist() == [50, 50, 50, 60] and lc.test_rows.tolist() == [4, 5, 6, 7]
    assert lc.figure_set == "test set" and lc.figure_corrupt.tolist() == [70, 70, 80, 80]
    assert "fall into 2 'classes' (true: 3)" in lc.text and "33.3% share the true class" in lc.text
    cars = _toy_cars()
    cars.table["split"] = "train"
    lc = label_corruption_study(cars, [0, 1, 2, 3], protocol="seed")
    assert lc.figure_set == "training rows" and list(lc.table.index) == ["seed training rows"]


def test_coverage_table_and_expected_coverage():
    from vericar.analyses.gradient_bug import coverage_table, expected_shuffle_coverage

    true = np.repeat(np.arange(8), 8)
    unique = np.arange(64)  # every image its own pseudo-class: no anchor ever has a positive
    cov = coverage_table(true, unique, batch_size=16, m_per_class=4, seed=0)
    assert cov.loc["true labels", "m_per_class"] == 1.0
    assert cov.loc["corrupted labels", "shuffle"] == 0.0  # (the m-per-class sampler repeats a lone image instead)
    assert 0 < cov.loc["true labels", "shuffle"] < 1
    assert expected_shuffle_coverage(196, 64) == pytest.approx(1 - (195 / 196) ** 63)
    assert expected_shuffle_coverage(196, 64) == pytest.approx(0.2755, abs=1e-4)  # 1 - (195/196)^63
    assert expected_shuffle_coverage(1, 8) == 1.0


def test_variants_table_and_texts():
    from vericar.analyses.gradient_bug import (Comparison, comparison_lines, comparison_variants,
                                               corrupted_scores_text, variants_table)

    vs = comparison_variants(["no_grad"], ["shuffle", "corrupt_labels"])
    table = variants_table(vs).set_index("variant")
    assert table.loc["shuffle", "changes"] == {"sampler": "shuffle"}
    assert table.loc["corrupt_labels", "changes"] == "train_labels = bbox_y2" and table.loc["ms", "changes"] == "-"
    comp = Comparison(vs, {"ms": object(), "accum:no_grad": None}, {"accum:no_grad": "RuntimeError: x"}, {})
    lines = comparison_lines(comp, pd.DataFrame({"train_seconds": [10.0, None, 5.4]}), None)
    assert lines == ["trained 1 runs (15 s of training); raised: ['accum:no_grad']"]
    assert corrupted_scores_text(None) == "no official test images in this dataset: skipped"
    text = corrupted_scores_text({"accuracy_true_labels": 0.446, "test_images": 8041, "accuracy_corrupted_labels": 0.0004,
                                  "oracle_corrupted": 0.0006, "chance_corrupted": 0.0009})
    assert "44.6% on the 8,041 test images" in text and "it gets 0.04%" in text


def _outcomes(writeup_p1=0.70, cut_loss_last=0.99):
    rows = [("ms", 0.70, 0.40, 1.0, 0.5, "reference", ""),
            ("accum:writeup_wrong_loop", writeup_p1, 0.40, 1.0, 0.5,
             "no change" if writeup_p1 > 0.6 else "breaks learning", "r"),
            ("accum:no_grad", 0.38, 0.40, 1.0, cut_loss_last, "breaks learning", "r"),
            ("shuffle", 0.55, 0.40, 1.0, 0.6, "slows learning", "below the reference")]
    df = pd.DataFrame(rows, columns=["variant", "precision_at_1", "frozen_precision_at_1", "loss_first", "loss_last",
                                     "verdict", "reason"])
    df["loss_change"] = (df["loss_last"] - df["loss_first"]) / df["loss_first"]
    return df


def test_conclusion_lines():
    from vericar.analyses.gradient_bug import conclusion_lines

    lines = conclusion_lines(_outcomes(), _grad_report(), None, None, data_name="toy", protocol="seed", epochs=3)
    text = "\n".join(lines)
    assert lines[0].startswith("Reference (pml MS, class-balanced batches, true labels): P@1 0.700 after 3 epochs")
    assert "- BREAKS LEARNING: accum:no_grad (0.380)" in text and "- SLOWS LEARNING: shuffle (0.550)" in text
    assert "severs the graph': does NOT hold here" in text and "reaches P@1 0.700 (no change)" in text
    assert "loss -1.0%" in text and "stays flat" in text
    assert "- Plain shuffled batches: slows learning (below the reference)." in text
    flipped = "\n".join(conclusion_lines(_outcomes(0.30, cut_loss_last=0.5), _grad_report("no gradient reaches the model"),
                                         None, None, data_name="toy", protocol="seed", epochs=3))
    assert "severs the graph': holds here" in flipped and "also moves" in flipped


def test_gradient_bug_entries():
    from vericar.analyses.gradient_bug import Comparison, comparison_variants, gradient_bug_entries

    vs = comparison_variants(["writeup_wrong_loop"], [])
    cfg = TrainConfig(protocol="seed", image_size=96, loss="ms")

    def run(p1):
        return SimpleNamespace(config=cfg, metrics={"trained": {"precision_at_1": p1, "accuracy_make": 0.9},
                                                    "images_per_second": 3.0, "device": "cpu"})
    comp = Comparison(vs, {"ms": run(0.7), "accum:writeup_wrong_loop": run(0.69)}, {},
                      {v.name: Path("/r") / v.folder_name for v in vs})
    outcomes = _outcomes().iloc[:2].assign(n_query=400, map_at_r=0.3, train_seconds=1.0, error=None)
    cars = SimpleNamespace(labels=np.array([0, 1, 2]))
    scores = {"test_images": 10, "accuracy_corrupted_labels": 0.0}
    entries = gradient_bug_entries(outcomes, comp, _grad_report(), base=cfg, finetune_base=None, cars=cars,
                                   finetune_cars=None, dataset="synthetic", device="cpu", data_dir="d", scores=scores)
    assert [e["variant"] for e in entries] == ["ms", "accum:writeup_wrong_loop", "corrupted_test_labels"]
    wl = entries[1]
    assert wl["metrics"]["grad_cosine_with_pml"] == 1.0 and wl["gradient_verdict"] == "same gradient as pml"
    assert wl["metrics"]["n_queries"] == 400 and wl["metrics"]["accuracy_make"] == 0.9
    lo, hi = wl["precision_at_1_ci"]
    assert lo < 0.70 < hi and hi - lo == pytest.approx(0.09, abs=0.01)  # Wilson, 280 of 400
    assert wl["classes"] == 3 and wl["run_folder"] == "/r/accum_writeup_wrong_loop" and wl["image_size"] == 96
    assert entries[2]["metrics"] == scores and entries[2]["protocol"] == "official"


def test_nb02_on_the_committed_results():
    result = committed("02_gradient_bug")
    by = {e["variant"]: e for e in result["entries"]}
    first = headline("02", result)
    assert first.startswith("**The write-up's diagnosis does not hold here")
    assert f"{100 * by['accum:writeup_wrong_loop']['metrics']['precision_at_1']:.1f}%" in first
    assert f"{100 * by['ms']['metrics']['precision_at_1']:.1f}%" in first
    text = findings("02", result)
    assert "1,103 \"classes\"" in text and "0.04%" in text and "0.20%" in text
    assert "leaves the loss flat" in text and "[0.427, 0.476]" in text


def test_nb02_verdict_flips():
    result = copy.deepcopy(committed("02_gradient_bug"))
    for e in result["entries"]:
        e["dataset"] = "synthetic"
        if e["variant"] == "accum:writeup_wrong_loop":
            e["gradient_verdict"], e["verdict"] = "no gradient reaches the model", "breaks learning"
            e["metrics"]["precision_at_1"] = 0.25
            e["precision_at_1_ci"] = [0.23, 0.27]
        if e["variant"] == "accum:no_grad":
            e["metrics"]["loss_last"] = 0.5  # the cut graph's loss moves: no claim that it stays flat
    first = headline("02", result)
    assert first.startswith("**The write-up's diagnosis holds here") and "no gradient at all" in first
    assert "25.0%" in first
    text = findings("02", result)
    assert "leaves the loss flat" not in text and "SynthCars (synthetic" in text


# -- 01 · the data -----------------------------------------------------------------------------------------------

def _eda_cars():
    table = pd.DataFrame({"split": ["train", "train", "train", "test"], "class_id": [1, 1, 2, 2]})
    hierarchy = pd.DataFrame({"make": ["A", "B"], "type": ["Sedan", "Sedan"], "year": [2010, 2012]})
    return SimpleNamespace(table=table, hierarchy=hierarchy, num_classes=2, class_names=["A Sedan 2010", "B Sedan 2012"], image=lambda i: f"img{i}")


def test_eda_metrics():
    from vericar.data.summary import eda_metrics

    class Cars(SimpleNamespace):
        def __len__(self):
            return len(self.table)
    cars = Cars(**vars(_eda_cars()))
    scan = pd.DataFrame({"error": ["", "bad", "", ""], "width": [10, 20, 30, 40], "height": [5, 5, 6, 8]})
    pairs = pd.DataFrame({"cross_split": [True, False], "cross_class": [True, True]})
    m = eda_metrics(cars, {"min": 1, "median": 1.5, "max": 2, "gini": 0.1}, scan, pairs, {"recovered": 3})
    assert (m["images"], m["train_images"], m["test_images"], m["classes"], m["makes"], m["types"]) == (4, 3, 1, 2, 2, 1)
    assert m["unreadable_images"] == 1 and m["median_width"] == 25.0 and m["median_height"] == 5.5
    assert (m["near_duplicate_pairs"], m["near_duplicates_cross_split"], m["near_duplicates_cross_class"]) == (2, 1, 2)
    assert m["reference_recovered"] == 3 and m["train_per_class_gini"] == 0.1


def test_pair_panels_puts_cross_class_pairs_first():
    from vericar.data.summary import pair_panels

    cars = _eda_cars()
    pairs = pd.DataFrame({"i": [0, 1], "j": [2, 3], "cross_class": [False, True], "distance": [0, 3],
                          "class_id_i": [1, 1], "class_id_j": [1, 2], "filename_i": ["a", "b"], "filename_j": ["c", "d"]})
    images, titles = pair_panels(cars, pairs, n=1)
    assert images == [("img1", "img3")]
    assert titles == ["A Sedan 2010\nb", "B Sedan 2012\nd"]


def test_nb01_on_the_committed_results_and_flipped():
    result = committed("01_eda")
    first = headline("01", result)
    assert "16,185 images of 196 car models from 49 makes" in first and "79 of them filed under two" in first
    assert "Gini 0.052: close to balanced" in findings("01", result)
    crafted = copy.deepcopy(result)
    crafted["dataset"] = "synthetic"
    crafted["metrics"].update(near_duplicates_cross_class=0, train_per_class_gini=0.4)
    text = findings("01", crafted)
    assert "none filed under two different classes" in text.splitlines()[0]
    assert "unbalanced" in text and "SynthCars (synthetic" in text


# -- 04 · embeddings and UMAP ----------------------------------------------------------------------------------

def _embedding_world():
    """4 classes (2 makes x 2 models) of 6 images on well-separated directions; the "frozen" features are noise."""
    from vericar.data.splits import Split

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 6)
    trained = np.eye(8)[y] + 0.05 * rng.standard_normal((24, 8))
    frozen = rng.standard_normal((24, 8))
    hierarchy = pd.DataFrame({"make": ["A", "A", "B", "B"], "type": ["Sedan", "Coupe", "Sedan", "Sedan"],
                              "model": ["A1", "A2", "B1", "B2"], "year": [2010, 2011, 2012, 2012]})
    pos = np.tile(np.arange(6), 4)
    split = Split("official", train=np.flatnonzero(pos < 4), database=np.flatnonzero(pos < 4),
                  query=np.flatnonzero(pos >= 4))
    return {"frozen backbone": frozen.astype(np.float32), "trained": trained.astype(np.float32)}, y, hierarchy, split


def test_embedding_steps_measure_the_separated_classes():
    from vericar.analyses import embeddings as emb
    from vericar.data.splits import Split

    stages, y, hierarchy, split = _embedding_world()
    rows, picked, note = emb.map_rows(split, y, max_points=8, seed=0)
    assert len(rows) == 24 and len(picked) == 8 and note == "8 of 24 images drawn (2-2 per class, 4 classes)"
    quality = emb.quality_by_set(stages, hierarchy, y, split, k=3)
    assert set(quality["set"]) == {"query", "database"} and set(quality["level"]) >= {"make", "year", "body_only"}
    q = quality.set_index(["set", "stage", "level"])
    assert q.loc[("database", "trained", "year"), "purity"] == 1.0  # 4 per class: 3 neighbours all of the class
    assert q.loc[("query", "trained", "year"), "purity"] == pytest.approx(1 / 3)  # 2 per class, k = 3
    lines = emb.quality_lines(quality, "database")
    assert lines[2].startswith(" year: purity") and "-> 1.000 (chance 0.200)" in lines[2]
    ow_split = Split("open-world", train=split.train[y[split.train] < 3], database=split.train[y[split.train] < 3],
                     query=split.query[y[split.query] < 3], ood_query=np.flatnonzero(y == 3),
                     heldout_class_ids=np.array([4]))
    sample = emb.open_world_sample(ow_split, y, max_points=100)
    assert sample["is_heldout"].sum() == 6 and len(sample["pool"]) == 24 and "1 held-out classes" in sample["note"]
    ow = emb.open_world_purity(stages, sample, y, k=3)
    assert ow.loc["trained", "heldout_purity"] == 1.0 and ow.loc["trained", "heldout_chance"] == pytest.approx(5 / 23)
    assert emb.open_world_sample(Split("official", train=split.train, database=split.train, query=split.query), y, 9) is None
    metrics = emb.embedding_metrics(quality, ow.rename(index={"trained": "trained (open-world model)"}))
    assert metrics["purity_database_trained_year"] == 1.0 and metrics["open_world_trained_heldout_purity"] == 1.0
    assert metrics["open_world_heldout_chance"] == pytest.approx(5 / 23) and "purity_query_chance_make" in metrics


def _purity_result(**changes) -> dict:
    m = {"purity_query_frozen_year": 0.20, "purity_query_trained_year": 0.60, "purity_query_chance_year": 0.01,
         "purity_query_frozen_make": 0.30, "purity_query_trained_make": 0.80, "purity_query_chance_make": 0.05,
         "silhouette_query_frozen_year": -0.05, "silhouette_query_trained_year": 0.12,
         "purity_database_frozen_year": 0.21, "purity_database_trained_year": 0.95,
         "open_world_frozen_heldout_purity": 0.20, "open_world_trained_heldout_purity": 0.50,
         "open_world_trained_heldout_class_purity": 0.30, "open_world_trained_known_class_purity": 0.85,
         "open_world_heldout_chance": 0.10}
    m.update(changes)
    return {"dataset": "stanford_cars", "protocol": "official", "backbone": "efficientnet_lite0", "image_size": 160,
            "device": "cpu", "metrics": m, "purity_k": 10, "n_query": 1234, "map_points": 500,
            "map_images_available": 900, "open_world_holdout": "model", "heldout_classes": 39,
            "setting": "last 2 backbone stages + head on cached trunk, flip TTA", "loss": "proxy_anchor", "epochs": 20}


def test_nb04_on_the_committed_results():
    result = committed("04_embeddings_umap")
    first = headline("04", result)
    assert first.startswith("**") and first.endswith("**")
    assert "rises from 18.5% with the frozen backbone to 83.5% after training (chance 0.5%)" in first
    assert "of the same make, from 30.5% to 93.0%" in first and "10 nearest neighbours" in first
    text = findings("04", result)
    assert "54.6% of their neighbours are held-out too after training (26.0% frozen, chance 11.1%)" in text
    assert "98.6%" in text and "fit, not generalisation" in text and "no interval is given" in text


def test_nb04_wording_follows_the_numbers():
    text = findings("04", _purity_result())
    assert text.startswith("**Among each test image's 10 nearest neighbours, the share of the same exact class rises "
                           "from 20.0% with the frozen backbone to 60.0% after training (chance 1.0%)")
    assert "last 2 backbone stages + head on cached trunk, flip TTA, proxy_anchor loss, 20 epochs" in text
    assert "means over 1,234 test images with k = 10" in text and "(500 of 900 images)" in text
    assert "the classes are not separate clusters" in text and "they gather among themselves" in text
    worse = findings("04", _purity_result(purity_query_trained_year=0.10, silhouette_query_trained_year=0.6,
                                          purity_database_trained_year=0.12, open_world_trained_heldout_purity=0.12,
                                          open_world_trained_heldout_class_purity=0.05))
    assert "falls from 20.0% with the frozen backbone to 10.0% after training" in worse
    assert "the classes are separated clusters" in worse
    assert "packed about as tightly as the training images" in worse
    assert "barely gather more than chance" in worse
    overlap = findings("04", _purity_result(purity_query_trained_year=0.015, purity_query_frozen_body_only=0.2,
                                            purity_query_trained_body_only=0.5, purity_query_chance_body_only=0.15))
    assert "the classes overlap, a test image's neighbours are mostly of other classes" in overlap
    assert "20.0% of a test image's neighbours share it with the frozen backbone (chance 15.0%), 50.0% after " \
           "training: the frozen features barely see it." in overlap
    same = findings("04", _purity_result(purity_query_trained_year=0.202))
    assert "stays at about 20.2% (frozen backbone 20.0%)" in same
    synthetic = findings("04", {**_purity_result(), "dataset": "synthetic"})
    assert synthetic.startswith("**On SynthCars (synthetic data), among each")
