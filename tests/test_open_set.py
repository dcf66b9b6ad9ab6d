"""Open-set scores on the SSB protocol: OSCR by hand, the scores' shapes and values, the evaluation table."""

from __future__ import annotations

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
