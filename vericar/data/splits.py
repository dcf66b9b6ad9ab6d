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
from pathlib import Path

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
    "ssb": "the Semantic Shift Benchmark's open-set split (Vaze et al., ICLR 2022): train on the official train "
           "images of its 98 known classes; known test images are the queries, the test images of the 98 unseen "
           "classes (Easy 76, Medium 15, Hard 7) the open set",
    "val": "recipe selection without the test set: official train images only, split per class (a share "
           "val_fraction of each class, drawn apart from the seed protocol's) into train = database and "
           "validation queries; no official test image is used",
}
HOLDOUT_UNITS = ("model", "year", "make")
SSB_DIFFICULTIES = ("easy", "medium", "hard")
#: where the SSB class split is looked for when none is given: beside the dataset's folder
SSB_DEFAULT = Path("..") / "ssb_stanford_cars" / "splits.csv"


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
               holdout: str = "model", holdout_fraction: float = 0.2, ssb_file: str | Path | None = None) -> Split:
    """Build the named protocol's split of ``cars``, deterministically from ``seed``.

    ``val_fraction`` is the query share per class for ``seed``; ``holdout`` (``model``: every year of some
    models; ``year``: one year of models that have several, the hardest case; ``make``: whole makes, the
    easiest) and ``holdout_fraction`` (share of classes held out, approximately) configure ``open-world``.
    ``ssb_file`` is the SSB class split for ``ssb`` (default: :data:`SSB_DEFAULT` from the dataset's root).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    t = cars.table
    rows = np.arange(len(t))
    is_train = (t["split"] == "train").to_numpy()
    if protocol in ("seed", "val"):
        train_rows = rows[is_train]
        if len(train_rows) == 0:
            raise DataError(f"protocol {protocol!r} needs official train images; this dataset has none")
        # 'val' draws its queries from another random stream than 'seed', so that choosing a recipe on it does
        # not select on the seed protocol's queries more than chance overlap does
        rng = np.random.default_rng(seed if protocol == "seed" else [seed, 7_777])
        database, query = _per_class_split(t, train_rows, val_fraction, rng, f"protocol {protocol!r}")
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
    if protocol == "ssb":
        ssb = ssb_class_split(cars, ssb_file)
        heldout = ssb.loc[ssb["ssb_split"] != "known", "class_id"].to_numpy()
        description = PROTOCOLS[protocol]
    else:
        heldout = heldout_classes(cars, holdout, holdout_fraction, seed)
        description = f"{PROTOCOLS[protocol]}; held out by {holdout}, about {holdout_fraction:.0%} of classes"
    is_known = ~t["class_id"].isin(heldout).to_numpy()
    return Split(protocol,
                 train=rows[is_train & is_known], database=rows[is_train & is_known],
                 query=rows[~is_train & is_known], ood_query=rows[~is_train & ~is_known],
                 ood_database=rows[is_train & ~is_known], heldout_class_ids=np.asarray(heldout, dtype=np.int64),
                 description=description)


def validation_split(cars: CarsDataset, split: Split, *, seed: int = 0, val_fraction: float = 0.2,
                     holdout_fraction: float = 0.2) -> Split:
    """A validation split carved from an open-set ``split``'s *training* images only (``ssb``, ``open-world``).

    Some of its known classes (whole car models, about ``holdout_fraction`` of them) play the unknowns: all their
    training images are ``ood_query``; of every other known class, a share ``val_fraction`` of the training
    images are the known ``query`` and the rest ``train`` = ``database``. A model trained on it has seen neither
    its queries nor its unknowns, so scores, k and thresholds chosen on it are chosen as they will be used, and
    no test image (known or unknown) takes part.
    """
    if not len(split.ood_query):
        raise ValueError(f"protocol {split.protocol!r} has no unknown classes to validate against; a validation "
                         "split is for the open-set protocols ('ssb', 'open-world')")
    t = cars.table
    known_ids = np.unique(t["class_id"].to_numpy()[split.train])
    unknown = heldout_classes(cars, "model", holdout_fraction, seed, among=known_ids)
    of_row = t["class_id"].to_numpy()
    is_unknown = np.isin(of_row[split.train], unknown)
    rng = np.random.default_rng([seed, 8_888])
    database, query = _per_class_split(t, split.train[~is_unknown], val_fraction, rng,
                                       f"the validation split of protocol {split.protocol!r}")
    return Split(split.protocol, train=database, database=database, query=query,
                 ood_query=np.sort(split.train[is_unknown]), heldout_class_ids=np.asarray(unknown, dtype=np.int64),
                 description=f"validation split of {split.protocol!r} from its training images: {len(unknown)} of "
                             f"its {len(known_ids)} known classes (whole models) play the unknowns, "
                             f"{val_fraction:.0%} of each other class's images the known queries")


def _per_class_split(t: pd.DataFrame, rows: np.ndarray, fraction: float, rng: np.random.Generator,
                     what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(database, query)``: a share ``fraction`` of each class's ``rows`` (at least 1, never all) as queries."""
    database, query = [], []
    for class_id, group in t.iloc[np.sort(rows)].groupby("class_id", sort=True):
        members = group.index.to_numpy()
        if len(members) < 2:
            raise DataError(f"class {class_id} has {len(members)} train image(s); {what} needs at least 2 "
                            f"per class to split {1 - fraction:.0%}/{fraction:.0%}")
        members = rng.permutation(members)
        n_query = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        query.append(members[:n_query])
        database.append(members[n_query:])
    return np.sort(np.concatenate(database)), np.sort(np.concatenate(query))


