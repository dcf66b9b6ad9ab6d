"""SynthCars: a procedurally drawn, fine-grained car dataset (Pillow + numpy only).

SynthCars is the study's built-in default dataset for machines without the real
Stanford Cars copy. Every class is a real four-level hierarchy::

    make  >  body type  >  model  >  model year
    "Zentra Volo Sedan 2011"  ->  make "Zentra", model "Volo", type "Sedan", year 2011

* **Make** -- an invented brand with a design language shared by all its models:
  window-trim colour, rim colour, window-corner rounding, a character line, a
  badge shape, a headlight tint and small proportion offsets.
* **Body type** -- one of :data:`BODY_TYPES`, each with its own silhouette
  (three-box, fastback, two-box, monobox van, cab + bed pickup, open top).
* **Model** -- belongs to one make and one body type and has its own proportions:
  wheel size / wheelbase, ride height, belt and roof line, bonnet length,
  windscreen rake, pillar widths, number of side windows, lamp sizes.
* **Model year** -- two consecutive years of a model differ only in a couple of
  small details (headlight / tail-light shape, stripe, wheel design, bumper trim,
  mirror, fender vent, roof rails): this is what makes the task fine-grained.

Per-image nuisances (never tied to the class): body colour, background (sky /
wall gradients, ground, buildings, trees, road marks, clutter), scale, position,
left/right view (horizontal mirror), slight rotation, aspect change and
perspective (the car turned a little away from the camera), lighting / colour
cast, blur, noise, partial occlusion (pole, box, bush, sign) and wheel rotation.

On-disk layout (the same compact layout as the converted real data)::

    <out_dir>/labels.csv          filename,split,class_id,class_name,
                                  bbox_x1,bbox_y1,bbox_x2,bbox_y2,width,height
    <out_dir>/class_names.txt     line N = name of class_id N (1-based)
    <out_dir>/images/train/00001.jpg, images/test/00001.jpg, ...
    <out_dir>/synthcars.json      generation parameters (generator, version, config, counts)

Bounding boxes are 0-based pixel coordinates with ``x2``/``y2`` exclusive, i.e.
``image.crop((x1, y1, x2, y2))`` is the car, ``0 <= x1 < x2 <= width``. The box
covers the whole car (also the parts hidden by an occluder), not its shadow.

Generation is deterministic: every image is drawn from its own RNG seeded by
``(seed, class_id, split, index)`` and the class structure from ``seed`` alone,
never from global RNG state, so the same config gives a byte-identical
``labels.csv`` and identical JPEG files, whatever the number of worker processes.

Re-use: :func:`make_synthcars` returns at once when ``out_dir`` already holds a
complete SynthCars folder generated with the same parameters. If ``out_dir``
holds a SynthCars folder with *different* parameters it raises
:class:`FileExistsError` (pass ``overwrite=True`` to delete that SynthCars
folder's files and regenerate); a non-empty folder that is not a SynthCars folder
is never touched. Images are written into a temporary sibling folder that is
renamed into place at the end, so an interrupted run never leaves a folder that
looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "BODY_TYPES",
    "SYNTHCARS_VERSION",
    "SynthCarsConfig",
    "MakeSpec",
    "ModelSpec",
    "YearSpec",
    "CarClass",
    "build_classes",
    "class_counts",
    "render_car",
    "render_image",
    "make_synthcars",
    "LABEL_COLUMNS",
]

#: Bump when the drawing code changes in a way that changes the images.
SYNTHCARS_VERSION = 1

#: The body words used in class names (second-to-last token).
BODY_TYPES: tuple[str, ...] = (
    "Sedan", "Coupe", "SUV", "Hatchback", "Pickup", "Van", "Convertible", "Wagon",
)

LABEL_COLUMNS: tuple[str, ...] = (
    "filename", "split", "class_id", "class_name",
    "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "width", "height",
)

_SPLIT_CODE = {"train": 0, "test": 1}
_JPEG_QUALITY = 90

# Seed-sequence "streams" (second entropy word) so the parts of the generator
# never share random numbers.
_STREAM_CLASSES = 7919
_STREAM_COUNTS = 104729
_STREAM_ORDER = 15485863


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthCarsConfig:
    """Parameters of a SynthCars folder (all of them are recorded in ``synthcars.json``).

    ``train_per_class`` / ``test_per_class`` are inclusive ``(low, high)`` ranges;
    every class draws its own count, so the classes are unevenly sized.
    """

    n_makes: int = 8
    models_per_make: int = 4
    years_per_model: int = 2
    train_per_class: tuple[int, int] = (12, 40)
    test_per_class: tuple[int, int] = (10, 20)
    image_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the config stays hashable.
        for name in ("train_per_class", "test_per_class"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 2 or not 1 <= value[0] <= value[1]:
                raise ValueError(f"{name} must be (low, high) with 1 <= low <= high, got {value}")
            object.__setattr__(self, name, value)
        for name in ("n_makes", "models_per_make", "years_per_model"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.image_size < 32:
            raise ValueError("image_size must be >= 32")

    @classmethod
    def tiny(cls, seed: int = 0) -> "SynthCarsConfig":
        """A 12-class, ~100-image, 64 px config for unit tests (generates in well under a second)."""
        return cls(n_makes=3, models_per_make=2, years_per_model=2,
                   train_per_class=(4, 8), test_per_class=(2, 4), image_size=64, seed=seed)

    @property
    def num_classes(self) -> int:
        return self.n_makes * self.models_per_make * self.years_per_model

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train_per_class"] = list(self.train_per_class)
        d["test_per_class"] = list(self.test_per_class)
        return d


# ---------------------------------------------------------------------------
# Class specifications
# ---------------------------------------------------------------------------

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class MakeSpec:
    """A brand's design language, shared by all its models."""

    name: str
    trim_rgb: RGB          # window surround / pillars
    rim_rgb: RGB           # wheel colour
    badge: str             # circle | diamond | triangle | square | bar
    char_line: str         # none | straight | rising | falling | double
    window_round: float    # corner radius of the side windows (fraction of length)
    light_rgb: RGB         # headlight lens tint
    rake_offset: float     # added to the windscreen rake of every model
    hood_offset: float     # added to the bonnet drop of every model
    wheel_scale: float     # multiplies the wheel radius of every model


@dataclass(frozen=True)
class ModelSpec:
    """Proportions of one model. Lengths are fractions of the car's length; x runs
    rear (0) -> front (1), y is the height above the ground."""

    make: MakeSpec
    name: str
    body: str
    ride: float            # underside of the body
    belt: float            # window sill line
    roof: float            # roof height (windscreen top for a convertible)
    hood_drop: float       # how much lower the nose is than the belt line
    wheel_r: float
    wheel_rear: float      # x of the rear axle
    wheel_front: float     # x of the front axle
    ws_base: float         # x where the windscreen meets the bonnet
    ws_rake: float         # horizontal run of the windscreen
    roof_back: float       # x where the roof ends at the back (cab wall for a pickup)
    rear_base: float       # x where the rear window meets the boot lid (three-box shapes)
    deck: float            # boot-lid height (three-box shapes)
    a_w: float             # A-pillar width
    c_w: float             # C/D-pillar width
    n_windows: int         # side windows (split by B / C pillars)
    b_pos: float           # B-pillar position as a fraction of the window run
    rim_frac: float        # rim radius / tyre radius
    head_w: float          # headlight box
    head_h: float
    tail_w: float          # tail-light box
    tail_h: float
    accent_rgb: RGB        # folding-top colour (convertible) / bed liner (pickup)


@dataclass(frozen=True)
class YearSpec:
    """Small per-year details (what separates two years of the same model)."""

    headlight: str         # see _LAMP_SHAPES
    taillight: str
    stripe: str            # none | single | double | shoulder | lowband
    wheel_style: str       # spoke | disc | star | split
    wheel_spokes: int
    mirror: str            # tri | round | none
    bumper: str            # body | dark | chrome
    vent: int              # 0 = no fender vent, else number of bars
    rails: bool            # roof rails (only drawn on roofed two-box bodies)


@dataclass(frozen=True)
class CarClass:
    class_id: int          # 1-based
    model: ModelSpec
    year: int
    details: YearSpec

    @property
    def make(self) -> MakeSpec:
        return self.model.make

    @property
    def name(self) -> str:
        return f"{self.model.make.name} {self.model.name} {self.model.body} {self.year}"


