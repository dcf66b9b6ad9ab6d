"""Split protocols: what each set holds, disjointness, determinism from the seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import REAL_SMALL, requires_real_data
from vericar.data import CarsDataset, DataError, load_stanford_cars, make_split

NAMES = ["Zentra Volo Sedan 2010", "Zentra Volo Sedan 2012", "Zentra Volo Coupe 2012", "Zentra Pimo SUV 2011",
         "Krato Baja Pickup 2010", "Krato Baja Pickup 2012", "Krato Sumo Van 2009", "Lumen Arko Wagon 2008"]


def toy(train_per_class=10, test_per_class=5) -> CarsDataset:
    rows = []
    for class_id, name in enumerate(NAMES, start=1):
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            rows += [(f"{split}/{class_id}_{i}.jpg", split, class_id, name) for i in range(n)]
    table = pd.DataFrame(rows, columns=["filename", "split", "class_id", "class_name"])
    return CarsDataset(root=".", table=table, class_names=NAMES, name="toy")


def _disjoint(*arrays):
    seen = np.concatenate(arrays)
    return len(seen) == len(np.unique(seen))


def test_seed_protocol_splits_each_class_80_20():
    cars = toy()
    s = make_split(cars, "seed", seed=3)
    t = cars.table
    assert (t.loc[s.query, "split"] == "train").all() and (t.loc[s.database, "split"] == "train").all()
    assert _disjoint(s.query, s.database) and len(s.query) + len(s.database) == 80
    assert (t.loc[s.query].groupby("class_id").size() == 2).all()
    assert np.array_equal(s.train, s.database)
    assert not s.leave_one_out


def test_seed_protocol_is_deterministic_and_seed_dependent():
    cars = toy()
    a, b, c = (make_split(cars, "seed", seed=k) for k in (0, 0, 1))
    assert np.array_equal(a.query, b.query)
    assert not np.array_equal(a.query, c.query)


def test_seed_protocol_needs_two_images_per_class():
    with pytest.raises(DataError, match="at least 2 per class"):
        make_split(toy(train_per_class=1), "seed")


def test_val_protocol_uses_train_images_only_and_other_queries_than_seed():
    cars = toy(train_per_class=30)
    v, s = make_split(cars, "val", seed=0), make_split(cars, "seed", seed=0)
    t = cars.table
    assert set(t.loc[np.concatenate([v.train, v.query]), "split"]) == {"train"}  # no test image is touched
    assert _disjoint(v.query, v.train) and len(v.query) + len(v.train) == 30 * len(NAMES)
    assert (t.loc[v.query].groupby("class_id").size() == 6).all()
    overlap = len(np.intersect1d(v.query, s.query)) / len(v.query)
    assert overlap < 0.5  # independent draws of 20%: ~20% expected overlap, never the same queries


def test_official_protocol():
    cars = toy()
    s = make_split(cars, "official")
    t = cars.table
    assert set(t.loc[s.query, "split"]) == {"test"} and set(t.loc[s.database, "split"]) == {"train"}
    assert len(s.query) == 40 and len(s.train) == 80


def test_zero_shot_protocol_holds_out_the_second_half_of_classes():
    cars = toy()
    s = make_split(cars, "zero-shot")
    t = cars.table
    assert set(t.loc[s.train, "class_id"]) == {1, 2, 3, 4}
    assert set(t.loc[s.query, "class_id"]) == {5, 6, 7, 8}
    assert s.leave_one_out and len(s.query) == 60  # all images (train and test) of the unseen classes


@pytest.mark.parametrize("holdout", ["model", "year", "make"])
def test_open_world_holds_classes_out_of_training_and_database(holdout):
    cars = toy()
    s = make_split(cars, "open-world", holdout=holdout, holdout_fraction=0.3, seed=1)
    t = cars.table
    held = set(s.heldout_class_ids)
    assert held and held != set(range(1, 9))
    assert not held & set(t.loc[s.train, "class_id"]) and not held & set(t.loc[s.database, "class_id"])
    assert not held & set(t.loc[s.query, "class_id"])
    assert set(t.loc[s.ood_query, "class_id"]) == held == set(t.loc[s.ood_database, "class_id"])
    assert set(t.loc[s.ood_query, "split"]) == {"test"} and set(t.loc[s.ood_database, "split"]) == {"train"}
    assert _disjoint(s.train, s.query, s.ood_query, s.ood_database)
    h = cars.hierarchy.set_index("class_id")
    known = set(range(1, 9)) - held
    if holdout == "model":  # every year and body of a held-out model family is out
        for c in held:
            fam = h.loc[c, ["make", "family"]].tolist()
            assert not any(h.loc[k, ["make", "family"]].tolist() == fam for k in known)
    if holdout == "make":
        assert not set(h.loc[list(held), "make"]) & set(h.loc[list(known), "make"])
    if holdout == "year":  # the model stays known through its other years
        for c in held:
            assert any(h.loc[k, "model"] == h.loc[c, "model"] and h.loc[k, "make"] == h.loc[c, "make"]
                       for k in known)


def test_unknown_protocol_and_holdout():
    with pytest.raises(ValueError, match="unknown protocol"):
        make_split(toy(), "random")
    with pytest.raises(ValueError, match="unknown holdout"):
        make_split(toy(), "open-world", holdout="colour")


@requires_real_data
def test_real_data_protocol_sizes():
    cars = load_stanford_cars(REAL_SMALL)
    z = make_split(cars, "zero-shot")
    assert len(z.train) == 8054 and len(z.query) == 8131  # the metric-learning benchmark split, classes 1-98 / 99-196
    o = make_split(cars, "official")
    assert (len(o.database), len(o.query)) == (8144, 8041)


def _ssb_file(tmp_path, cars, kinds, names=None):
    names = names or cars.class_names
    path = tmp_path / "splits.csv"
    pd.DataFrame({"class_id": range(1, len(names) + 1), "class_name": names, "ssb_split": kinds}).to_csv(path, index=False)
    return path


def test_ssb_protocol_trains_on_known_classes_only(tmp_path):
    cars = toy()
    kinds = ["known", "easy", "known", "medium", "known", "hard", "known", "easy"]
    s = make_split(cars, "ssb", ssb_file=_ssb_file(tmp_path, cars, kinds))
    t = cars.table
    assert sorted(s.heldout_class_ids) == [2, 4, 6, 8]
    assert set(t.loc[s.train, "class_id"]) == {1, 3, 5, 7} and set(t.loc[s.train, "split"]) == {"train"}
    assert set(t.loc[s.query, "split"]) == {"test"} and set(t.loc[s.query, "class_id"]) == {1, 3, 5, 7}
    assert set(t.loc[s.ood_query, "class_id"]) == {2, 4, 6, 8} and set(t.loc[s.ood_query, "split"]) == {"test"}


def test_ssb_split_refuses_shifted_or_missing_files(tmp_path):
    cars = toy()
    shifted = NAMES[1:] + NAMES[:1]  # ids off by one, as a public loader's bug makes them
    with pytest.raises(DataError, match="shifted"):
        make_split(cars, "ssb", ssb_file=_ssb_file(tmp_path, cars, ["known"] * 8, shifted))
    with pytest.raises(DataError, match="no SSB class split"):
        make_split(cars, "ssb", ssb_file=tmp_path / "nope.csv")


@requires_real_data
def test_real_ssb_split_counts():
    from vericar.data import ssb_class_split

    cars = load_stanford_cars(REAL_SMALL)
    ssb = ssb_class_split(cars)  # found beside the data folder
    assert ssb["ssb_split"].value_counts().to_dict() == {"known": 98, "easy": 76, "medium": 15, "hard": 7}
    s = make_split(cars, "ssb")
    t = cars.table
    assert t.loc[s.train, "class_id"].nunique() == 98 and not set(t.loc[s.train, "class_id"]) & set(s.heldout_class_ids)
    assert t.loc[s.ood_query, "class_id"].nunique() == 98 and set(t.loc[s.query, "split"]) == {"test"}


@pytest.mark.parametrize("protocol", ["ssb", "open-world"])
def test_validation_split_uses_only_training_images_of_known_classes(tmp_path, protocol):
    from vericar.data import validation_split

    cars = toy(train_per_class=10)
    kinds = ["known", "easy", "known", "known", "known", "hard", "known", "known"]
    base = make_split(cars, protocol, ssb_file=_ssb_file(tmp_path, cars, kinds), holdout_fraction=0.3)
    v = validation_split(cars, base, seed=0, val_fraction=0.2, holdout_fraction=0.4)
    t = cars.table
    assert _disjoint(v.train, v.query, v.ood_query)
    assert set(np.r_[v.train, v.query, v.ood_query]) == set(base.train)  # every known training image, nothing else
    assert set(t.loc[np.r_[v.train, v.query, v.ood_query], "split"]) == {"train"}
    assert np.array_equal(v.train, v.database) and len(v.ood_database) == 0
    val_unknown = set(t.loc[v.ood_query, "class_id"])
    assert val_unknown == set(v.heldout_class_ids) and not val_unknown & set(t.loc[v.train, "class_id"])
    assert not val_unknown & set(base.heldout_class_ids)  # the test's unknowns never play a part
    assert set(t.loc[v.query, "class_id"]) == set(t.loc[v.train, "class_id"])  # 2 of 10 images per known class
    assert all(n == 2 for n in t.loc[v.query, "class_id"].value_counts())
    h = cars.hierarchy.set_index("class_id")  # whole models: no held-out class shares a model with a known one
    models = lambda ids: {tuple(h.loc[i, ["make", "family"]]) for i in ids}
    assert not models(val_unknown) & models(set(t.loc[v.train, "class_id"]))
    again = validation_split(cars, base, seed=0, val_fraction=0.2, holdout_fraction=0.4)
    assert np.array_equal(again.ood_query, v.ood_query) and np.array_equal(again.query, v.query)


def test_validation_split_needs_an_open_set_protocol():
    from vericar.data import validation_split

    with pytest.raises(ValueError, match="no unknown classes"):
        validation_split(toy(), make_split(toy(), "official"))


def test_validation_split_names_itself_when_a_class_is_too_small(tmp_path):
    from vericar.data import DataError, validation_split

    cars = toy(train_per_class=1)  # one training image per class: nothing to split into database and queries
    kinds = ["known", "easy", "known", "known", "known", "hard", "known", "known"]
    base = make_split(cars, "ssb", ssb_file=_ssb_file(tmp_path, cars, kinds))
    with pytest.raises(DataError, match=r"the validation split of protocol 'ssb' needs at least 2 per class to "
                                        r"split 70%/30%"):
        validation_split(cars, base, val_fraction=0.3)
