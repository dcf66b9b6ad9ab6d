"""Parse car class names into a (make, type, model, year) label hierarchy.

Works for Stanford Cars 196 names ("BMW 3 Series Sedan 2012",
"Ram C/V Cargo Van Minivan 2012", "Acura TL Type-S 2008") and for SynthCars
names, which follow ``"<Make> <Model> <BodyWord> <Year>"``.

Parsing rules
-------------
* The last token must be a 4-digit year.
* The make is the first token, or the first two tokens for the makes in
  `MULTIWORD_MAKES`. Hyphenated makes ("Mercedes-Benz") are one token and the
  make keeps the capitalisation used in the name ("smart", "FIAT").
* ``model`` is everything between the make and the year, body words included.
* Body-style phrases (``_BODY_PHRASES``: "Sedan", "Crew Cab", "Cargo Van",
  "Conv.", "Drophead Coupe", ...) are matched anywhere in the model, longest
  phrase first, case-insensitively. The *last* phrase found gives the
  canonical ``type``; ``family`` is the model with all of them removed.
  Trim designations ("Type-S", "SRT-8", "ZR1", "Hybrid") are not body words
  and stay in the family.
* Names with no body word take their type from `TYPE_OVERRIDES` (keyed by
  full class name). An override always wins over the body words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

__all__ = [
    "BODY_TYPES",
    "MULTIWORD_MAKES",
    "TYPE_OVERRIDES",
    "LEVELS",
    "CarLabel",
    "parse_class_name",
    "hierarchy_table",
    "level_keys",
]

BODY_TYPES: tuple[str, ...] = (
    "Sedan",
    "SUV",
    "Coupe",
    "Convertible",
    "Hatchback",
    "Wagon",
    "Minivan",
    "Van",
    "Pickup",
)

MULTIWORD_MAKES: tuple[str, ...] = ("AM General", "Aston Martin", "Land Rover")

#: Body-style phrases (as token tuples) -> canonical body type.
_BODY_PHRASES: dict[tuple[str, ...], str] = {
    ("Sedan",): "Sedan",
    ("SUV",): "SUV",
    ("Coupe",): "Coupe",
    ("Convertible",): "Convertible",
    ("Conv.",): "Convertible",
    ("Drophead", "Coupe"): "Convertible",
    ("Hatchback",): "Hatchback",
    ("Wagon",): "Wagon",
    ("Minivan",): "Minivan",
    ("Van",): "Van",
    ("Cargo", "Van"): "Van",
    ("Passenger", "Van"): "Van",
    ("Wagon", "Van"): "Van",
    ("Pickup",): "Pickup",
    ("Cab",): "Pickup",
    ("Crew", "Cab"): "Pickup",
    ("Extended", "Cab"): "Pickup",
    ("Regular", "Cab"): "Pickup",
    ("Quad", "Cab"): "Pickup",
    ("Club", "Cab"): "Pickup",
    ("SuperCab",): "Pickup",
    ("SuperCrew",): "Pickup",
}
_PHRASES_BY_LEN: dict[int, dict[tuple[str, ...], str]] = {}
for _phrase, _type in _BODY_PHRASES.items():
    _PHRASES_BY_LEN.setdefault(len(_phrase), {})[
        tuple(t.lower() for t in _phrase)
    ] = _type
_MAX_PHRASE_LEN = max(_PHRASES_BY_LEN)

#: Body type for class names whose body style is not spelled out (full class
#: name -> canonical type), filled in from knowledge of the real cars.
TYPE_OVERRIDES: dict[str, str] = {
    "Acura TL Type-S 2008": "Sedan",
    "Acura Integra Type R 2001": "Coupe",  # DC2 3-door liftback, sold as coupe
    "Buick Regal GS 2012": "Sedan",
    "Chevrolet Corvette ZR1 2012": "Coupe",
    "Chevrolet Corvette Ron Fellows Edition Z06 2007": "Coupe",
    "Chevrolet HHR SS 2010": "Wagon",
    "Chevrolet Cobalt SS 2010": "Coupe",  # 2010 SS was coupe-only
    "Chevrolet TrailBlazer SS 2009": "SUV",
    "Chrysler 300 SRT-8 2010": "Sedan",
    "Dodge Challenger SRT8 2011": "Coupe",
    "Dodge Charger SRT-8 2009": "Sedan",
    "FIAT 500 Abarth 2012": "Hatchback",  # 500c Abarth only from MY2013
    "Infiniti G Coupe IPL 2012": "Coupe",
    "Jaguar XK XKR 2012": "Coupe",  # XKR also came as convertible
    "Lamborghini Gallardo LP 570-4 Superleggera 2012": "Coupe",
}

LEVELS: tuple[str, ...] = ("make", "type", "model", "year")

_YEAR_RE = re.compile(r"\d{4}")


@dataclass(frozen=True)
class CarLabel:
    """Hierarchical label of one car class.

    Attributes
    ----------
    make : str
        Manufacturer as written ("BMW", "Land Rover", "smart").
    model : str
        Everything between make and year, body words included
        ("3 Series Sedan", "Silverado 1500 Extended Cab").
    family : str
        `model` without body-style words ("3 Series", "Silverado 1500");
        shared by the body variants of one model ("Accord Coupe"/"Accord Sedan").
    type : str
        Canonical body type, one of `BODY_TYPES`.
    year : int
        Model year.
    """

    make: str
    model: str
    family: str
    type: str
    year: int


def _split_body(model_tokens: list[str]) -> tuple[list[str], str | None]:
    """Remove body phrases from model tokens; return (family tokens, last type)."""
    family: list[str] = []
    body_type: str | None = None
    i = 0
    n = len(model_tokens)
    while i < n:
        for length in range(min(_MAX_PHRASE_LEN, n - i), 0, -1):
            key = tuple(t.lower() for t in model_tokens[i : i + length])
            found = _PHRASES_BY_LEN.get(length, {}).get(key)
            if found is not None:
                body_type = found
                i += length
                break
        else:
            family.append(model_tokens[i])
            i += 1
    return family, body_type


def parse_class_name(name: str) -> CarLabel:
    """Parse a class name such as ``"BMW 3 Series Sedan 2012"`` into a `CarLabel`.

    Raises
    ------
    ValueError
        If the last token is not a 4-digit year, if no model remains between
        make and year (or the model is only body words), or if no body type
        can be determined.
    """
    tokens = name.split()
    if not tokens or not _YEAR_RE.fullmatch(tokens[-1]):
        raise ValueError(
            f"cannot parse class name {name!r}: expected '<Make> <Model> <Year>' "
            "ending in a 4-digit year"
        )
    year = int(tokens[-1])
    body = tokens[:-1]
    make_len = 1
    for multi in MULTIWORD_MAKES:
        parts = multi.split()
        if body[: len(parts)] == parts:
            make_len = len(parts)
            break
    make = " ".join(body[:make_len])
    model_tokens = body[make_len:]
    if not make or not model_tokens:
        raise ValueError(
            f"cannot parse class name {name!r}: expected a model name between "
            "the make and the year"
        )
    family_tokens, body_type = _split_body(model_tokens)
    if not family_tokens:
        raise ValueError(
            f"cannot parse class name {name!r}: the model consists only of body "
            "words; expected a model name before the body word"
        )
    key = " ".join(tokens)
    if key in TYPE_OVERRIDES:
        body_type = TYPE_OVERRIDES[key]
    if body_type is None:
        raise ValueError(
            f"cannot determine body type of {name!r}: no body word "
            f"({', '.join(BODY_TYPES)}, '... Cab', 'Cargo Van', ...) found; add "
            "the name to TYPE_OVERRIDES in vericar/data/hierarchy.py or use a body word"
        )
    return CarLabel(
        make=make,
        model=" ".join(model_tokens),
        family=" ".join(family_tokens),
        type=body_type,
        year=year,
    )


def hierarchy_table(class_names: Sequence[str]) -> pd.DataFrame:
    """Parse class names into a table, one row per name in the given order.

    Returns
    -------
    pandas.DataFrame
        Columns ``class_name, make, model, family, type, year``.
    """
    rows = []
    for name in class_names:
        lab = parse_class_name(name)
        rows.append(
            (name, lab.make, lab.model, lab.family, lab.type, lab.year)
        )
    table = pd.DataFrame(
        rows, columns=["class_name", "make", "model", "family", "type", "year"]
    )
    table["year"] = table["year"].astype("int64")
    return table


def level_keys(table: pd.DataFrame, level: str) -> pd.Series:
    """Per-row hashable key of the label prefix down to `level`.

    Level order is `LEVELS` = make -> type -> model -> year, so the key is
    ``(make,)``, ``(make, type)``, ``(make, type, model)`` or
    ``(make, type, model, year)``. Two rows share a key at level L iff they
    agree on every level up to L. Because ``model`` is the full model name
    (body words included), the "model" level already identifies the class up
    to its year; only "year" separates e.g. Audi S4 Sedan 2007 from 2012.

    Parameters
    ----------
    table : pandas.DataFrame
        Table with columns make, type, model, year (e.g. from `hierarchy_table`).
    level : str
        One of `LEVELS`.

    Returns
    -------
    pandas.Series
        Tuples, indexed like `table`.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    cols = list(LEVELS[: LEVELS.index(level) + 1])
    keys = [tuple(row) for row in table[cols].itertuples(index=False, name=None)]
    return pd.Series(keys, index=table.index, name=f"{level}_key", dtype=object)