# Invented brand names (single capitalised words); more are made up from syllables.
_MAKE_NAMES = (
    "Zentra", "Krato", "Velmar", "Oskia", "Tavrin", "Lumeo", "Quarza", "Haldor",
    "Sorvik", "Ebrana", "Dovetti", "Marlo", "Ilvana", "Corvex", "Pyrra", "Brenna",
)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st", "tr", "vr")
_VOWELS = ("a", "e", "i", "o", "u", "ia", "eo")
_CODAS = ("", "", "", "n", "r", "s", "x", "l")

_LAMP_SHAPES = ("rect", "round", "slant", "slim", "twin", "boomerang", "tear")
_TAIL_SHAPES = ("rect", "round", "strip", "vertical", "L", "twin")
_STRIPES = ("none", "single", "double", "shoulder", "lowband")
_WHEEL_STYLES = ("spoke", "disc", "star", "split")
_MIRRORS = ("tri", "round", "none")
_BUMPERS = ("body", "dark", "chrome")
_VENTS = (0, 2, 3, 4)
_ROOFED_TWO_BOX = ("SUV", "Wagon", "Van", "Hatchback")

# Year-to-year changes: one "major" slot (clearly visible) plus one more slot.
_MAJOR_SLOTS = ("headlight", "taillight", "stripe", "wheel", "bumper")
_MINOR_SLOTS = ("mirror", "vent", "rails")

_TRIMS: tuple[RGB, ...] = ((30, 30, 34), (205, 208, 214), (120, 124, 130), (62, 44, 36))
_RIMS: tuple[RGB, ...] = ((200, 202, 208), (70, 72, 78), (196, 160, 80), (235, 235, 235), (140, 30, 30))
_BADGES = ("circle", "diamond", "triangle", "square", "bar")
_CHAR_LINES = ("none", "straight", "rising", "falling", "double")
_LIGHT_TINTS: tuple[RGB, ...] = ((250, 250, 236), (255, 236, 170), (214, 232, 255))
_ACCENTS: tuple[RGB, ...] = ((28, 28, 30), (196, 178, 140), (96, 28, 30), (40, 44, 70))

# Per body type: (low, high) ranges of the ModelSpec proportions.
_BODY_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "Sedan": dict(ride=(.05, .06), belt=(.195, .215), roof=(.285, .31), hood_drop=(.02, .04),
                  wheel_r=(.068, .078), wheel_rear=(.17, .21), wheel_front=(.78, .82),
                  ws_base=(.66, .72), ws_rake=(.12, .16), roof_back=(.33, .38),
                  rear_base=(.17, .23), deck=(.205, .225), a_w=(.015, .025), c_w=(.04, .07)),
    "Coupe": dict(ride=(.045, .055), belt=(.18, .195), roof=(.265, .29), hood_drop=(.025, .045),
                  wheel_r=(.07, .08), wheel_rear=(.17, .20), wheel_front=(.79, .83),
                  ws_base=(.62, .67), ws_rake=(.15, .19), roof_back=(.38, .44),
                  rear_base=(.08, .14), deck=(.19, .21), a_w=(.015, .02), c_w=(.05, .09)),
    "Convertible": dict(ride=(.045, .055), belt=(.18, .20), roof=(.245, .27), hood_drop=(.025, .045),
                        wheel_r=(.07, .08), wheel_rear=(.17, .20), wheel_front=(.79, .83),
                        ws_base=(.62, .68), ws_rake=(.08, .11), roof_back=(.30, .36),
                        rear_base=(.15, .22), deck=(.195, .215), a_w=(.012, .016), c_w=(.0, .0)),
    "Hatchback": dict(ride=(.055, .065), belt=(.22, .24), roof=(.33, .36), hood_drop=(.03, .05),
                      wheel_r=(.08, .09), wheel_rear=(.14, .17), wheel_front=(.81, .85),
                      ws_base=(.66, .72), ws_rake=(.16, .20), roof_back=(.06, .12),
                      rear_base=(0, 0), deck=(0, 0), a_w=(.015, .025), c_w=(.06, .10)),
    "Wagon": dict(ride=(.05, .06), belt=(.20, .22), roof=(.30, .325), hood_drop=(.025, .04),
                  wheel_r=(.07, .078), wheel_rear=(.18, .21), wheel_front=(.79, .82),
                  ws_base=(.68, .72), ws_rake=(.13, .16), roof_back=(.03, .06),
                  rear_base=(0, 0), deck=(0, 0), a_w=(.015, .025), c_w=(.035, .055)),
    "SUV": dict(ride=(.085, .10), belt=(.28, .30), roof=(.40, .43), hood_drop=(.02, .035),
                wheel_r=(.09, .10), wheel_rear=(.17, .20), wheel_front=(.80, .83),
                ws_base=(.70, .74), ws_rake=(.11, .14), roof_back=(.03, .07),
                rear_base=(0, 0), deck=(0, 0), a_w=(.018, .028), c_w=(.04, .07)),
    "Van": dict(ride=(.06, .07), belt=(.26, .29), roof=(.48, .52), hood_drop=(.03, .05),
                wheel_r=(.07, .08), wheel_rear=(.15, .18), wheel_front=(.84, .87),
                ws_base=(.86, .90), ws_rake=(.08, .12), roof_back=(.01, .02),
                rear_base=(0, 0), deck=(0, 0), a_w=(.015, .022), c_w=(.03, .05)),
    "Pickup": dict(ride=(.085, .10), belt=(.27, .29), roof=(.39, .42), hood_drop=(.02, .035),
                   wheel_r=(.09, .10), wheel_rear=(.17, .20), wheel_front=(.80, .83),
                   ws_base=(.72, .76), ws_rake=(.10, .13), roof_back=(.38, .46),
                   rear_base=(0, 0), deck=(0, 0), a_w=(.018, .026), c_w=(.02, .03)),
}
_N_WINDOWS = {"Sedan": (2, 3), "Coupe": (1, 2), "Convertible": (1, 1), "Hatchback": (2, 3),
              "Wagon": (3, 3), "SUV": (2, 3), "Van": (3, 4), "Pickup": (1, 2)}


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _syllable_name(rng: np.random.Generator, n_syllables: int) -> str:
    parts = [_pick(rng, _ONSETS) + _pick(rng, _VOWELS) for _ in range(n_syllables)]
    return ("".join(parts) + _pick(rng, _CODAS)).capitalize()


def _make_names(rng: np.random.Generator, n: int) -> list[str]:
    names = [str(x) for x in rng.permutation(np.array(_MAKE_NAMES))][:n]
    while len(names) < n:
        cand = _syllable_name(rng, 2)
        if cand not in names:
            names.append(cand)
    return names


def _model_names(rng: np.random.Generator, n: int, taken: Iterable[str]) -> list[str]:
    taken = {t.lower() for t in taken} | {b.lower() for b in BODY_TYPES}
    names: list[str] = []
    while len(names) < n:
        cand = _syllable_name(rng, int(rng.integers(2, 4)) if rng.random() < 0.3 else 2)
        if cand.lower() not in taken and 3 <= len(cand) <= 9:
            taken.add(cand.lower())
            names.append(cand)
    return names


def _make_spec(rng: np.random.Generator, name: str) -> MakeSpec:
    return MakeSpec(
        name=name,
        trim_rgb=_pick(rng, _TRIMS),
        rim_rgb=_pick(rng, _RIMS),
        badge=_pick(rng, _BADGES),
        char_line=_pick(rng, _CHAR_LINES),
        window_round=float(rng.choice([0.0, 0.008, 0.016, 0.026])),
        light_rgb=_pick(rng, _LIGHT_TINTS),
        rake_offset=float(rng.uniform(-0.02, 0.02)),
        hood_offset=float(rng.uniform(-0.008, 0.008)),
        wheel_scale=float(rng.uniform(0.94, 1.06)),
    )


