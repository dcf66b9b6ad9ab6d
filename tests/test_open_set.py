"""Open-set scores on the SSB protocol: OSCR by hand, the scores' shapes and values, the evaluation table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vericar.data import Split
from vericar.analyses.open_set import GROUPS, class_logits, evaluate, group_rows, oscr, scores


def test_oscr_hand_cases():
    # perfect separation and always right: CCR reaches 1 before any unknown is accepted
    assert oscr(np.ones(3, bool), np.array([3.0, 2.0, 1.5]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    # perfect separation but half the known samples misclassified: CCR tops out at 0.5
    assert oscr(np.array([1, 0, 1, 0], bool), np.array([4.0, 3, 2, 1]), np.array([0.0])) == pytest.approx(0.5)
    # no separation (all tied) and always right: one step straight to (1, 1), trapezoid area 0.5
    assert oscr(np.ones(2, bool), np.zeros(2), np.zeros(2)) == pytest.approx(0.5)
    # unknowns above every known: area 0
    assert oscr(np.ones(2, bool), np.array([0.0, 0.1]), np.array([1.0, 2.0])) == pytest.approx(0.0)


def _toy(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:, :8] * 3
    labels = np.repeat(np.arange(6), 20)  # classes 0-3 known, 4 easy, 5 hard
    emb = centres[labels] + rng.normal(0, 0.5, (len(labels), 8))
    emb[labels == 5] = centres[0] + rng.normal(0, 0.5, (20, 8))  # "hard": lies on a known class
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = np.arange(len(labels))
    train = rows[(labels < 4) & (rows % 20 < 14)]
    split = Split("ssb", train=train, database=train, query=rows[(labels < 4) & (rows % 20 >= 14)],
                  ood_query=rows[labels >= 4], heldout_class_ids=np.array([5, 6]))
    np.savez(tmp_path / "proxies.npz", classes=np.arange(4), proxies=np.eye(8)[:4], scale=16.0, kind="norm_softmax")
    return emb, labels, split


def test_scores_separate_far_unknowns_not_near_ones(tmp_path):
    emb, labels, split = _toy(tmp_path)
    logits = class_logits(tmp_path, emb)
    assert logits[0].shape == (120, 4) and logits[0][0].argmax() == 0
    assert class_logits(tmp_path / "none", emb) is None
    s, correct = scores(emb, labels, split, k=2, pooled=emb, logits=logits)
    assert set(s) == {"knn_plus", "nn1", "knn_plus_pooled", "msp", "mls", "energy"}
    assert np.isnan(s["knn_plus"][split.train]).all() and not np.isnan(s["knn_plus"][split.query]).any()
    table = pd.DataFrame(evaluate(s, correct, split, {"easy": split.ood_query[:20], "hard": split.ood_query[20:]},
                                  n_boot=50))
    by = table.set_index(["score", "unknown"])
    for name in s:
        assert by.loc[(name, "easy"), "auroc"] > 0.95  # class 4 is far from every known class
        assert by.loc[(name, "hard"), "auroc"] < 0.8   # class 5 sits on known class 0
        assert by.loc[(name, "easy"), "auroc_lo"] <= by.loc[(name, "easy"), "auroc"] <= by.loc[(name, "easy"), "auroc_hi"]
        assert by.loc[(name, "easy"), "closed_set_accuracy"] == 1.0


def test_group_rows_follow_the_ssb_table():
    class Cars:
        table = pd.DataFrame({"class_id": [1, 2, 3, 4, 5]})
    ssb = pd.DataFrame({"class_id": [1, 2, 3, 4, 5], "ssb_split": ["known", "easy", "medium", "hard", "easy"]})
    split = Split("ssb", train=np.array([0]), database=np.array([0]), query=np.array([0]),
                  ood_query=np.array([1, 2, 3, 4]))
    g = group_rows(Cars, split, ssb)
    assert set(g) == set(GROUPS)
    assert g["easy"].tolist() == [1, 4] and g["hard (medium+hard)"].tolist() == [2, 3] and g["hard"].tolist() == [3]


def _val_run(tmp_path, validation=True):
    from types import SimpleNamespace

    emb, labels, split = _toy(tmp_path)
    pooled = np.random.default_rng(1).normal(size=emb.shape)  # features that know nothing of the classes
    run = SimpleNamespace(config=SimpleNamespace(validation=validation), split=split, embeddings=emb, pooled=pooled,
                          path=tmp_path, metrics={"device": "cpu", "train_seconds": 1.0})
    return run, labels


def test_validation_choice_takes_the_best_score_and_k_of_the_validation_model(tmp_path):
    from vericar.analyses.open_set import validation_choice

    run, labels = _val_run(tmp_path)
    choice = validation_choice(run, labels, [1, 2, 5, 1000])  # k beyond the database is dropped
    sweep = choice["sweep"]
    assert set(sweep["k"]) == {1, 2, 5} and set(sweep["features"]) == {"embedding", "pooled"}
    for name, k in (("embedding", choice["k"]), ("pooled", choice["k_pooled"])):
        s = sweep[sweep["features"] == name]
        assert s.set_index("k").loc[k, "auroc"] == s["auroc"].max()
    t = choice["table"].set_index("score")
    assert choice["score"] != "knn_plus_pooled" and t.loc[choice["score"], "auroc"] == t["auroc"].max()
    assert t.loc["knn_plus_pooled", "auroc"] < 0.65 < 0.75 < t.loc[choice["score"], "auroc"]
    with pytest.raises(ValueError, match="not a validation run"):
        validation_choice(_val_run(tmp_path, validation=False)[0], labels, [1, 2])


def test_open_set_evaluation_reports_the_validation_choice(tmp_path):
    from vericar.analyses.open_set import (SCORES, choice_summary, choice_tables, open_set_evaluation,
                                           open_set_results_entries)

    val, labels = _val_run(tmp_path)
    run, _ = _val_run(tmp_path, validation=False)
    groups = {"easy": run.split.ood_query[:20], "hard": run.split.ood_query[20:]}
    ev = open_set_evaluation(run, labels, groups, ks=[1, 2, 5], val_run=val, n_boot=0)
    assert ev["chosen"] == ev["validation"]["score"] and ev["k"] == ev["validation"]["k"]
    entries = open_set_results_entries({"dataset": "toy", "backbone": "none", "image_size": 8}, run, ev,
                                       protocol="open-world", experiment="open-set-scores")
    flagged = [e for e in entries if e["chosen_on_validation"]]
    assert [e["unknown"] for e in flagged] == ["easy", "hard"] and {e["method"] for e in flagged} == {ev["chosen"]}
    assert all(e["k_chosen_on"] == "validation model" for e in entries if e["method"] == "knn_plus")
    without = open_set_evaluation(run, labels, groups, ks=[1, 2, 5], n_boot=0, pseudo_ood_fraction=0.25)
    assert without["chosen"] is None and without["validation"] is None
    # what notebook 06 displays: the validation table, then the test table with the chosen score marked
    val_table, test_table = choice_tables(ev)
    assert list(val_table.columns) == ["validation auroc", "validation fpr95"]
    marked = [n for n in test_table.index if n.startswith("chosen: ")]
    assert marked == [f"chosen: {SCORES[ev['chosen']]}"]
    assert list(test_table["auroc"].columns) == ["easy", "hard"]
    summary = choice_summary(ev)
    v = val.split
    assert f"{len(v.query)} known queries, {len(v.ood_query)} unknown images of {len(v.heldout_class_ids)}" in summary
    auroc = ev["table"].set_index(["score", "unknown"])["auroc"]
    assert f"chosen on validation: {ev['chosen']}, test AUROC easy {auroc[(ev['chosen'], 'easy')]:.3f}" in summary
    assert len(choice_tables(without)) == 1 and "no score chosen" in choice_summary(without)


def test_ssb_config_and_the_validation_run_beside_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vericar import train as train_module
    from vericar.analyses.open_set import ssb_config, train_validation_run
    from vericar.config import TrainConfig

    cfg = ssb_config(TrainConfig(protocol="open-world", holdout="year"), "splits.csv")
    assert (cfg.protocol, cfg.holdout, cfg.save_pooled, cfg.ssb_file) == ("ssb", "model", True, "splits.csv")
    assert ssb_config(cfg).ssb_file == ""
    calls = []
    monkeypatch.setattr(train_module, "train", lambda cars, config, folder, progress: calls.append((config, folder)))
    train_validation_run(None, SimpleNamespace(config=cfg, path=tmp_path / "models" / "ssb"))
    (config, folder), = calls
    assert config.validation and config.protocol == "ssb" and folder == tmp_path / "models" / "ssb-val"


def _pair(tmp_path, val_proxies: bool = True):
    """A test run and a validation run over the toy data, in their own folders; the validation run's class
    proxies are random (so its logit scores rank badly there) or absent."""
    from types import SimpleNamespace

    (tmp_path / "test").mkdir()
    (tmp_path / "val").mkdir()
    emb, labels, split = _toy(tmp_path / "test")
    if val_proxies:
        np.savez(tmp_path / "val" / "proxies.npz", classes=np.arange(4),
                 proxies=np.random.default_rng(3).normal(size=(4, 8)), scale=16.0, kind="norm_softmax")

    def run(folder, validation):
        return SimpleNamespace(config=SimpleNamespace(validation=validation), split=split, embeddings=emb,
                               pooled=None, path=tmp_path / folder, metrics={"device": "cpu"})

    groups = {"easy": split.ood_query[:20], "hard": split.ood_query[20:]}
    return run("test", False), run("val", True), labels, groups


def test_the_choice_follows_the_validation_model_not_the_test_set(tmp_path):
    from vericar.analyses.open_set import open_set_evaluation

    run, val, labels, groups = _pair(tmp_path)
    ev = open_set_evaluation(run, labels, groups, ks=[1, 2, 5], val_run=val, n_boot=0)
    v = ev["validation"]["table"].set_index("score")["auroc"]
    assert ev["chosen"] == "knn_plus" == v.idxmax() and v["knn_plus"] > v[["msp", "mls", "energy"]].max() + 0.05
    hard = ev["table"][ev["table"]["unknown"] == "hard"].set_index("score")["auroc"]
    assert hard.idxmax() == "msp" and hard["msp"] > hard["knn_plus"] + 0.1  # the test set would have chosen otherwise


def test_a_validation_run_that_computes_other_scores_is_refused(tmp_path):
    from vericar.analyses.open_set import open_set_evaluation

    run, val, labels, groups = _pair(tmp_path, val_proxies=False)
    with pytest.raises(ValueError, match="compute different scores.*open_set.train_validation_run"):
        open_set_evaluation(run, labels, groups, ks=[1, 2], val_run=val, n_boot=0)


def test_validation_config_and_folder():
    from vericar.analyses.open_set import validation_config, validation_folder
    from vericar.config import TrainConfig

    cfg = validation_config(TrainConfig(protocol="ssb", trainable_stages=3))
    assert cfg.validation and cfg.trainable_stages == 3 and cfg.protocol == "ssb"
    assert validation_folder("/runs/models/ssb") == Path("/runs/models/ssb-val")
    assert validation_folder("ssb-k3") == Path("ssb-k3-val")


def test_open_set_levers_fusion_is_measured_on_the_validation_model_only(tmp_path):
    from types import SimpleNamespace

    from conftest import load_script
    from vericar.analyses.open_set import validation_choice

    _, val, labels, _ = _pair(tmp_path)
    rows = load_script("scripts/open_set_levers.py").fusion_rows(SimpleNamespace(labels=labels), val)
    by = {r["score"]: r for r in rows}
    assert list(by) == ["energy", "knn_plus", "0.25 energy + 0.75 knn_plus", "0.5 energy + 0.5 knn_plus",
                        "0.75 energy + 0.25 knn_plus"]
    alone = validation_choice(val, labels, [1, 2, 3, 5, 10, 20, 30, 50, 100])["table"].set_index("score")["auroc"]
    assert by["energy"]["validation_auroc"] == pytest.approx(alone["energy"])  # z-scoring keeps the ranking
    assert by["knn_plus"]["validation_auroc"] == pytest.approx(alone["knn_plus"])
    assert all(0 <= r["validation_auroc"] <= 1 and r["validation_model"] == "val" for r in rows)
