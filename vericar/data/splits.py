"""Named split protocols. Every number the study reports names the protocol it was measured on.

A :class:`Split` holds row indices into ``CarsDataset.table``:

``train``          images the model is trained on
``database``       labelled images the K-NN retrieval searches (the "gallery")
``query``          images whose class is predicted from the database (in-distribution)
``ood_query``      images of classes in no database and never trained on (open-world only)
``ood_database``   labelled images of those held-out classes, to add to the database later without retraining

When ``query`` and ``database`` are the same rows (``zero-shot``) evaluation is leave-one-out: a query never
retrieves itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .dataset import CarsDataset
from .images import DataError

PROTOCOLS = {
    "seed": "the re-implementation's protocol: official train set only, 80/20 within each class; "
            "database = 80% part (also trained on), queries = 20% part; 1-NN accuracy",
    "official": "train on the official train set; database = official train, queries = official test "
                "(same classes)",
    "zero-shot": "the metric-learning benchmark: train on the first half of the classes (1-98 on Stanford "
                 "Cars), evaluate on the other half, all its images, leave-one-out (Recall@1, MAP@R)",
    "open-world": "some car models held out of training and of the database (they are the OOD set); known "
                  "classes: official train = train and database, official test = queries",
}
HOLDOUT_UNITS = ("model", "year", "make")


@dataclass
class Split:
    protocol: str
    train: np.ndarray
    database: np.ndarray
    query: np.ndarray
    ood_query: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ood_database: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    heldout_class_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    description: str = ""

    @property
    def leave_one_out(self) -> bool:
        """True when queries are searched among themselves (a query must not retrieve itself)."""
        return len(self.query) == len(self.database) and np.array_equal(self.query, self.database)

    def summary(self) -> pd.Series:
        sizes = {k: len(getattr(self, k)) for k in ("train", "database", "query", "ood_query", "ood_database")}
        return pd.Series({"protocol": self.protocol, **sizes, "heldout_classes": len(self.heldout_class_ids)})


def make_split(cars: CarsDataset, protocol: str, *, seed: int = 0, val_fraction: float = 0.2,
               holdout: str = "model", holdout_fraction: float = 0.2) -> Split:
    """Build the named protocol's split of ``cars``, deterministically from ``seed``.

    ``val_fraction`` is the query share per class for ``seed``; ``holdout`` (``model``: every year of some
    models; ``year``: one year of models that have several, the hardest case; ``make``: whole makes, the
    easiest) and ``holdout_fraction`` (share of classes held out, approximately) configure ``open-world``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    t = cars.table
    rows = np.arange(len(t))
    is_train = (t["split"] == "train").to_numpy()
    if protocol == "seed":
        train_rows = rows[is_train]
        if len(train_rows) == 0:
            raise DataError("protocol 'seed' needs official train images; this dataset has none")
        rng = np.random.default_rng(seed)
        database, query = [], []
        for class_id, group in t.iloc[train_rows].groupby("class_id", sort=True):
            members = group.index.to_numpy()
            if len(members) < 2:
                raise DataError(f"class {class_id} has {len(members)} train image(s); protocol 'seed' needs at "
                                "least 2 per class to split 80/20")
            members = rng.permutation(members)
            n_query = min(len(members) - 1, max(1, int(round(val_fraction * len(members)))))
            query.append(members[:n_query])
            database.append(members[n_query:])
        database, query = np.sort(np.concatenate(database)), np.sort(np.concatenate(query))
        return Split(protocol, train=database, database=database, query=query, description=PROTOCOLS[protocol])
    if protocol == "official":
        _require_both_splits(t)
        train = rows[is_train]
        return Split(protocol, train=train, database=train, query=rows[~is_train], description=PROTOCOLS[protocol])
    if protocol == "zero-shot":
        half = cars.num_classes // 2
        seen = (t["class_id"] <= half).to_numpy()
        unseen = rows[~seen]
        return Split(protocol, train=rows[seen], database=unseen, query=unseen,
                     heldout_class_ids=np.arange(half + 1, cars.num_classes + 1), description=PROTOCOLS[protocol])
    _require_both_splits(t)
    heldout = heldout_classes(cars, holdout, holdout_fraction, seed)
    is_known = ~t["class_id"].isin(heldout).to_numpy()
    return Split(protocol,
                 train=rows[is_train & is_known], database=rows[is_train & is_known],
                 query=rows[~is_train & is_known], ood_query=rows[~is_train & ~is_known],
                 ood_database=rows[is_train & ~is_known], heldout_class_ids=np.asarray(heldout, dtype=np.int64),
                 description=f"{PROTOCOLS[protocol]}; held out by {holdout}, about {holdout_fraction:.0%} of classes")


def heldout_classes(cars: CarsDataset, unit: str, fraction: float, seed: int) -> np.ndarray:
    """Class ids held out of training and database for ``open-world``, chosen by ``unit`` (see make_split)."""
    if unit not in HOLDOUT_UNITS:
        raise ValueError(f"unknown holdout unit {unit!r}; choose one of {HOLDOUT_UNITS}")
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    h = cars.hierarchy
    rng = np.random.default_rng(seed)
    target = max(1, int(round(fraction * len(h))))
    if unit == "year":
        # one year of each chosen model that has several years: the model itself stays known
        multi = h.groupby(["make", "model"]).filter(lambda g: len(g) > 1)
        groups = [g for _, g in multi.groupby(["make", "model"], sort=True)]
        if not groups:
            raise DataError("holdout='year' needs models with more than one year; this dataset has none")
        chosen = []
        for g in (groups[i] for i in rng.permutation(len(groups))):
            chosen.append(int(rng.choice(g["class_id"].to_numpy())))
            if len(chosen) >= target:
                break
        return np.sort(np.asarray(chosen))
    keys = ["make"] if unit == "make" else ["make", "family"]
    groups = [g["class_id"].to_numpy() for _, g in h.groupby(keys, sort=True)]
    chosen = []
    for i in rng.permutation(len(groups)):
        if len(chosen) >= target:
            break
        chosen.extend(groups[i].tolist())
    if len(chosen) >= len(h):
        raise DataError(f"holding out by {unit} with fraction {fraction} leaves no known class")
    return np.sort(np.asarray(chosen))


def _require_both_splits(t: pd.DataFrame) -> None:
    if not {"train", "test"} <= set(t["split"]):
        raise DataError("this protocol needs both official train and test images; the dataset has only "
                        f"{sorted(set(t['split']))}")