def _model_spec(rng: np.random.Generator, make: MakeSpec, name: str, body: str) -> ModelSpec:
    r = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in _BODY_RANGES[body].items()}
    lo, hi = _N_WINDOWS[body]
    return ModelSpec(
        make=make, name=name, body=body,
        ride=r["ride"], belt=r["belt"], roof=r["roof"],
        hood_drop=max(0.01, r["hood_drop"] + make.hood_offset),
        wheel_r=r["wheel_r"] * make.wheel_scale,
        wheel_rear=r["wheel_rear"], wheel_front=r["wheel_front"],
        ws_base=r["ws_base"], ws_rake=max(0.05, r["ws_rake"] + make.rake_offset),
        roof_back=r["roof_back"], rear_base=r["rear_base"], deck=r["deck"],
        a_w=r["a_w"], c_w=r["c_w"],
        n_windows=int(rng.integers(lo, hi + 1)),
        b_pos=float(rng.uniform(0.42, 0.6)),
        rim_frac=float(rng.uniform(0.55, 0.74)),
        head_w=float(rng.uniform(0.05, 0.085)), head_h=float(rng.uniform(0.022, 0.036)),
        tail_w=float(rng.uniform(0.03, 0.06)), tail_h=float(rng.uniform(0.02, 0.035)),
        accent_rgb=_pick(rng, _ACCENTS),
    )


def _random_details(rng: np.random.Generator) -> YearSpec:
    return YearSpec(
        headlight=_pick(rng, _LAMP_SHAPES), taillight=_pick(rng, _TAIL_SHAPES),
        stripe=_pick(rng, _STRIPES), wheel_style=_pick(rng, _WHEEL_STYLES),
        wheel_spokes=int(rng.integers(3, 8)), mirror=_pick(rng, _MIRRORS),
        bumper=_pick(rng, _BUMPERS), vent=int(_pick(rng, _VENTS)), rails=bool(rng.random() < 0.5),
    )


def _change_slot(rng: np.random.Generator, d: YearSpec, slot: str) -> YearSpec:
    def other(options, current):
        return _pick(rng, [o for o in options if o != current])

    if slot == "headlight":
        return replace(d, headlight=other(_LAMP_SHAPES, d.headlight))
    if slot == "taillight":
        return replace(d, taillight=other(_TAIL_SHAPES, d.taillight))
    if slot == "stripe":
        return replace(d, stripe=other(_STRIPES, d.stripe))
    if slot == "wheel":
        if rng.random() < 0.5:
            return replace(d, wheel_style=other(_WHEEL_STYLES, d.wheel_style))
        return replace(d, wheel_spokes=other(range(3, 8), d.wheel_spokes))
    if slot == "bumper":
        return replace(d, bumper=other(_BUMPERS, d.bumper))
    if slot == "mirror":
        return replace(d, mirror=other(_MIRRORS, d.mirror))
    if slot == "vent":
        return replace(d, vent=other(_VENTS, d.vent))
    if slot == "rails":
        return replace(d, rails=not d.rails)
    raise ValueError(slot)


def _year_details(rng: np.random.Generator, body: str, n_years: int) -> list[YearSpec]:
    """Details of consecutive years: each year changes one major slot and one other slot."""
    minor = [s for s in _MINOR_SLOTS if s != "rails" or body in _ROOFED_TWO_BOX]
    first = _random_details(rng)
    if body not in _ROOFED_TWO_BOX:
        first = replace(first, rails=False)  # not drawn on these bodies
    details = [first]
    while len(details) < n_years:
        major = _pick(rng, _MAJOR_SLOTS)
        second = _pick(rng, [s for s in _MAJOR_SLOTS + tuple(minor) if s != major])
        d = _change_slot(rng, _change_slot(rng, details[-1], major), second)
        if d not in details:
            details.append(d)
    return details