def ssb_class_split(cars: CarsDataset, path: str | Path | None = None) -> pd.DataFrame:
    """The SSB class split (``class_id, class_name, ssb_split``: known / easy / medium / hard) for ``cars``.

    ``path`` defaults to :data:`SSB_DEFAULT` relative to the dataset's root. Every class id must name the same
    class in both files: this catches a split shifted by one (a known bug of a public loader, whose indices are
    0-based) or a split meant for another dataset.
    """
    path = Path(path) if path else Path(cars.root) / SSB_DEFAULT
    if not path.is_file():
        raise DataError(f"no SSB class split at {path}; protocol 'ssb' needs the Semantic Shift Benchmark's "
                        "splits.csv (class_id, class_name, ssb_split) for Stanford Cars: pass ssb_file=<path> "
                        "(on our machines: ../shared/data/ssb_stanford_cars/splits.csv)")
    table = pd.read_csv(path)
    missing = {"class_id", "class_name", "ssb_split"} - set(table.columns)
    if missing:
        raise DataError(f"{path} lacks the columns {sorted(missing)}")
    bad = sorted(set(table["ssb_split"]) - {"known", *SSB_DIFFICULTIES})
    if bad:
        raise DataError(f"{path}: unknown ssb_split values {bad}; expected known, easy, medium or hard")
    ours = pd.Series(cars.class_names, index=range(1, cars.num_classes + 1))
    if len(table) != cars.num_classes or set(table["class_id"]) != set(ours.index):
        raise DataError(f"{path} lists {len(table)} classes, this dataset has {cars.num_classes}: it is not the "
                        "SSB split of this dataset")
    theirs = table.set_index("class_id")["class_name"].reindex(ours.index)
    wrong = ours.index[ours.str.lower() != theirs.str.lower()]
    if len(wrong):
        i = wrong[0]
        raise DataError(f"{path} names class {i} {theirs[i]!r}, this dataset {ours[i]!r} ({len(wrong)} classes "
                        "differ): the split's ids are shifted or belong to another class list")
    return table.sort_values("class_id").reset_index(drop=True)


def heldout_classes(cars: CarsDataset, unit: str, fraction: float, seed: int,
                    among: np.ndarray | None = None) -> np.ndarray:
    """Class ids held out of training and database for ``open-world``, chosen by ``unit`` (see make_split);
    ``among``: only from these class ids (a validation split's known classes), ``fraction`` of them."""
    if unit not in HOLDOUT_UNITS:
        raise ValueError(f"unknown holdout unit {unit!r}; choose one of {HOLDOUT_UNITS}")
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    h = cars.hierarchy
    if among is not None:
        h = h[h["class_id"].isin(among)]
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
