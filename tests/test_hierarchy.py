"""Tests for vericar.data.hierarchy (class-name parsing and label hierarchy)."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from vericar.data.hierarchy import (
    BODY_TYPES,
    LEVELS,
    MULTIWORD_MAKES,
    TYPE_OVERRIDES,
    CarLabel,
    hierarchy_table,
    level_keys,
    parse_class_name,
)

CSV_PATH = Path(__file__).parent / "data" / "stanford_cars_hierarchy.csv"


def _load_reference() -> list[dict[str, str]]:
    with CSV_PATH.open(newline="") as fh:
        return list(csv.DictReader(fh))


REFERENCE = _load_reference()


def test_reference_csv_shape():
    assert len(REFERENCE) == 196
    assert [int(r["class_id"]) for r in REFERENCE] == list(range(1, 197))
    assert len({r["class_name"] for r in REFERENCE}) == 196
    assert {r["type"] for r in REFERENCE} <= set(BODY_TYPES)


@pytest.mark.parametrize("row", REFERENCE, ids=lambda r: r["class_name"])
def test_all_stanford_names_match_hand_table(row):
    lab = parse_class_name(row["class_name"])
    assert lab.make == row["make"]
    assert lab.family == row["family"]
    assert lab.type == row["type"]
    assert lab.year == int(row["year"])
    # model is exactly what lies between make and year
    assert row["class_name"] == f"{lab.make} {lab.model} {lab.year}"


def test_make_model_year_unique_over_stanford():
    table = hierarchy_table([r["class_name"] for r in REFERENCE])
    assert not table.duplicated(["make", "model", "year"]).any()
    assert level_keys(table, "year").is_unique


@pytest.mark.parametrize(
    "name, expected",
    [
        ("BMW 3 Series Sedan 2012", ("BMW", "3 Series Sedan", "3 Series", "Sedan", 2012)),
        ("Land Rover LR2 SUV 2012", ("Land Rover", "LR2 SUV", "LR2", "SUV", 2012)),
        ("AM General Hummer SUV 2000", ("AM General", "Hummer SUV", "Hummer", "SUV", 2000)),
        (
            "Chevrolet Silverado 1500 Extended Cab 2012",
            ("Chevrolet", "Silverado 1500 Extended Cab", "Silverado 1500", "Pickup", 2012),
        ),
        (
            "Ram C/V Cargo Van Minivan 2012",
            ("Ram", "C/V Cargo Van Minivan", "C/V", "Minivan", 2012),
        ),
        ("Acura TL Type-S 2008", ("Acura", "TL Type-S", "TL Type-S", "Sedan", 2008)),
        (
            "Bentley Continental Supersports Conv. Convertible 2012",
            (
                "Bentley",
                "Continental Supersports Conv. Convertible",
                "Continental Supersports",
                "Convertible",
                2012,
            ),
        ),
        (
            "Rolls-Royce Phantom Drophead Coupe Convertible 2012",
            ("Rolls-Royce", "Phantom Drophead Coupe Convertible", "Phantom", "Convertible", 2012),
        ),
        ("Ford E-Series Wagon Van 2012", ("Ford", "E-Series Wagon Van", "E-Series", "Van", 2012)),
        ("smart fortwo Convertible 2012", ("smart", "fortwo Convertible", "fortwo", "Convertible", 2012)),
        ("Ford Ranger SuperCab 2011", ("Ford", "Ranger SuperCab", "Ranger", "Pickup", 2011)),
        ("Nissan NV Passenger Van 2012", ("Nissan", "NV Passenger Van", "NV", "Van", 2012)),
        ("Aston Martin Virage Coupe 2012", ("Aston Martin", "Virage Coupe", "Virage", "Coupe", 2012)),
    ],
)
def test_example_names(name, expected):
    assert parse_class_name(name) == CarLabel(*expected)


def test_same_family_other_body():
    coupe = parse_class_name("Honda Accord Coupe 2012")
    sedan = parse_class_name("Honda Accord Sedan 2012")
    assert coupe.family == sedan.family == "Accord"
    assert (coupe.type, sedan.type) == ("Coupe", "Sedan")
    assert coupe.model != sedan.model


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Zentra Volo Sedan 2011", ("Zentra", "Volo Sedan", "Volo", "Sedan", 2011)),
        ("Krato Baja Pickup 2010", ("Krato", "Baja Pickup", "Baja", "Pickup", 2010)),
        ("Orvix Tamo Coupe 2003", ("Orvix", "Tamo Coupe", "Tamo", "Coupe", 2003)),
        ("Orvix Tamo SUV 2003", ("Orvix", "Tamo SUV", "Tamo", "SUV", 2003)),
        ("Velda Nori Hatchback 1999", ("Velda", "Nori Hatchback", "Nori", "Hatchback", 1999)),
        ("Velda Nori Van 1999", ("Velda", "Nori Van", "Nori", "Van", 1999)),
        ("Quenta Lumo Convertible 2015", ("Quenta", "Lumo Convertible", "Lumo", "Convertible", 2015)),
        ("Quenta Lumo Wagon 2015", ("Quenta", "Lumo Wagon", "Lumo", "Wagon", 2015)),
    ],
)
def test_synthcars_names(name, expected):
    assert parse_class_name(name) == CarLabel(*expected)


def test_overrides_are_valid():
    assert set(TYPE_OVERRIDES.values()) <= set(BODY_TYPES)
    stanford = {r["class_name"] for r in REFERENCE}
    assert set(TYPE_OVERRIDES) <= stanford
    for name, body in TYPE_OVERRIDES.items():
        assert parse_class_name(name).type == body


def test_multiword_makes():
    for make in MULTIWORD_MAKES:
        lab = parse_class_name(f"{make} Foo Sedan 2010")
        assert (lab.make, lab.model) == (make, "Foo Sedan")


def test_extra_whitespace_is_tolerated():
    assert parse_class_name("  BMW  X5 SUV 2007 ") == parse_class_name("BMW X5 SUV 2007")


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("BMW 3 Series Sedan", "4-digit year"),
        ("BMW 3 Series Sedan 12", "4-digit year"),
        ("BMW 3 Series Sedan 2012a", "4-digit year"),
        ("", "4-digit year"),
        ("BMW 2012", "model"),
        ("Land Rover 2012", "model"),
        ("2012", "model"),
        ("Zentra Sedan 2011", "only of body words"),
        ("Acura NSX Type-R 2002", "TYPE_OVERRIDES"),
        ("Zentra Volo 2011", "TYPE_OVERRIDES"),
    ],
)
def test_errors(name, fragment):
    with pytest.raises(ValueError) as info:
        parse_class_name(name)
    msg = str(info.value)
    assert fragment in msg
    assert repr(name) in msg


def test_hierarchy_table_columns_and_order():
    names = ["Zentra Volo Sedan 2011", "BMW 3 Series Wagon 2012", "Acura TL Type-S 2008"]
    table = hierarchy_table(names)
    assert list(table.columns) == ["class_name", "make", "model", "family", "type", "year"]
    assert table["class_name"].tolist() == names
    assert table["type"].tolist() == ["Sedan", "Wagon", "Sedan"]
    assert table["year"].dtype == "int64"
    assert table["year"].tolist() == [2011, 2012, 2008]


def test_hierarchy_table_empty():
    table = hierarchy_table([])
    assert len(table) == 0
    assert list(table.columns) == ["class_name", "make", "model", "family", "type", "year"]


def test_level_keys_prefix_semantics():
    names = [
        "Audi S4 Sedan 2012",  # 0
        "Audi S4 Sedan 2007",  # 1: same up to model
        "Audi S5 Coupe 2012",  # 2: same make, other type
        "Audi S6 Sedan 2011",  # 3: same make+type, other model
        "BMW M5 Sedan 2010",  # 4: other make
        "Zentra S4 Sedan 2012",  # 5: other make, same type/model/year as 0
    ]
    table = hierarchy_table(names)
    table.index = [10, 11, 12, 13, 14, 15]  # keys must follow the table's index
    assert LEVELS == ("make", "type", "model", "year")
    keys = {lvl: level_keys(table, lvl) for lvl in LEVELS}
    for lvl, series in keys.items():
        assert list(series.index) == list(table.index)
        assert len(series.iloc[0]) == LEVELS.index(lvl) + 1
        hash(series.iloc[0])
    assert keys["make"].iloc[0] == ("Audi",)
    assert keys["year"].iloc[0] == ("Audi", "Sedan", "S4 Sedan", 2012)

    def agree(i, j, lvl):
        return keys[lvl].iloc[i] == keys[lvl].iloc[j]

    # rows share a key at level L iff they agree on every level up to L
    for i in range(len(names)):
        for j in range(len(names)):
            for depth, lvl in enumerate(LEVELS):
                expected = all(
                    table[c].iloc[i] == table[c].iloc[j] for c in LEVELS[: depth + 1]
                )
                assert agree(i, j, lvl) == expected, (i, j, lvl)

    assert agree(0, 1, "model") and not agree(0, 1, "year")
    assert agree(0, 2, "make") and not agree(0, 2, "type")
    assert agree(0, 3, "type") and not agree(0, 3, "model")
    assert not agree(0, 4, "make")
    # prefix semantics: a different make separates rows at every level
    assert not any(agree(0, 5, lvl) for lvl in LEVELS)


def test_level_keys_unknown_level():
    table = hierarchy_table(["BMW X5 SUV 2007"])
    with pytest.raises(ValueError, match="family"):
        level_keys(table, "family")


def test_level_keys_work_on_plain_dataframe():
    table = pd.DataFrame(
        {"make": ["A", "A"], "type": ["SUV", "SUV"], "model": ["X", "Y"], "year": [2000, 2000]}
    )
    assert level_keys(table, "type").nunique() == 1
    assert level_keys(table, "model").nunique() == 2