def _body_assignment(rng: np.random.Generator, n_makes: int, per_make: int) -> list[list[str]]:
    """Body types per make. Every body word is used once there are >= 8 models, the
    types are used about equally often (counts differ by at most one), and a make
    repeats a type only when it has more than 8 models."""
    total = n_makes * per_make
    q, r = divmod(total, len(BODY_TYPES))
    extra = [BODY_TYPES[int(i)] for i in rng.choice(len(BODY_TYPES), r, replace=False)]
    pool = np.array(list(BODY_TYPES) * q + extra)
    max_rep = -(-per_make // len(BODY_TYPES))  # allowed repeats of a type within a make
    # Rejection-sample a random balanced assignment without repeats within a make ...
    for _ in range(5000):
        groups = rng.permutation(pool).reshape(n_makes, per_make)
        if all(max(np.unique(g, return_counts=True)[1]) <= max_rep for g in groups):
            return [[str(b) for b in g] for g in groups]
    # ... or fall back to a greedy one: each make takes the types with most quota left.
    quota = {b: int((pool == b).sum()) for b in BODY_TYPES}
    out: list[list[str]] = []
    for _ in range(n_makes):
        tie = rng.random(len(BODY_TYPES))
        ranked = sorted(BODY_TYPES, key=lambda b: (-quota[b], tie[BODY_TYPES.index(b)]))
        group = [ranked[i % len(ranked)] for i in range(per_make)]
        for b in group:
            quota[b] -= 1
        out.append([group[int(i)] for i in rng.permutation(per_make)])
    return out


def build_classes(config: SynthCarsConfig | None = None) -> list[CarClass]:
    """The class list (ids 1..C) of a config. Depends only on ``seed`` and the
    make/model/year counts, not on image counts or size."""
    cfg = config or SynthCarsConfig()
    rng = _rng(cfg.seed, _STREAM_CLASSES)
    make_names = _make_names(rng, cfg.n_makes)
    bodies = _body_assignment(rng, cfg.n_makes, cfg.models_per_make)
    model_names = _model_names(rng, cfg.n_makes * cfg.models_per_make, make_names)
    classes: list[CarClass] = []
    for mi, make_name in enumerate(make_names):
        make = _make_spec(rng, make_name)
        for k in range(cfg.models_per_make):
            body = bodies[mi][k]
            model = _model_spec(rng, make, model_names[mi * cfg.models_per_make + k], body)
            year = int(rng.integers(1996, 2016))
            for details in _year_details(rng, body, cfg.years_per_model):
                classes.append(CarClass(len(classes) + 1, model, year, details))
                year += int(rng.integers(1, 4))
    return classes


def class_counts(config: SynthCarsConfig) -> dict[str, np.ndarray]:
    """Images per class for each split (arrays indexed by class_id - 1)."""
    rng = _rng(config.seed, _STREAM_COUNTS)
    c = config.num_classes
    out = {}
    for split, (lo, hi) in (("train", config.train_per_class), ("test", config.test_per_class)):
        out[split] = rng.integers(lo, hi + 1, size=c)
    return out


# ---------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------

Pt = tuple[float, float]


def _x_on(p0: Pt, p1: Pt, y: float) -> float:
    """x of the line p0-p1 at height y."""
    (x0, y0), (x1, y1) = p0, p1
    if abs(y1 - y0) < 1e-9:
        return x0
    return x0 + (x1 - x0) * (y - y0) / (y1 - y0)


def _round_polygon(points: Sequence[Pt], radius: float | Sequence[float], steps: int = 4) -> list[Pt]:
    """Replace every corner by a quadratic Bezier of the given radius (per vertex or scalar)."""
    n = len(points)
    radii = [radius] * n if isinstance(radius, (int, float)) else list(radius)
    ts = [k / steps for k in range(steps + 1)]
    out: list[Pt] = []
    for i in range(n):
        (px, py), r = points[i], radii[i]
        (ax, ay), (bx, by) = points[i - 1], points[(i + 1) % n]
        l_in, l_out = math.hypot(ax - px, ay - py), math.hypot(bx - px, by - py)
        if r <= 0 or l_in < 1e-9 or l_out < 1e-9:
            out.append((px, py))
            continue
        f_in, f_out = min(r, 0.45 * l_in) / l_in, min(r, 0.45 * l_out) / l_out
        a = (px + (ax - px) * f_in, py + (ay - py) * f_in)
        b = (px + (bx - px) * f_out, py + (by - py) * f_out)
        for t in ts:
            u = 1 - t
            out.append((u * u * a[0] + 2 * u * t * px + t * t * b[0], u * u * a[1] + 2 * u * t * py + t * t * b[1]))
    return out


@dataclass
class _Geometry:
    """A model's outline in car coordinates (x rear->front in [0, 1], y up)."""

    body: list[Pt]
    body_radii: list[float]
    windows: list[Pt]                       # the glass area (day-light opening)
    pillars: list[list[Pt]] = field(default_factory=list)
    doors: list[float] = field(default_factory=list)   # x of door seams
    head_box: tuple[float, float, float, float] = (0, 0, 0, 0)   # x0, y0(bottom), x1, y1(top)
    tail_box: tuple[float, float, float, float] = (0, 0, 0, 0)
    mirror_at: Pt = (0.0, 0.0)
    roof_span: tuple[float, float] | None = None        # for roof rails
    hood_front: float = 0.0


def _geometry(m: ModelSpec) -> _Geometry:
    hood_back = m.belt + 0.012
    hood_front = m.belt - m.hood_drop
    ws_top = m.ws_base - m.ws_rake
    front = [
        (m.ws_base, hood_back), (0.975, hood_front), (1.0, hood_front - 0.025),
        (1.0, m.ride + 0.025), (0.985, m.ride), (0.02, m.ride), (0.0, m.ride + 0.02),
    ]
    front_r = [0.01, 0.02, 0.012, 0.01, 0.01, 0.01, 0.01]
    wr = m.make.window_round
    y_wb, y_wt = m.belt + 0.008, m.roof - 0.018
    a_line = ((m.ws_base, hood_back), (ws_top, m.roof))

    if m.body in ("Sedan", "Coupe", "Convertible"):
        deck_pts = [(0.0, m.deck - 0.015), (0.025, m.deck), (m.rear_base, m.deck + 0.004)]
        if m.body == "Convertible":
            body = deck_pts + front
            radii = [0.012, 0.01, 0.02] + front_r
            c_line = ((m.rear_base, m.deck), (m.roof_back, m.roof))
        else:
            mid = ((m.roof_back + ws_top) / 2, m.roof + 0.006)
            body = deck_pts + [(m.roof_back, m.roof), mid, (ws_top, m.roof)] + front
            radii = [0.012, 0.01, 0.02, 0.03 + wr, 0.0, 0.02 + wr] + front_r
            c_line = ((m.rear_base, m.deck + 0.004), (m.roof_back, m.roof))
        tail_box = (0.004, m.deck - 0.012 - m.tail_h, 0.004 + m.tail_w, m.deck - 0.012)
    elif m.body == "Pickup":
        cab = m.roof_back
        body = [(0.0, m.belt + 0.005), (cab - 0.004, m.belt + 0.005), (cab, m.roof - 0.015),
                (cab + 0.015, m.roof), (ws_top, m.roof)] + front
        radii = [0.004, 0.004, 0.01, 0.015 + wr, 0.02 + wr] + front_r
        c_line = ((cab, m.belt), (cab, m.roof))
        tail_box = (0.004, m.belt - 0.012 - 0.07, 0.004 + 0.025, m.belt - 0.012)
    else:  # two-box shapes: Hatchback, Wagon, SUV, Van
        rb = m.roof_back
        mid = ((rb + ws_top) / 2, m.roof + 0.005)
        body = [(0.0, m.belt + 0.01), (rb - 0.01, m.roof - 0.02), (rb + 0.02, m.roof), mid,
                (ws_top, m.roof)] + front
        radii = [0.01, 0.012, 0.02 + wr, 0.0, 0.02 + wr] + front_r
        if m.body == "Van":
            radii[1], radii[2], radii[4] = 0.02, 0.03, 0.04 + wr
        c_line = ((0.0, m.belt + 0.01), (rb, m.roof))
        tail_box = (0.004, m.belt - 0.05, 0.004 + 0.025, m.belt - 0.05 + max(0.06, 2.2 * m.tail_h))

    def x_rear(y: float) -> float:
        return _x_on(*c_line, y) + m.c_w

    def x_front(y: float) -> float:
        return _x_on(*a_line, y) - m.a_w

    if m.body == "Convertible":
        # Low cockpit opening: only the windscreen frame sticks up (drawn separately).
        windows: list[Pt] = []
    else:
        windows = _round_polygon(
            [(x_rear(y_wb), y_wb), (x_rear(y_wt), y_wt), (x_front(y_wt), y_wt), (x_front(y_wb), y_wb)],
            [0.008, wr + 0.006, wr + 0.01, 0.004], steps=3)

    # Pillars splitting the side glass.
    pillars: list[list[Pt]] = []
    doors: list[float] = []
    if windows:
        x0b, x1b = x_rear(y_wb), x_front(y_wb)
        x0t, x1t = x_rear(y_wt), x_front(y_wt)
        fractions: list[float] = []
        if m.n_windows >= 2:
            fractions.append(m.b_pos)
        if m.n_windows >= 3:
            fractions.append(m.b_pos * 0.38)
        if m.n_windows >= 4:
            fractions.append(m.b_pos + (1 - m.b_pos) * 0.45)
        for f in fractions:
            xb, xt = x0b + f * (x1b - x0b), x0t + f * (x1t - x0t) + 0.01
            w = 0.011
            pillars.append([(xb - w, y_wb), (xt - w, y_wt), (xt + w, y_wt), (xb + w, y_wb)])
        front_door = x1b + 0.01
        if m.body in ("Coupe", "Convertible") or (m.body == "Pickup" and m.n_windows == 1):
            doors = [front_door, x0b + 0.35 * (x1b - x0b)]
        elif m.body == "Van":
            doors = [front_door, x0b + m.b_pos * (x1b - x0b) + 0.012, x0b + 0.3 * (x1b - x0b)]
        else:
            xb = x0b + m.b_pos * (x1b - x0b)
            doors = [front_door, xb, max(x0b + 0.01, m.wheel_rear + m.wheel_r * 1.1)]
    else:
        doors = [m.ws_base - 0.01, m.ws_base - 0.01 - 0.26]

    head_box = (0.995 - m.head_w, hood_front - 0.01 - m.head_h, 0.995, hood_front - 0.01)
    mirror_at = (x_front(y_wb) - 0.005, y_wb + 0.012)
    roof_span = None
    if m.body in _ROOFED_TWO_BOX:
        roof_span = (m.roof_back + 0.04, ws_top - 0.03)
    return _Geometry(body=body, body_radii=radii, windows=windows, pillars=pillars, doors=doors,
                     head_box=head_box, tail_box=tail_box, mirror_at=mirror_at,
                     roof_span=roof_span, hood_front=hood_front)


def _lamp_polygons(shape: str, box: tuple[float, float, float, float], rear: bool) -> list[list[Pt]]:
    """Lamp outline(s) in car coordinates. Shapes are defined in a unit box with u
    running towards the car's end (front for headlights, rear for tail-lights)."""
    x0, y0, x1, y1 = box

    def to_car(pts: Iterable[Pt]) -> list[Pt]:
        out = []
        for u, v in pts:  # v = 0 bottom, 1 top
            x = x1 - u * (x1 - x0) if rear else x0 + u * (x1 - x0)
            out.append((x, y0 + v * (y1 - y0)))
        return out

    def ellipse(cu: float, cv: float, ru: float, rv: float, n: int = 12) -> list[Pt]:
        return [(cu + ru * math.cos(t), cv + rv * math.sin(t)) for t in np.linspace(0, 2 * math.pi, n, endpoint=False)]

    unit: list[list[Pt]]
    if shape == "rect":
        unit = [[(0, 0), (1, 0), (1, 1), (0, 1)]]
    elif shape == "round":
        unit = [ellipse(0.6, 0.5, 0.4, 0.55)]
    elif shape == "slant":
        unit = [[(0.35, 0), (1, 0.05), (1, 0.8), (0, 1)]]
    elif shape == "slim":
        unit = [[(0, 0.55), (1, 0.45), (1, 1), (0, 1)]]
    elif shape == "twin":
        unit = [ellipse(0.78, 0.5, 0.22, 0.45), ellipse(0.28, 0.5, 0.22, 0.45)]
    elif shape == "boomerang":
        unit = [[(0, 0.65), (0.7, 0.65), (0.7, 0), (1, 0), (1, 1), (0, 1)]]
    elif shape == "tear":
        unit = [[(0, 0.9), (0.5, 0.15), (1, 0), (1, 0.8), (0.6, 1)]]
    elif shape == "strip":
        unit = [[(0, 0.35), (1, 0.35), (1, 0.75), (0, 0.75)]]
    elif shape == "vertical":
        unit = [[(0.5, -0.4), (1, -0.4), (1, 1.3), (0.5, 1.3)]]
    elif shape == "L":
        unit = [[(0, 0.55), (0.55, 0.55), (0.55, -0.3), (1, -0.3), (1, 1), (0, 1)]]
    else:
        raise ValueError(shape)
    return [to_car(p) for p in unit]


# ---------------------------------------------------------------------------
# Drawing the car
# ---------------------------------------------------------------------------

_CAR_X0, _CAR_Y_TOP, _CAR_Y_BOTTOM = 0.03, 0.60, 0.04   # canvas margins in car units
_TYRE = (24, 24, 26)
_WELL = (14, 14, 16)
_GLASS = (46, 58, 72)

# Realistic paint palette (weights ~ how common a colour is); jittered per image.
_PAINTS: tuple[tuple[RGB, float], ...] = (
    ((236, 236, 236), 3.0), ((24, 24, 28), 3.0), ((168, 172, 178), 2.5), ((96, 100, 106), 2.0),
    ((170, 28, 32), 1.5), ((30, 62, 140), 1.5), ((22, 34, 70), 1.0), ((34, 96, 58), 0.7),
    ((226, 190, 40), 0.4), ((220, 110, 30), 0.4), ((110, 70, 44), 0.5), ((206, 192, 160), 0.6),
    ((120, 20, 60), 0.4), ((70, 150, 190), 0.5),
)


def _random_paint(rng: np.random.Generator) -> RGB:
    weights = np.array([w for _, w in _PAINTS])
    base = np.array(_PAINTS[int(rng.choice(len(_PAINTS), p=weights / weights.sum()))][0], float)
    base = base * rng.uniform(0.85, 1.12) + rng.normal(0, 10, 3)
    return tuple(int(v) for v in np.clip(base, 0, 255))  # type: ignore[return-value]


def _shade(c: RGB, f: float) -> RGB:
    return tuple(int(np.clip(v * f, 0, 255)) for v in c)  # type: ignore[return-value]


def _luma(c: RGB) -> float:
    return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0


class _Canvas:
    """Maps car coordinates to pixels of a supersampled drawing canvas."""

    def __init__(self, length_px: int):
        self.L = length_px
        self.w = int(round((1 + 2 * _CAR_X0) * length_px))
        self.h = int(round((_CAR_Y_TOP + _CAR_Y_BOTTOM) * length_px))

    def pt(self, p: Pt) -> tuple[float, float]:
        return ((p[0] + _CAR_X0) * self.L, (_CAR_Y_TOP - p[1]) * self.L)

    def pts(self, ps: Iterable[Pt]) -> list[tuple[float, float]]:
        return [self.pt(p) for p in ps]

    def px(self, length: float) -> float:
        return length * self.L

    def width(self, length: float) -> int:
        return max(1, int(round(length * self.L)))


def _draw_wheel(d: ImageDraw.ImageDraw, cv: _Canvas, m: ModelSpec, y: YearSpec, cx: float,
                phase: float) -> None:
    X, Y = cv.pt((cx, m.wheel_r))
    r = cv.px(m.wheel_r)
    rr = r * m.rim_frac
    rim = m.make.rim_rgb
    d.ellipse([X - r, Y - r, X + r, Y + r], fill=_TYRE)
    n = y.wheel_spokes
    if y.wheel_style == "disc":
        d.ellipse([X - rr, Y - rr, X + rr, Y + rr], fill=rim)
        for k in range(n):
            a = phase + 2 * math.pi * k / n
            hx, hy, hr = X + 0.6 * rr * math.cos(a), Y + 0.6 * rr * math.sin(a), 0.2 * rr
            d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(40, 40, 44))
    else:
        d.ellipse([X - rr, Y - rr, X + rr, Y + rr], fill=(38, 38, 42))
        ring = max(1, int(round(rr * 0.16)))
        d.ellipse([X - rr, Y - rr, X + rr, Y + rr], outline=rim, width=ring)
        for k in range(n):
            a = phase + 2 * math.pi * k / n
            if y.wheel_style == "spoke":
                d.line([(X, Y), (X + rr * math.cos(a), Y + rr * math.sin(a))], fill=rim,
                       width=max(1, int(round(rr * 0.26))))
            elif y.wheel_style == "split":
                for da in (-0.16, 0.16):
                    d.line([(X, Y), (X + rr * math.cos(a + da), Y + rr * math.sin(a + da))], fill=rim,
                           width=max(1, int(round(rr * 0.12))))
            else:  # star: wedge spokes, wide at the hub
                w = 0.55
                d.polygon([(X + 0.3 * rr * math.cos(a - w), Y + 0.3 * rr * math.sin(a - w)),
                           (X + rr * math.cos(a - 0.09), Y + rr * math.sin(a - 0.09)),
                           (X + rr * math.cos(a + 0.09), Y + rr * math.sin(a + 0.09)),
                           (X + 0.3 * rr * math.cos(a + w), Y + 0.3 * rr * math.sin(a + w))], fill=rim)
    hub = rr * 0.22
    d.ellipse([X - hub, Y - hub, X + hub, Y + hub], fill=_shade(rim, 0.8))


