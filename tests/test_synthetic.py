"""Tests of the SynthCars generator (vericar.data.synthetic). All use the tiny config (< 1 s each)."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vericar.data import synthetic
from vericar.data.synthetic import (
    BODY_TYPES, LABEL_COLUMNS, SynthCarsConfig, build_classes, make_synthcars, render_image,
)

NAME_RE = re.compile(r"^([A-Z][a-z]+) ([A-Z][a-z]+) (" + "|".join(BODY_TYPES) + r") (\d{4})$")


def read_labels(root: Path) -> list[dict]:
    with open(root / "labels.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_synthcars(tmp_path_factory.mktemp("synth") / "tiny", SynthCarsConfig.tiny(), progress=False)


def test_layout_and_columns(tiny_dir):
    assert (tiny_dir / "labels.csv").is_file()
    assert (tiny_dir / "class_names.txt").is_file()
    assert (tiny_dir / "synthcars.json").is_file()
    with open(tiny_dir / "labels.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == LABEL_COLUMNS
    rows = read_labels(tiny_dir)
    cfg = SynthCarsConfig.tiny()
    assert len(rows) == len(list((tiny_dir / "images").rglob("*.jpg")))
    for r in rows:
        assert r["split"] in ("train", "test")
        assert re.fullmatch(rf"images/{r['split']}/\d{{5}}\.jpg", r["filename"])
        assert (tiny_dir / r["filename"]).is_file()
        assert 1 <= int(r["class_id"]) <= cfg.num_classes
        assert int(r["width"]) == int(r["height"]) == cfg.image_size
    assert len({r["filename"] for r in rows}) == len(rows)
    meta = json.loads((tiny_dir / "synthcars.json").read_text())
    assert meta["config"] == cfg.to_dict()
    assert meta["version"] == synthetic.SYNTHCARS_VERSION
    assert meta["num_train"] + meta["num_test"] == len(rows)
    assert not list(tiny_dir.parent.glob(".tiny.partial-*")), "temporary folder left behind"


def test_images_are_rgb_of_the_right_size(tiny_dir):
    size = SynthCarsConfig.tiny().image_size
    for p in sorted((tiny_dir / "images").rglob("*.jpg")):
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (size, size)


def test_class_names_consistent_with_labels(tiny_dir):
    names = (tiny_dir / "class_names.txt").read_text(encoding="utf-8").splitlines()
    assert len(names) == SynthCarsConfig.tiny().num_classes
    assert len(set(names)) == len(names)
    for r in read_labels(tiny_dir):
        assert names[int(r["class_id"]) - 1] == r["class_name"]
    assert [c.name for c in build_classes(SynthCarsConfig.tiny())] == names


def test_class_name_format_and_hierarchy():
    classes = build_classes(SynthCarsConfig())
    names = [c.name for c in classes]
    assert len(set(names)) == len(names) == SynthCarsConfig().num_classes
    models_of_make = defaultdict(set)
    years_of_model = defaultdict(set)
    for c in classes:
        m = NAME_RE.match(c.name)
        assert m, c.name
        make, model, body, year = m.groups()
        assert (make, model, body, int(year)) == (c.make.name, c.model.name, c.model.body, c.year)
        assert model not in BODY_TYPES and make not in BODY_TYPES
        models_of_make[make].add((model, body))
        years_of_model[(make, model, body)].add(int(year))
    # Years are the fine-grained level: every model has years_per_model distinct years.
    assert all(len(y) == SynthCarsConfig().years_per_model for y in years_of_model.values())
    # Makes span several body types; model names are unique across makes.
    assert all(len({b for _, b in ms}) >= 2 for ms in models_of_make.values())
    all_models = [m for ms in models_of_make.values() for m, _ in ms]
    assert len(all_models) == len(set(all_models))


def test_names_parse_with_the_library_parser():
    from vericar.data.hierarchy import parse_class_name

    for c in build_classes(SynthCarsConfig()):
        lab = parse_class_name(c.name)
        assert (lab.make, lab.family, lab.type, lab.year) == (c.make.name, c.model.name, c.model.body, c.year)


def test_every_body_type_appears_with_default_config():
    bodies = Counter(c.model.body for c in build_classes(SynthCarsConfig()))
    assert set(bodies) == set(BODY_TYPES)
    assert max(bodies.values()) - min(bodies.values()) <= SynthCarsConfig().years_per_model


def test_years_of_a_model_differ_only_in_details():
    classes = build_classes(SynthCarsConfig())
    by_model = defaultdict(list)
    for c in classes:
        by_model[(c.make.name, c.model.name)].append(c)
    for group in by_model.values():
        assert len({c.model for c in group}) == 1            # same proportions
        assert len({c.details for c in group}) == len(group)  # different details


def test_every_class_has_train_and_test_images_and_counts_are_uneven(tiny_dir):
    rows = read_labels(tiny_dir)
    cfg = SynthCarsConfig.tiny()
    for split, (lo, hi) in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
        counts = Counter(int(r["class_id"]) for r in rows if r["split"] == split)
        assert set(counts) == set(range(1, cfg.num_classes + 1))
        assert all(lo <= n <= hi for n in counts.values())
        assert len(set(counts.values())) > 1, f"{split} counts are all equal"


def test_bbox_within_image(tiny_dir):
    for r in read_labels(tiny_dir):
        x1, y1, x2, y2 = (int(r[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        w, h = int(r["width"]), int(r["height"])
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1) >= 0.3 * w, "car implausibly small"


@pytest.mark.parametrize("index", range(8))
def test_bbox_fits_the_car(index):
    """The box is the car's extent: the car is drawn 0.58-0.94 of the frame long (a few % may be cut off or
    yawed away) and is wider than tall, so the box spans about that much of the width."""
    cfg = SynthCarsConfig.tiny()
    img, (x1, y1, x2, y2) = render_image(build_classes(cfg)[index % 3], "train", index, cfg)
    S = cfg.image_size
    assert img.size == (S, S)
    assert 0 <= x1 < x2 <= S and 0 <= y1 < y2 <= S
    assert 0.4 * S <= x2 - x1 <= S and 0.1 * S <= y2 - y1 < x2 - x1


def test_deterministic(tmp_path):
    cfg = SynthCarsConfig.tiny(seed=3)
    a = make_synthcars(tmp_path / "a", cfg, progress=False, workers=1)
    b = make_synthcars(tmp_path / "b", cfg, progress=False, workers=2)
    assert (a / "labels.csv").read_bytes() == (b / "labels.csv").read_bytes()
    assert (a / "class_names.txt").read_bytes() == (b / "class_names.txt").read_bytes()
    files_a = sorted(p.relative_to(a) for p in (a / "images").rglob("*.jpg"))
    files_b = sorted(p.relative_to(b) for p in (b / "images").rglob("*.jpg"))
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_seed_changes_the_data(tiny_dir, tmp_path):
    other = make_synthcars(tmp_path / "s1", SynthCarsConfig.tiny(seed=1), progress=False)
    assert (other / "labels.csv").read_bytes() != (tiny_dir / "labels.csv").read_bytes()


def test_render_does_not_depend_on_global_rng():
    cfg = SynthCarsConfig.tiny()
    car = build_classes(cfg)[1]
    np.random.seed(1)
    a, box_a = render_image(car, "test", 2, cfg)
    np.random.seed(2)
    b, box_b = render_image(car, "test", 2, cfg)
    assert box_a == box_b
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c, _ = render_image(car, "test", 3, cfg)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_reuse_existing_folder_does_not_regenerate(tiny_dir, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in tiny_dir.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise AssertionError("regenerated an existing folder")

    monkeypatch.setattr(synthetic, "render_image", boom)
    assert make_synthcars(tiny_dir, SynthCarsConfig.tiny(), progress=False) == tiny_dir
    assert {p: p.stat().st_mtime_ns for p in tiny_dir.rglob("*") if p.is_file()} == before


def test_other_parameters_raise_unless_overwrite(tmp_path):
    out = make_synthcars(tmp_path / "d", SynthCarsConfig.tiny(), progress=False)
    other = SynthCarsConfig.tiny(seed=5)
    with pytest.raises(FileExistsError, match="other parameters"):
        make_synthcars(out, other, progress=False)
    make_synthcars(out, other, progress=False, overwrite=True)
    assert json.loads((out / "synthcars.json").read_text())["config"]["seed"] == 5


def test_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a SynthCars folder"):
        make_synthcars(tmp_path / "mine", SynthCarsConfig.tiny(), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    out = make_synthcars(tmp_path / "empty", SynthCarsConfig.tiny(), progress=False)
    assert (out / "labels.csv").is_file()


def test_config_validation():
    with pytest.raises(ValueError):
        SynthCarsConfig(train_per_class=(5, 2))
    with pytest.raises(ValueError):
        SynthCarsConfig(n_makes=0)
    with pytest.raises(ValueError):
        SynthCarsConfig(image_size=8)
    # Lists (as read back from JSON) are accepted and stored as tuples.
    cfg = SynthCarsConfig(**SynthCarsConfig.tiny().to_dict())
    assert cfg == SynthCarsConfig.tiny()
    assert SynthCarsConfig().num_classes == 64


def test_loads_with_the_library_loader(tiny_dir):
    from vericar.data import load_stanford_cars

    cars = load_stanford_cars(tiny_dir, name="SynthCars")
    assert cars.num_classes == SynthCarsConfig.tiny().num_classes
    assert set(cars.table["type"]) <= set(BODY_TYPES)
    im = cars.image(0)
    assert im.mode == "RGB" and im.size[0] < SynthCarsConfig.tiny().image_size + 1