def _draw_badge(d: ImageDraw.ImageDraw, cv: _Canvas, kind: str, at: Pt, size: float, color: RGB) -> None:
    X, Y = cv.pt(at)
    s = cv.px(size)
    if kind == "circle":
        d.ellipse([X - s, Y - s, X + s, Y + s], fill=color)
    elif kind == "diamond":
        d.polygon([(X, Y - s), (X + s, Y), (X, Y + s), (X - s, Y)], fill=color)
    elif kind == "triangle":
        d.polygon([(X - s, Y + s), (X + s, Y + s), (X, Y - s)], fill=color)
    elif kind == "square":
        d.rectangle([X - s, Y - s, X + s, Y + s], fill=color)
    else:  # bar
        d.rectangle([X - 2 * s, Y - 0.5 * s, X + 2 * s, Y + 0.5 * s], fill=color)


def _draw_body_details(d: ImageDraw.ImageDraw, cv: _Canvas, m: ModelSpec, yr: YearSpec,
                       g: _Geometry, paint: RGB, rng: np.random.Generator) -> None:
    """Everything clipped to the body outline (drawn on the body layer)."""
    mk = m.make
    dark = _shade(paint, 0.55) if _luma(paint) > 0.25 else (70, 70, 76)
    light = tuple(min(255, int(v * 1.25 + 25)) for v in paint)

    # Shoulder highlight and lower-body shade (a little 3D).
    d.rectangle([*cv.pt((0, m.belt - 0.004)), *cv.pt((1, m.belt - 0.018))], fill=light)
    d.rectangle([*cv.pt((0, m.ride + 0.02)), *cv.pt((1, m.ride - 0.01))], fill=_shade(paint, 0.72))

    # Character line (make).
    lw = cv.width(0.004)
    cl = mk.char_line
    if cl in ("straight", "double"):
        yc = m.belt - 0.045
        d.line([cv.pt((0.02, yc)), cv.pt((0.98, yc))], fill=dark, width=lw)
        if cl == "double":
            d.line([cv.pt((0.02, yc - 0.06)), cv.pt((0.98, yc - 0.06))], fill=dark, width=lw)
    elif cl in ("rising", "falling"):
        a, b = (m.belt - 0.075, m.belt - 0.03)
        if cl == "falling":
            a, b = b, a
        d.line([cv.pt((0.02, a)), cv.pt((0.98, b))], fill=dark, width=lw)

    # Stripe (year).
    stripe_rgb = (20, 20, 22) if _luma(paint) > 0.55 else (240, 240, 240)
    if yr.stripe == "single":
        d.line([cv.pt((0.0, (m.ride + m.belt) / 2)), cv.pt((1.0, (m.ride + m.belt) / 2))],
               fill=stripe_rgb, width=cv.width(0.012))
    elif yr.stripe == "double":
        for yy in ((m.ride + m.belt) / 2 + 0.012, (m.ride + m.belt) / 2 - 0.012):
            d.line([cv.pt((0.0, yy)), cv.pt((1.0, yy))], fill=stripe_rgb, width=cv.width(0.007))
    elif yr.stripe == "shoulder":
        d.line([cv.pt((0.0, m.belt - 0.022)), cv.pt((1.0, m.belt - 0.022))],
               fill=stripe_rgb, width=cv.width(0.009))
    elif yr.stripe == "lowband":
        d.rectangle([*cv.pt((0.0, m.ride + 0.045)), *cv.pt((1.0, m.ride + 0.02))], fill=stripe_rgb)

    # Bumpers / sills (year).
    if yr.bumper != "body":
        col = (38, 38, 42) if yr.bumper == "dark" else (210, 212, 218)
        hb = 0.05 if yr.bumper == "dark" else 0.025
        d.rectangle([*cv.pt((0.93, m.ride + hb + 0.005)), *cv.pt((1.01, m.ride - 0.01))], fill=col)
        d.rectangle([*cv.pt((-0.01, m.ride + hb + 0.005)), *cv.pt((0.07, m.ride - 0.01))], fill=col)
        d.rectangle([*cv.pt((0.0, m.ride + 0.016)), *cv.pt((1.0, m.ride - 0.01))], fill=col)

    # Door seams and handles.
    seam = _shade(paint, 0.45) if _luma(paint) > 0.2 else (60, 60, 66)
    for i, x in enumerate(g.doors):
        d.line([cv.pt((x, m.belt + 0.006)), cv.pt((x - 0.004, m.ride + 0.02))], fill=seam,
               width=cv.width(0.003))
        if i < len(g.doors) - 1 or len(g.doors) == 2:
            hx = x - 0.045
            d.rectangle([*cv.pt((hx - 0.018, m.belt - 0.022)), *cv.pt((hx, m.belt - 0.03))], fill=seam)

    # Pickup bed: top rail, tailgate seam.
    if m.body == "Pickup":
        d.rectangle([*cv.pt((0.0, m.belt + 0.005)), *cv.pt((m.roof_back, m.belt - 0.008))],
                    fill=_shade(paint, 0.8))
        d.line([cv.pt((0.02, m.belt)), cv.pt((0.02, m.ride + 0.02))], fill=seam, width=cv.width(0.003))
        d.line([cv.pt((m.roof_back + 0.004, m.belt)), cv.pt((m.roof_back + 0.004, m.ride + 0.02))],
               fill=seam, width=cv.width(0.003))

    # Windows with trim (make) and pillars.
    if g.windows:
        glass_hi = tuple(int(v) for v in np.clip(np.array(_GLASS) + rng.normal(30, 12), 0, 255))
        d.polygon(cv.pts(g.windows), fill=_GLASS, outline=mk.trim_rgb, width=cv.width(0.006))
        # A soft reflection band across the glass.
        ys = [p[1] for p in g.windows]
        xs = [p[0] for p in g.windows]
        yy = min(ys) + (max(ys) - min(ys)) * rng.uniform(0.35, 0.7)
        d.line([cv.pt((min(xs) + 0.02, yy)), cv.pt((max(xs) - 0.02, yy + 0.03))], fill=glass_hi,
               width=cv.width(0.008))
        for p in g.pillars:
            d.polygon(cv.pts(p), fill=mk.trim_rgb if mk.trim_rgb[0] < 100 else (30, 30, 34))

    # Fender vent (year): slanted bars behind the front wheel arch.
    if yr.vent:
        xv = m.wheel_front - m.wheel_r * 1.15 - 0.012
        yv0, yv1 = m.ride + 0.055, min(m.belt - 0.03, m.ride + 0.055 + 0.06)
        for k in range(yr.vent):
            xk = xv - k * 0.012
            d.line([cv.pt((xk, yv0)), cv.pt((xk + 0.012, yv1))], fill=(28, 28, 30), width=cv.width(0.005))

    # Wheel arches (wells, clipped to the body).
    for wx in (m.wheel_rear, m.wheel_front):
        X, Y = cv.pt((wx, m.wheel_r))
        R = cv.px(m.wheel_r * 1.13)
        d.ellipse([X - R, Y - R, X + R, Y + R], fill=_WELL)

    # Lamps (year shape, model size, make tint).
    for poly in _lamp_polygons(yr.headlight, g.head_box, rear=False):
        d.polygon(cv.pts(poly), fill=mk.light_rgb, outline=(60, 60, 64), width=cv.width(0.003))
    for poly in _lamp_polygons(yr.taillight, g.tail_box, rear=True):
        d.polygon(cv.pts(poly), fill=(200, 22, 26), outline=(90, 10, 12), width=cv.width(0.003))

    # Badge on the front fender (make).
    _draw_badge(d, cv, mk.badge, (m.wheel_front - 0.02, m.belt - 0.035 if m.belt - 0.035 > m.wheel_r * 2.3
                                  else m.wheel_r * 2.35), 0.008, mk.trim_rgb if mk.trim_rgb[0] > 100 else (200, 200, 206))


def _draw_convertible_top(d: ImageDraw.ImageDraw, cv: _Canvas, m: ModelSpec, paint: RGB) -> None:
    ws_top = m.ws_base - m.ws_rake
    # Seats' headrests behind the windscreen.
    for x in (m.ws_base - 0.16, m.ws_base - 0.32):
        d.rounded_rectangle([*cv.pt((x - 0.03, m.belt + 0.045)), *cv.pt((x + 0.01, m.belt - 0.005))],
                            radius=cv.px(0.012), fill=(30, 30, 32))
    # Folded top on the rear deck.
    d.rounded_rectangle([*cv.pt((m.rear_base - 0.03, m.deck + 0.03)), *cv.pt((m.rear_base + 0.1, m.deck - 0.004))],
                        radius=cv.px(0.015), fill=m.accent_rgb)
    # Windscreen frame.
    d.line([cv.pt((m.ws_base - 0.005, m.belt + 0.005)), cv.pt((ws_top, m.roof))], fill=m.make.trim_rgb,
           width=cv.width(0.012))
    d.line([cv.pt((ws_top, m.roof)), cv.pt((ws_top + 0.04, m.roof + 0.002))], fill=m.make.trim_rgb,
           width=cv.width(0.01))


def render_car(rng: np.random.Generator, car: CarClass, paint: RGB | None = None,
               length_px: int = 256) -> Image.Image:
    """Draw one car in side view (facing right) on a transparent RGBA canvas.

    ``length_px`` is the car length on the canvas (draw large, then downscale for
    anti-aliasing). The canvas spans the car plus a small margin; a soft ground
    shadow has alpha < 100 so that ``alpha >= 128`` is the car itself.
    """
    m, yr = car.model, car.details
    g = _geometry(m)
    cv = _Canvas(length_px)
    paint = paint or _random_paint(rng)

    layer = Image.new("RGBA", (cv.w, cv.h), (0, 0, 0, 0))
    # Ground shadow.
    shadow = Image.new("L", (cv.w, cv.h), 0)
    ImageDraw.Draw(shadow).ellipse([*cv.pt((-0.02, 0.025)), *cv.pt((1.02, -0.02))], fill=90)
    shadow = shadow.filter(ImageFilter.GaussianBlur(cv.px(0.012)))
    layer.paste((10, 10, 12, 255), (0, 0), shadow)

    # Body: paint + clipped details, composited through the body mask.
    body_rgb = Image.new("RGB", (cv.w, cv.h), paint)
    bd = ImageDraw.Draw(body_rgb)
    _draw_body_details(bd, cv, m, yr, g, paint, rng)
    mask = Image.new("L", (cv.w, cv.h), 0)
    ImageDraw.Draw(mask).polygon(cv.pts(_round_polygon(g.body, g.body_radii)), fill=255)
    layer.paste(body_rgb, (0, 0), mask)

    d = ImageDraw.Draw(layer)
    if m.body == "Convertible":
        _draw_convertible_top(d, cv, m, paint)
    # Roof rails (year, roofed two-box bodies only).
    if yr.rails and g.roof_span is not None:
        x0, x1 = g.roof_span
        col = (36, 36, 40) if m.make.trim_rgb[0] < 100 else (190, 192, 198)
        d.line([cv.pt((x0, m.roof + 0.012)), cv.pt((x1, m.roof + 0.012))], fill=col, width=cv.width(0.007))
        for x in (x0 + 0.01, x1 - 0.01):
            d.line([cv.pt((x, m.roof)), cv.pt((x, m.roof + 0.012))], fill=col, width=cv.width(0.008))
    # Mirror (year).
    mx, my = g.mirror_at
    if yr.mirror == "tri":
        d.polygon(cv.pts([(mx - 0.03, my), (mx, my), (mx, my + 0.028)]), fill=(30, 30, 34))
    elif yr.mirror == "round":
        d.ellipse([*cv.pt((mx - 0.028, my + 0.024)), *cv.pt((mx + 0.004, my - 0.004))], fill=paint,
                  outline=(30, 30, 34), width=cv.width(0.003))
    # Wheels (drawn last, not clipped); random rotation phase = nuisance.
    for wx in (m.wheel_rear, m.wheel_front):
        _draw_wheel(d, cv, m, yr, wx, phase=float(rng.uniform(0, 2 * math.pi)))
    return layer


# ---------------------------------------------------------------------------
# Scene: background, placement, occluders, photometric nuisances
# ---------------------------------------------------------------------------


def _lerp_rows(h: int, w: int, c0, c1) -> np.ndarray:
    t = np.linspace(0.0, 1.0, max(h, 1))[:, None, None]
    row = (1 - t) * np.asarray(c0, float) + t * np.asarray(c1, float)
    return np.broadcast_to(row, (max(h, 1), w, 3)).copy()


def _rand_rgb(rng: np.random.Generator, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi + 1, 3))  # type: ignore[return-value]


def _background(rng: np.random.Generator, size: int, horizon: int) -> Image.Image:
    """Sky / wall gradient above ``horizon``, ground gradient below, random clutter."""
    kind = _pick(rng, ("street", "street", "nature", "studio", "lot"))
    if kind == "studio":
        top, bottom = _rand_rgb(rng, 60, 240), _rand_rgb(rng, 40, 220)
    else:
        top = tuple(np.clip(np.array((90, 140, 215)) + rng.normal(0, 40, 3), 0, 255))
        bottom = tuple(np.clip(np.array(top) * 0.6 + 100 + rng.normal(0, 25, 3), 0, 255))
    g_top = _rand_rgb(rng, 50, 190)
    if kind == "nature":
        g_top = tuple(int(v) for v in np.clip(np.array((70, 120, 50)) + rng.normal(0, 25, 3), 0, 255))
    g_bottom = tuple(np.clip(np.array(g_top) * rng.uniform(0.6, 1.3), 0, 255))
    arr = np.concatenate([_lerp_rows(horizon, size, top, bottom),
                          _lerp_rows(size - horizon, size, g_top, g_bottom)], axis=0)[:size]
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)

    if kind in ("street", "lot"):
        for _ in range(int(rng.integers(1, 6))):  # buildings
            w = rng.uniform(0.12, 0.45) * size
            x = rng.uniform(-0.2, 1.0) * size
            h = rng.uniform(0.1, 0.55) * size
            col = _rand_rgb(rng, 60, 220)
            d.rectangle([x, horizon - h, x + w, horizon], fill=col)
            win = _shade(col, 0.6)
            for wy in np.arange(horizon - h + 4, horizon - 4, max(4.0, size / 16)):
                for wx in np.arange(x + 3, x + w - 3, max(4.0, size / 14)):
                    d.rectangle([wx, wy, wx + size / 40, wy + size / 40], fill=win)
    if kind in ("nature", "street") and rng.random() < 0.7:
        for _ in range(int(rng.integers(1, 5))):  # trees
            x, r = rng.uniform(0, 1) * size, rng.uniform(0.05, 0.15) * size
            d.rectangle([x - r * 0.12, horizon - r * 1.6, x + r * 0.12, horizon], fill=(80, 60, 40))
            green = tuple(int(v) for v in np.clip(np.array((50, 110, 45)) + rng.normal(0, 25, 3), 0, 255))
            d.ellipse([x - r, horizon - r * 2.6, x + r, horizon - r * 0.8], fill=green)
    if kind in ("street", "lot") and rng.random() < 0.7:  # road / parking marks
        col = (230, 230, 225) if rng.random() < 0.7 else (225, 190, 40)
        yline = horizon + rng.uniform(0.1, 0.9) * (size - horizon)
        for x in np.arange(rng.uniform(-20, 0), size, size / 5):
            d.rectangle([x, yline, x + size / 9, yline + max(1.0, size / 80)], fill=col)
    if rng.random() < 0.5:  # random blobs of clutter
        for _ in range(int(rng.integers(1, 4))):
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.03, 0.12) * size
            d.ellipse([x - r, y - r, x + r, y + r], fill=_rand_rgb(rng))
    return img


def _occlude(rng: np.random.Generator, img: Image.Image, box: tuple[int, int, int, int]) -> None:
    """Draw an occluder in front of the car (in place)."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    s = img.size[0]
    d = ImageDraw.Draw(img)
    kind = _pick(rng, ("pole", "box", "bush", "sign"))
    if kind in ("pole", "sign"):
        w = rng.uniform(0.025, 0.07) * s
        x = rng.uniform(x1, x2)
        col = _pick(rng, ((120, 120, 124), (90, 70, 50), (60, 60, 64), (170, 170, 176)))
        top = 0 if kind == "pole" else rng.uniform(0, y1 + 0.3 * bh)
        d.rectangle([x - w / 2, top, x + w / 2, s], fill=col)
        if kind == "sign":
            r = rng.uniform(0.06, 0.12) * s
            d.rectangle([x - r, top - r, x + r, top + r], fill=_rand_rgb(rng), outline=(240, 240, 240))
    elif kind == "box":
        w, h = rng.uniform(0.15, 0.35) * bw, rng.uniform(0.25, 0.6) * bh
        x = x1 - 0.1 * w if rng.random() < 0.5 else x2 - 0.9 * w
        d.rectangle([x, y2 - h, x + w, s], fill=_rand_rgb(rng, 30, 230))
    else:  # bush along the bottom of the car
        green = np.array((50, 110, 45))
        x0 = rng.uniform(x1 - 0.1 * bw, x2 - 0.3 * bw)
        for _ in range(int(rng.integers(3, 7))):
            cx = x0 + rng.uniform(0, 0.4) * bw
            r = rng.uniform(0.08, 0.16) * bh + 2
            cy = y2 - rng.uniform(0, 0.25) * bh
            col = tuple(int(v) for v in np.clip(green + rng.normal(0, 25, 3), 0, 255))
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)


def _photometric(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Brightness, contrast, colour cast, illumination gradient, noise and blur."""
    a = np.asarray(img, dtype=np.float32)
    s = a.shape[0]
    gain = (rng.uniform(0.65, 1.3) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    contrast = np.float32(rng.uniform(0.75, 1.2))
    mean = a.mean(axis=(0, 1), keepdims=True)
    a = (a - mean) * contrast + mean
    ang, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.35)
    ramp = np.linspace(-0.5, 0.5, s, dtype=np.float32)
    illum = 1.0 + strength * (np.float32(math.cos(ang)) * ramp[None, :] + np.float32(math.sin(ang)) * ramp[:, None])
    a = a * gain[None, None, :] * illum[:, :, None]
    a += rng.standard_normal(a.shape, dtype=np.float32) * np.float32(rng.uniform(0, 6))
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.35:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1) * s / 128))
    return out


def _solve_perspective(dst: Sequence[Pt], src: Sequence[Pt]) -> list[float]:
    """Coefficients for ``Image.transform(..., PERSPECTIVE)`` mapping output ``dst`` corners to input ``src``."""
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    return [float(c) for c in np.linalg.solve(np.array(a, float), np.array(b, float))]


def _yaw(rng: np.random.Generator, layer: Image.Image) -> Image.Image:
    """Mild perspective, as if the car were turned a little away from the camera: one
    end (random) shrinks towards a horizon line and the car is foreshortened."""
    w, h = layer.size
    far = rng.uniform(0.8, 1.0)                 # height of the far end relative to the near end
    v = rng.uniform(0.25, 0.65) * h             # horizon (vanishing line) inside the canvas
    width = w * rng.uniform(0.85, 1.0)
    near_pts = [(0.0, 0.0), (0.0, float(h))]
    far_pts = [(width, v - v * far), (width, v + (h - v) * far)]
    dst = [near_pts[0], far_pts[0], far_pts[1], near_pts[1]]
    src = [(0.0, 0.0), (float(w), 0.0), (float(w), float(h)), (0.0, float(h))]
    if rng.random() < 0.5:  # the front end is the far one, or the rear end
        dst = [(w - x, y) for x, y in dst]
        src = [(w - x, y) for x, y in src]
    return layer.transform((w, h), Image.PERSPECTIVE, _solve_perspective(dst, src), Image.BICUBIC)


def render_image(car: CarClass, split: str, index: int, config: SynthCarsConfig
                 ) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Render image ``index`` of ``car`` for ``split``: returns (RGB image, bbox).

    The image depends only on ``(config.seed, car.class_id, split, index)`` and the
    config's image size.
    """
    S = config.image_size
    rng = _rng(config.seed, car.class_id, _SPLIT_CODE[split], index)

    # Car layer: drawn at ~2x the final size, then scaled (with a small aspect change),
    # mirrored and rotated.
    car_len = rng.uniform(0.58, 0.94) * S
    layer = render_car(rng, car, length_px=int(2 * S))
    aspect = rng.uniform(0.9, 1.1)
    scale = car_len / (layer.width / (1 + 2 * _CAR_X0))
    new_w = max(8, int(round(layer.width * scale)))
    new_h = max(4, int(round(layer.height * scale * aspect)))
    layer = layer.resize((new_w, new_h), Image.LANCZOS)
    layer = _yaw(rng, layer)
    if rng.random() < 0.5:
        layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
    layer = layer.rotate(float(rng.uniform(-6, 6)), resample=Image.BICUBIC, expand=True)

    alpha = np.asarray(layer.getchannel("A"))
    ys, xs = np.nonzero(alpha >= 128)
    cx0, cx1, cy0, cy1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cw, ch = cx1 - cx0, cy1 - cy0
    # Placement: mostly inside the frame, may be cut by up to ~4% on a side.
    margin = 0.04 * cw
    px = int(round(rng.uniform(-cx0 - margin, S - cx1 + margin))) if S - cw > -2 * margin else int((S - cw) / 2 - cx0)
    py_lo, py_hi = -cy0 + 0.05 * S, S - cy1 - 0.02 * S
    py = int(round(rng.uniform(py_lo, max(py_lo, py_hi))))
    ground = int(np.clip(py + cy1, 1, S - 1))
    horizon = int(np.clip(ground - rng.uniform(0.05, 0.45) * S, 1, S - 1))

    img = _background(rng, S, horizon)
    img.paste(layer, (px, py), layer)
    bbox = (max(0, px + cx0), max(0, py + cy0), min(S, px + cx1), min(S, py + cy1))
    if rng.random() < 0.3:
        _occlude(rng, img, bbox)
    img = _photometric(rng, img)
    return img, tuple(int(v) for v in bbox)  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Writing a folder
# ---------------------------------------------------------------------------


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY, optimize=False)
    return buf.getvalue()


def _render_job(job: tuple[SynthCarsConfig, int, str, int, str, str]) -> tuple[str, tuple[int, int, int, int]]:
    cfg, class_id, split, index, rel, root = job
    classes = _classes_cached(cfg)
    img, bbox = render_image(classes[class_id - 1], split, index, cfg)
    with open(os.path.join(root, rel), "wb") as f:
        f.write(_jpeg_bytes(img))
    return rel, bbox


_CLASS_CACHE: dict[SynthCarsConfig, list[CarClass]] = {}


def _classes_cached(cfg: SynthCarsConfig) -> list[CarClass]:
    if cfg not in _CLASS_CACHE:
        _CLASS_CACHE.clear()
        _CLASS_CACHE[cfg] = build_classes(cfg)
    return _CLASS_CACHE[cfg]


def _plan(cfg: SynthCarsConfig) -> list[tuple[str, str, int, int]]:
    """(filename, split, class_id, index) rows in file order. Files are numbered in a
    seeded shuffled order so that file numbers do not reveal the class."""
    counts = class_counts(cfg)
    rng = _rng(cfg.seed, _STREAM_ORDER)
    rows: list[tuple[str, str, int, int]] = []
    for split in ("train", "test"):
        items = [(cid, i) for cid in range(1, cfg.num_classes + 1) for i in range(int(counts[split][cid - 1]))]
        order = rng.permutation(len(items))
        for n, k in enumerate(order, start=1):
            cid, i = items[int(k)]
            rows.append((f"images/{split}/{n:05d}.jpg", split, cid, i))
    return rows


def _meta(cfg: SynthCarsConfig, n_train: int | None = None, n_test: int | None = None) -> dict:
    meta = {"generator": "vericar.data.synthetic", "name": "SynthCars", "version": SYNTHCARS_VERSION,
            "config": cfg.to_dict()}
    if n_train is not None:
        meta.update(num_classes=cfg.num_classes, num_train=n_train, num_test=n_test)
    return meta


def _read_meta(out: Path) -> dict | None:
    try:
        return json.loads((out / "synthcars.json").read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out: Path, cfg: SynthCarsConfig) -> bool:
    meta = _read_meta(out)
    if meta is None or meta.get("version") != SYNTHCARS_VERSION or meta.get("config") != cfg.to_dict():
        return False
    return (out / "labels.csv").is_file() and (out / "class_names.txt").is_file()


def _remove_synthcars(out: Path) -> None:
    for name in ("labels.csv", "class_names.txt", "synthcars.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "images", ignore_errors=True)


def make_synthcars(out_dir: str | os.PathLike, config: SynthCarsConfig | None = None,
                   progress: bool = True, *, workers: int | None = None,
                   overwrite: bool = False) -> Path:
    """Generate a SynthCars folder (or reuse an existing one) and return its path.

    Returns immediately if ``out_dir`` already holds a complete SynthCars folder
    with the same parameters (``synthcars.json``). Raises ``FileExistsError`` if it
    holds a SynthCars folder with other parameters (``overwrite=True`` deletes that
    folder's SynthCars files and regenerates) or any other non-empty content.

    ``workers``: processes used for drawing (default: up to 2; 1 for small
    configs). The output does not depend on it.
    """
    cfg = config or SynthCarsConfig()
    out = Path(out_dir)
    if out.exists():
        if _is_complete(out, cfg):
            return out
        meta = _read_meta(out)
        if meta is not None and meta.get("generator") == "vericar.data.synthetic":
            if not overwrite:
                raise FileExistsError(
                    f"{out} holds a SynthCars folder generated with other parameters "
                    f"({meta.get('config')}, version {meta.get('version')}); requested "
                    f"{cfg.to_dict()}, version {SYNTHCARS_VERSION}. Use another out_dir, delete it, "
                    f"or pass overwrite=True.")
            _remove_synthcars(out)
        if any(out.iterdir()):
            raise FileExistsError(f"{out} exists, is not empty and is not a SynthCars folder")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        classes = _classes_cached(cfg)  # also primes forked workers' cache
        plan = _plan(cfg)
        for split in ("train", "test"):
            (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs = [(cfg, cid, split, idx, rel, str(tmp)) for rel, split, cid, idx in plan]
        if workers is None:
            workers = min(2, os.cpu_count() or 1) if len(jobs) >= 400 else 1
        bboxes: dict[str, tuple[int, int, int, int]] = {}
        bar = _progress(len(jobs), progress)
        if workers <= 1:
            for job in jobs:
                rel, bbox = _render_job(job)
                bboxes[rel] = bbox
                bar.update(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                for rel, bbox in ex.map(_render_job, jobs, chunksize=32):
                    bboxes[rel] = bbox
                    bar.update(1)
        bar.close()

        S = cfg.image_size
        with open(tmp / "labels.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(LABEL_COLUMNS)
            for rel, split, cid, _ in plan:
                w.writerow([rel, split, cid, classes[cid - 1].name, *bboxes[rel], S, S])
        (tmp / "class_names.txt").write_text("".join(c.name + "\n" for c in classes), encoding="utf-8")
        n_train = sum(1 for r in plan if r[1] == "train")
        meta = _meta(cfg, n_train, len(plan) - n_train)
        (tmp / "synthcars.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _move_into_place(tmp, out, cfg)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path, cfg: SynthCarsConfig) -> None:
    """Rename the finished temp folder to ``out`` (which may exist only if empty)."""
    try:
        if out.exists():
            out.rmdir()  # only succeeds if empty
        os.replace(tmp, out)
    except OSError:
        # Another process may have finished the same folder first.
        if not _is_complete(out, cfg):
            raise


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return _NullBar()
    return tqdm(total=total, desc="SynthCars", unit="img")
