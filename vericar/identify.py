"""Identify cars in photos from a trained run: what notebook 08 shows and the web app (``vericar.app``) serves.

    python -m vericar.identify                     # train (or reuse) the seed-protocol identifier, full profile
    python -m vericar.identify --profile quick     # the SynthCars one

:class:`IdentifyService` wraps :class:`vericar.predict.CarIdentifier` with what a person pointing it at a photo
needs: each answer's 5 nearest database images (class names, distances, thumbnails), the KNN+ threshold beside
the score, decoding of untrusted uploads with clear errors (:class:`BadInput`), and cars added from photos
kept across restarts (``added_cars.npz`` in the run folder, written atomically).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data import CarsDataset, load_stanford_cars, parse_class_name
from .embed import square_tensor
from .export import torch_embedder
from .predict import CarIdentifier, database_rows
from .study import NOTEBOOKS_DIR, PROFILES, PROJECT_ROOT, notebook_parameters
from .config import TrainConfig
from .runs import TrainedRun, load_run
from .train import train

LEVELS = ("make", "type", "model", "year")
ADDED_FILE = "added_cars.npz"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # a 10000 x 10000 photo (100 MP) is refused before it is decoded
DEFAULT_RUN_ROOTS = (PROJECT_ROOT / "runs", Path.home() / ".cache" / "vericar")


class BadInput(ValueError):
    """Input the service refuses; ``status`` is the HTTP status the web app answers with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, name: str = "upload", *, max_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A fully decoded RGB image from untrusted bytes, or :class:`BadInput` naming what is wrong with it."""
    if not data:
        raise BadInput(f"{name}: the file is empty (0 bytes); upload a JPEG, PNG or WebP photo")
    if len(data) > max_bytes:
        raise BadInput(f"{name}: {len(data) / 1e6:.1f} MB is over the upload limit of {max_bytes / 1e6:.1f} MB; "
                       "send a smaller photo (or start the app with a larger --max-upload-mb)", status=413)
    try:
        with warnings.catch_warnings():  # the pixel limit below is ours; Pillow's own warning is noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadInput(f"{name}: {err}; resize the photo", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadInput(f"{name}: not an image Pillow can read; upload a JPEG, PNG or WebP photo") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput(f"{name}: {width} x {height} pixels is over the limit of {max_pixels / 1e6:.0f} megapixels; "
                       "resize the photo (a car needs far fewer pixels)", status=413)
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadInput(f"{name}: the image is damaged or truncated ({err}); upload the complete file") from None


def thumbnail_bytes(image: Image.Image, size: int = 112) -> bytes:
    """A small JPEG of ``image`` (longer side ``size``)."""
    image = image.convert("RGB").copy()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def open_run(run_dir: str | Path, data_dir: str | Path | None = None) -> tuple[TrainedRun, CarsDataset]:
    """A run folder and the dataset it was trained on (read from its ``config.json`` unless ``data_dir``)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run (no config.json); train one with "
                                "`python -m vericar.identify` or notebook 03")
    config = json.loads(config_path.read_text())
    root = Path(data_dir or config.get("data_root", ""))
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir} was trained on {root}, which is not here; pass the dataset folder "
                                "(--data-dir) so the app can show the database images")
    cars = load_stanford_cars(root, name=config.get("dataset", "Stanford Cars 196"))
    return load_run(run_dir, cars), cars


def is_synthetic(run_dir: Path) -> bool:
    return json.loads((run_dir / "config.json").read_text()).get("dataset") == "SynthCars"


def find_runs(roots: Sequence[Path] = DEFAULT_RUN_ROOTS) -> list[Path]:
    """Finished run folders (config.json + metrics.json + embeddings.npz) under ``roots``, newest first."""
    found = set()
    for root in roots:
        if Path(root).is_dir():
            found |= {p.parent for p in Path(root).rglob("metrics.json")
                      if (p.parent / "embeddings.npz").is_file() and (p.parent / "config.json").is_file()}
    return sorted(found, key=lambda p: (p / "metrics.json").stat().st_mtime, reverse=True)


def default_run(roots: Sequence[Path] = DEFAULT_RUN_ROOTS) -> tuple[Path, str]:
    """The newest real-data run, else the quick profile's SynthCars seed run (trained when missing; protocol
    ``seed`` like ``make identifier``, so that its unknown threshold is set on photos it did not train on).

    Returns ``(run_dir, note)``; the note says which run is served and how to get a real one.
    """
    runs = find_runs(roots)
    real = [r for r in runs if not is_synthetic(r)]
    how = ("make a real Stanford Cars identifier with `make identifier` (it trains, then serves it), or "
           "`python -m vericar.identify --epochs 10 --image-size 160`, then `python -m vericar.app --run <the folder it prints>`")
    if real:
        return real[0], f"serving the newest real-data run {real[0]}"
    quick = recipe_run_dir("quick", "seed")
    if not (quick / "metrics.json").is_file():
        print(f"[vericar] no trained run found; training the quick profile's SynthCars identifier into {quick}")
        quick = train_identifier("quick", "seed")
    return quick, f"serving the SynthCars demo run {quick} (invented cars, not real ones); {how}"


# -- the chosen recipe ---------------------------------------------------------------------------------

def recipe_config(profile: str = "full", protocol: str = "official") -> tuple[TrainConfig, dict]:
    """The TrainConfig notebook 03 builds under ``profile`` (its parameter defaults + the profile's overrides).

    Read from ``study.PROFILES`` and the notebook's parameters cell, never copied, so the run folder is the
    one notebook 03 makes (a finished one is reused, not retrained). Also returns the profile's common
    parameters (dataset, data_dir, run_dir).
    """
    params = notebook_parameters(NOTEBOOKS_DIR / "03_training.ipynb")
    params.update(PROFILES[profile]["all"])
    params.update(PROFILES[profile]["per_notebook"].get("03", {}))
    fields = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in params.items() if k in fields} | {"protocol": protocol})
    return config, params


def recipe_run_dir(profile: str, protocol: str, epochs: int | None = None, image_size: int | None = None) -> Path:
    """Notebook 03's run folder for ``protocol``; with ``epochs`` or ``image_size`` other than the recipe's, a
    sibling ``<protocol>-e<epochs>[-<image_size>px]`` (a shorter run must not sit where notebook 03 expects the
    recipe's)."""
    recipe = recipe_config(profile, protocol)[0]
    epochs = recipe.epochs if epochs is None else epochs
    image_size = recipe.image_size if image_size is None else image_size
    name = protocol
    if (epochs, image_size) != (recipe.epochs, recipe.image_size):
        name += f"-e{epochs}" + ("" if image_size == recipe.image_size else f"-{image_size}px")
    return PROJECT_ROOT / PROFILES[profile]["all"]["run_dir"] / "models" / name


def train_identifier(profile: str = "full", protocol: str = "seed", data_dir: str | Path | None = None,
                     progress: bool = True, epochs: int | None = None, image_size: int | None = None) -> Path:
    """Train (or reuse) the identifier with the chosen recipe into ``runs/<profile>/models/<protocol>``.

    The default protocol ``seed`` trains on 80% of each class's training photos; the identifier built on it
    (:meth:`CarIdentifier.from_run`) holds all of them and sets its unknown threshold on the other 20%, photos
    the model never trained on (notebook 08: set on trained-on photos, the threshold is far too strict).

    ``epochs`` shortens (or lengthens) the recipe for a quicker identifier (``make identifier`` trains 10 of
    the recipe's 20 epochs, about half the training time, for a somewhat weaker model: README, "Identify your
    own photo"); ``image_size`` likewise (``make identifier`` uses 160 px, the recipe 192: the 1.4x slower
    trunk cache and training would take a fresh clone's identifier to an estimated 30+ minutes on 2 cores). Such a run goes
    to ``<protocol>-e<epochs>[-<image_size>px]`` beside notebook 03's.
    """
    from .data import open_dataset

    config, params = recipe_config(profile, protocol)
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        config = replace(config, epochs=epochs)
    if image_size is not None:
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 px, got {image_size}")
        config = replace(config, image_size=image_size)
    data_dir = Path(data_dir or params["data_dir"])
    data_dir = data_dir if data_dir.is_absolute() else PROJECT_ROOT / data_dir
    if params["dataset"] == "stanford_cars" and not data_dir.is_dir():
        raise FileNotFoundError(f"no Stanford Cars copy at {data_dir}; pass --data-dir /path/to/stanford_cars "
                                "(any layout the README lists)")
    cars = open_dataset(params["dataset"], data_dir, synth_config=params.get("synth_preset", "default"))
    out = recipe_run_dir(profile, protocol, epochs, image_size)
    start = time.perf_counter()
    run = train(cars, config, out, progress=progress)
    print(f"[vericar] {out}: {config.describe()}, {config.backbone} @ {config.image_size} px; "
          f"P@1 {run.metrics['trained']['precision_at_1']:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return out


# -- the service -----------------------------------------------------------------------------------------

@dataclass
class AddedCars:
    """Photos added to the database since training: embeddings, class names and thumbnails, in order."""

    embeddings: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    thumbnails: list[bytes] = field(default_factory=list)

    def save(self, path: Path) -> Path:
        """Write atomically (a temporary file renamed over the old one)."""
        tmp = path.with_name(path.name + ".tmp")
        blob = b"".join(self.thumbnails)
        ends = np.cumsum([len(t) for t in self.thumbnails], dtype=np.int64)
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=np.stack(self.embeddings).astype(np.float32), names=np.array(self.names),
                     thumbnails=np.frombuffer(blob, dtype=np.uint8), thumbnail_ends=ends)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "AddedCars":
        data = np.load(path, allow_pickle=False)
        blob, ends = data["thumbnails"].tobytes(), data["thumbnail_ends"]
        starts = np.concatenate([[0], ends[:-1]])
        return cls(list(data["embeddings"]), [str(n) for n in data["names"]],
                   [blob[s:e] for s, e in zip(starts, ends)])


class IdentifyService:
    """One trained run, loaded once: identify photos, show their nearest database images, add new cars.

    ``embedder`` maps uint8 images ``(N, 3, S, S)`` to embeddings (default: the identifier's torch model,
    see :mod:`vericar.export` for faster backends). Not thread-safe: the app calls it from one worker thread.
    """

    def __init__(self, identifier: CarIdentifier, cars: CarsDataset, database_rows: np.ndarray, *,
                 embedder=None, backend: str = "torch", run_dir: Path | None = None, persist: bool = False,
                 neighbours: int = 5, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> None:
        self.identifier, self.cars = identifier, cars
        self.database_rows = np.asarray(database_rows, dtype=np.int64)
        self.n_database = len(self.database_rows)
        self.embedder = embedder or torch_embedder(identifier.model)
        self.backend, self.run_dir, self.persist = backend, run_dir, persist
        self.neighbours, self.max_bytes, self.max_pixels = neighbours, max_bytes, max_pixels
        self.added = AddedCars()
        self.note = ""
        self._thumb = lru_cache(maxsize=4096)(lambda row: thumbnail_bytes(self.cars.image(int(row))))
        if run_dir is not None and (run_dir / ADDED_FILE).is_file():
            self._restore(AddedCars.load(run_dir / ADDED_FILE))

    @classmethod
    def from_run(cls, run_dir: str | Path, *, data_dir=None, backend: str = "torch", persist: bool = False,
                 **kwargs) -> "IdentifyService":
        """Load a run folder once: model, database, dataset; ``backend`` ``auto`` picks the fastest that matches."""
        from .export import make_embedder, run_onnx_path, select_backend

        run, cars = open_run(run_dir, data_dir)
        identifier = CarIdentifier.from_run(run, cars)
        rows, _ = database_rows(run)
        model = identifier.model  # loaded once, by the identifier
        if backend == "auto":
            sample = torch.stack([square_tensor(cars.image(int(r)), run.config.image_size, model.spec.interpolation)
                                  for r in rows[:16]])
            backend, embedder, _ = select_backend(model, run.config.image_size, sample, onnx_path=run_onnx_path(run))
        else:
            embedder = make_embedder(model, run.config.image_size, backend,
                                     run_onnx_path(run) if backend == "onnx" else None)
        return cls(identifier, cars, rows, embedder=embedder, backend=backend, run_dir=Path(run_dir),
                   persist=persist, **kwargs)

    # images -> tensors -> embeddings
    def decode(self, data: bytes, name: str = "upload") -> Image.Image:
        return decode_image(data, name, max_bytes=self.max_bytes, max_pixels=self.max_pixels)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        size, interp = self.identifier.image_size, self.identifier.model.spec.interpolation
        return self.embedder(torch.stack([square_tensor(im, size, interp) for im in images]))

    def identify(self, images: Sequence[Image.Image]) -> list[dict]:
        """Per photo: the answer per level with its confidence, the unknown flag, score and threshold, and the
        nearest database images (class name, distance, thumbnail as a data URL)."""
        if not images:
            return []
        q = self.embed(images)
        table = self.identifier.identify(q)
        k = min(self.neighbours, len(self.identifier.index))
        distances, positions = self.identifier.index.search(q, k)
        names = self.identifier.class_table["class_name"].to_numpy()
        out = []
        for i, row in enumerate(table.to_dict("records")):
            neighbours = [{"class_name": str(names[self.identifier.index.labels[p]]), "distance": float(d),
                           "database_index": int(p), "thumbnail": data_url(self.thumbnail(p))}
                          for d, p in zip(distances[i], positions[i])]
            out.append({"class_name": str(row["class_name"]),
                        "levels": {lv: {"answer": _plain(row[lv]), "confidence": float(row[f"{lv}_confidence"])}
                                   for lv in LEVELS},
                        "known": bool(row["known"]), "score": float(row["score"]),
                        "threshold": float(self.identifier.threshold), "neighbours": neighbours})
        return out

    def database_image(self, position: int) -> Image.Image:
        """The database image at ``position`` of the index (an added photo only as its thumbnail)."""
        if position < self.n_database:
            return self.cars.image(int(self.database_rows[position]))
        return Image.open(io.BytesIO(self.added.thumbnails[position - self.n_database]))

    def in_database(self) -> set[str]:
        """Class names that have at least one database image (the class table also lists held-out classes)."""
        names = self.identifier.class_table["class_name"].to_numpy()
        return set(names[np.unique(self.identifier.index.labels)])

    def thumbnail(self, position: int) -> bytes:
        """JPEG thumbnail of the database image at ``position`` of the index (a dataset image or an added photo)."""
        if position < self.n_database:
            return self._thumb(int(self.database_rows[position]))
        return self.added.thumbnails[position - self.n_database]

    def add_car(self, name: str, images: Sequence[Image.Image]) -> dict:
        """Add a new car (``name`` like "Make Model Body Year") from photos; no retraining."""
        name = " ".join((name or "").split())
        if not name:
            raise BadInput("the new car needs a name, e.g. 'Zentra Volo Sedan 2013' (make, model, body, year)")
        if name in self.in_database():
            raise BadInput(f"a car named {name!r} is already in the database; choose another name", status=409)
        try:
            parse_class_name(name)
        except ValueError as err:
            raise BadInput(f"{err}; name the car like 'Zentra Volo Sedan 2013'") from None
        if not images:
            raise BadInput("no usable photo of the new car; upload at least one JPEG, PNG or WebP photo")
        q = self.embed(images)
        thumbs = [thumbnail_bytes(im) for im in images]
        index = self.identifier.add(q, name)
        self.added.embeddings += list(q)
        self.added.names += [name] * len(q)
        self.added.thumbnails += thumbs
        saved = self.added.save(self.run_dir / ADDED_FILE) if self.persist and self.run_dir else None
        return {"class_name": name, "class_index": int(index), "photos": len(q),
                "database_size": len(self.identifier.index), "saved_to": str(saved) if saved else None}

    def _restore(self, added: AddedCars) -> None:
        for name in dict.fromkeys(added.names):
            rows = [i for i, n in enumerate(added.names) if n == name]
            self.identifier.add(np.stack([added.embeddings[i] for i in rows]), name)
            self.added.embeddings += [added.embeddings[i] for i in rows]
            self.added.names += [name] * len(rows)
            self.added.thumbnails += [added.thumbnails[i] for i in rows]

    def health(self) -> dict:
        cfg = self.identifier
        return {"status": "ok", "run": str(self.run_dir) if self.run_dir else None, "dataset": self.cars.name,
                "backend": self.backend, "image_size": cfg.image_size, "database_size": len(cfg.index),
                "classes": len(cfg.class_table), "added_photos": len(self.added.names),
                "threshold": float(cfg.threshold), "calibration": cfg.calibration, "note": self.note}


def answers_table(answers: Sequence[dict]) -> "pd.DataFrame":
    """:meth:`IdentifyService.identify`'s answers as one row per photo (answer and confidence per level)."""
    import pandas as pd

    rows = [{"class_name": a["class_name"], **{lv: a["levels"][lv]["answer"] for lv in LEVELS},
             **{f"{lv}_confidence": a["levels"][lv]["confidence"] for lv in LEVELS},
             "known": a["known"], "score": a["score"], "threshold": a["threshold"]} for a in answers]
    return pd.DataFrame(rows)


def level_accuracy(predicted: "pd.DataFrame", true_class_index, class_table: "pd.DataFrame") -> dict[str, float]:
    """Share of answers right at each level, with the study's prefix semantics: ``accuracy_type`` is make *and*
    type right, ..., ``accuracy_year`` the exact class (:func:`vericar.metrics.level_accuracy`, the one per-level
    correctness of vericar); ``accuracy_class`` repeats ``accuracy_year`` under the name earlier results used.

    ``predicted``: :meth:`CarIdentifier.identify`'s table (its ``<level>_key`` columns); ``true_class_index``:
    the photos' 0-based classes; ``class_table``: one row per class (``CarsDataset.hierarchy``).
    """
    from .metrics import level_accuracy as prefix_level_accuracy

    acc = prefix_level_accuracy(predicted, true_class_index, class_table)
    out = {f"accuracy_{lv}": acc[f"accuracy_{lv}"] for lv in LEVELS}
    out["accuracy_class"] = out["accuracy_year"]
    return out


def confidence_table(predicted: "pd.DataFrame", true_class_index, class_table: "pd.DataFrame",
                     at: float = 0.8) -> "pd.DataFrame":
    """Per level: share of answers with confidence >= ``at``, their accuracy, and the others' accuracy
    (right at a level as in :func:`level_accuracy`: :func:`vericar.metrics.level_correct`)."""
    import pandas as pd

    from .metrics import level_correct

    correct = level_correct(predicted, true_class_index, class_table)
    out = {}
    for lv in LEVELS:
        right = correct[lv].to_numpy(bool)
        sure = predicted[f"{lv}_confidence"].to_numpy() >= at
        out[lv] = {"share confident": sure.mean(),
                   "accuracy if confident": right[sure].mean() if sure.any() else np.nan,
                   "accuracy otherwise": right[~sure].mean() if (~sure).any() else np.nan}
    return pd.DataFrame(out)


def adding_table(stages: dict[str, Sequence[dict]], name: str, model: str) -> "pd.DataFrame":
    """Per stage (e.g. before / after adding a car): share of its photos flagged unknown, named ``name``, and
    whose model-level answer is ``model``."""
    import pandas as pd

    return pd.DataFrame({stage: {"flagged unknown": np.mean([not a["known"] for a in answers]),
                                 "named right": np.mean([a["class_name"] == name for a in answers]),
                                 "model right": np.mean([a["levels"]["model"]["answer"] == model for a in answers])}
                         for stage, answers in stages.items()})


def neighbour_images(service: IdentifyService, answers: Sequence[dict]) -> list[list[Image.Image]]:
    """The database images of each answer's nearest neighbours (for figures)."""
    return [[service.database_image(n["database_index"]) for n in a["neighbours"]] for a in answers]


def pick_unknown_class(run: TrainedRun, cars: CarsDataset, shots: int = 5) -> tuple[str, np.ndarray, np.ndarray]:
    """A held-out class of an open-world run for the add-without-retraining demo, chosen by counts only.

    Among the held-out classes with at least ``shots`` labelled images (``split.ood_database``), the one with
    the most test photos (``split.ood_query``). Returns its name, ``shots`` rows to add and its test rows.
    """
    split, labels = run.split, cars.labels
    if not len(split.ood_query):
        raise ValueError(f"{run.path} (protocol {run.config.protocol!r}) holds no car out of its database; "
                         "use an open-world run (notebook 03 trains runs/<profile>/models/open-world)")
    add_counts = np.bincount(labels[split.ood_database], minlength=cars.num_classes)
    query_counts = np.bincount(labels[split.ood_query], minlength=cars.num_classes)
    query_counts[add_counts < shots] = 0
    if query_counts.max() == 0:
        raise ValueError(f"no held-out class has {shots} labelled images and a test photo; lower shots")
    label = int(np.argmax(query_counts))
    return (str(cars.class_names[label]), split.ood_database[labels[split.ood_database] == label][:shots],
            split.ood_query[labels[split.ood_query] == label])


# -- notebook 08's steps -----------------------------------------------------------------------------------

def test_photo_rows(run: TrainedRun, cars: CarsDataset) -> np.ndarray:
    """The test photos of known cars for an identifier built on ``run``: ``split.query``, or, where the
    queries are held-out training photos that the identifier's database holds (``predict.HELDOUT_PROTOCOLS``),
    the official test images (the split trains on every class)."""
    rows = run.split.query if database_rows(run)[1] is None else np.flatnonzero(
        (cars.table["split"] == "test").to_numpy())
    if not len(rows):
        raise ValueError(f"{run.path}: no test photos of known cars to show (protocol {run.config.protocol!r} "
                         f"with {cars.name}'s images); use a run of protocol seed or official on data with a test "
                         "split")
    return rows


def example_photos(run: TrainedRun, cars: CarsDataset, examples: int, seed: int = 0
                   ) -> tuple[np.ndarray, list[Image.Image]]:
    """``examples`` random test photos of known cars (:func:`test_photo_rows`, seeded): rows and images."""
    rng = np.random.default_rng(seed)
    photos = test_photo_rows(run, cars)
    rows = rng.choice(photos, size=min(examples, len(photos)), replace=False)
    return rows, [cars.image(int(r)) for r in rows]


def examples_table(answers: Sequence[dict], cars: CarsDataset, rows) -> "pd.DataFrame":
    """:func:`answers_table` with each photo's true class beside the answer."""
    truth = cars.hierarchy.iloc[cars.labels[np.asarray(rows)]]["class_name"].to_numpy()
    return answers_table(answers).assign(true_class=truth)


def identify_test_set(service: IdentifyService, run: TrainedRun, cars: CarsDataset, *, example_rows=None,
                      example_answers: Sequence[dict] | None = None, at: float = 0.8) -> dict:
    """The identifier over every test photo of known cars, from their stored embeddings.

    Returns ``predicted`` (one row per photo), ``accuracy`` (:func:`level_accuracy`, prefix semantics),
    ``confidence`` (:func:`confidence_table` at ``at``), ``known_share`` (share accepted as known),
    ``n_photos`` and ``photos_match_embeddings``: for the example photos identified from their images, the
    share whose class equals the one their stored embeddings give (None without examples).
    """
    rows = test_photo_rows(run, cars)
    predicted = service.identifier.identify(run.embeddings[rows])
    truth = cars.labels[rows]
    same = None
    if example_rows is not None and example_answers:
        stored = service.identifier.identify(run.embeddings[np.asarray(example_rows)])
        same = float(np.mean([a["class_name"] == c for a, c in zip(example_answers, stored["class_name"])]))
    return {"predicted": predicted, "accuracy": level_accuracy(predicted, truth, cars.hierarchy),
            "confidence": confidence_table(predicted, truth, cars.hierarchy, at), "n_photos": len(rows),
            "known_share": float(predicted["known"].mean()), "photos_match_embeddings": same}


def calibration_check(run: TrainedRun, cars: CarsDataset, *, tpr: float = 0.95) -> "pd.DataFrame":
    """One model's unknown threshold set two ways, and the share of test photos of known cars each accepts.

    ``run`` must hold photos out (protocol ``seed`` or ``val``: 80% of each class's training photos train the
    model, the other 20% do not). Both identifiers hold every training photo in their database and differ in
    the photos that set the threshold (accept ``tpr`` of them): all of them (mostly photos the model trained
    on, as for a run without held-out photos) or the held-out ones only. One row each: ``calibration``,
    ``calibration_photos``, ``threshold``, ``test_photos``, ``accepted`` with its 95% Wilson interval, and the
    accuracy at the make and the exact class (prefix semantics; equal in both rows: same database).
    """
    import pandas as pd

    from .metrics import wilson_interval

    rows, heldout = database_rows(run)
    if heldout is None:
        raise ValueError(f"{run.path} (protocol {run.config.protocol!r}) holds no photo out of training; use a "
                         "protocol 'seed' or 'val' run (notebook 03 trains <run_dir>/models/seed)")
    test = test_photo_rows(run, cars)
    out = []
    for name, mask in (("every database photo", None), ("held-out photos only", heldout)):
        identifier = CarIdentifier(None, run.config.image_size, run.embeddings[rows], cars.labels[rows],
                                   cars.hierarchy, tpr=tpr, heldout=mask)
        predicted = identifier.identify(run.embeddings[test])
        accuracy = level_accuracy(predicted, cars.labels[test], cars.hierarchy)
        accepted = int(predicted["known"].sum())
        low, high = wilson_interval(accepted, len(test))
        out.append({"calibration": name, "calibration_photos": len(rows) if mask is None else int(mask.sum()),
                    "trained_on": float(1 - heldout.mean()) if mask is None else 0.0,
                    "threshold": identifier.threshold, "test_photos": len(test), "accepted": accepted / len(test),
                    "accepted_low": low, "accepted_high": high, "accuracy_make": accuracy["accuracy_make"],
                    "accuracy_year": accuracy["accuracy_year"]})
    return pd.DataFrame(out)


def summary_line(summary: dict) -> str:
    """One printed line of :func:`identify_test_set`'s numbers."""
    acc = ", ".join(f"{k.removeprefix('accuracy_')} {v:.2%}" for k, v in summary["accuracy"].items()
                    if k != "accuracy_class")
    same = summary["photos_match_embeddings"]
    return (f"{summary['n_photos']} test photos, right at (prefix semantics: type = make + type, ...): {acc}; "
            f"{summary['known_share']:.2%} accepted as known."
            + ("" if same is None else f" Photos and their stored embeddings give the same class for {same:.0%} "
                                       "of the examples."))


def add_unknown_car(service: IdentifyService, run: TrainedRun, cars: CarsDataset, shots: int = 5) -> dict:
    """The held-out car of :func:`pick_unknown_class`: its test photos identified before and after adding
    ``shots`` labelled photos of it (:meth:`IdentifyService.add_car`, no retraining).

    Returns ``name``, ``photos`` (its test photos), ``before``/``after`` (answers), ``added`` (add_car's
    reply), ``table`` (:func:`adding_table`) and ``n_test_photos``.
    """
    name, add_rows, unknown_rows = pick_unknown_class(run, cars, shots)
    photos = [cars.image(int(r)) for r in unknown_rows]
    before = service.identify(photos)
    added = service.add_car(name, [cars.image(int(r)) for r in add_rows])
    after = service.identify(photos)
    true_model = cars.hierarchy.iloc[cars.labels[unknown_rows[0]]]["model"]
    table = adding_table({"before adding": before, f"after adding {added['photos']} photos": after}, name, true_model)
    return {"name": name, "photos": photos, "before": before, "after": after, "added": added, "table": table,
            "n_test_photos": len(unknown_rows)}


def identify_entries(dataset: str, run: TrainedRun, summary: dict, demo: dict, shots: int,
                     calibration: "pd.DataFrame | None" = None, calibration_run: TrainedRun | None = None) -> list[dict]:
    """The entries of ``results/08_identify.json``: the test set (accuracy per level, prefix semantics, and the
    share accepted as known; the confidence table), the unknown car added without retraining and, given
    :func:`calibration_check`'s table and its run, the unknown threshold set on held-out photos."""
    from .results import results_entry

    cfg = run.config
    common = dict(dataset=dataset, protocol=cfg.protocol, backbone=cfg.backbone, image_size=cfg.image_size,
                  device=run.metrics["device"])
    t = demo["table"]
    entries = [results_entry(**common, experiment="identify test photos", setting=cfg.describe(),
                             n_photos=summary["n_photos"], levels="prefix (type = make + type, model = make + type "
                                                                   "+ model, year = the exact class)",
                             metrics={**summary["accuracy"], "known_share": summary["known_share"]},
                             confidence=summary["confidence"].to_dict()),
               results_entry(**common, experiment="unknown car added without retraining", setting=f"{shots} photos added",
                             car=demo["name"], n_test_photos=demo["n_test_photos"], n_added=demo["added"]["photos"],
                             metrics={"flagged_before": t.iloc[0, 0], "flagged_after": t.iloc[0, 1],
                                      "named_before": t.iloc[1, 0], "named_after": t.iloc[1, 1],
                                      "model_before": t.iloc[2, 0], "model_after": t.iloc[2, 1]})]
    if calibration is not None:
        c = calibration_run.config
        every, held = (calibration.iloc[i] for i in (0, 1))
        entries.append(results_entry(
            dataset=dataset, protocol=c.protocol, backbone=c.backbone, image_size=c.image_size,
            device=calibration_run.metrics["device"], experiment="unknown threshold calibration",
            setting=c.describe(), n_photos=int(held["test_photos"]),
            calibration_photos={"every database photo": int(every["calibration_photos"]),
                                "held-out photos only": int(held["calibration_photos"])},
            metrics={"accepted_every": float(every["accepted"]), "accepted_heldout": float(held["accepted"]),
                     "threshold_every": float(every["threshold"]), "threshold_heldout": float(held["threshold"]),
                     "trained_share_every": float(every["trained_on"]), "accuracy_make": float(held["accuracy_make"]),
                     "accuracy_year": float(held["accuracy_year"])}))
    return entries


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vericar.identify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["full", "quick"], default="full")
    parser.add_argument("--protocol", default="seed", help="seed (default): 80%% of the training photos train the "
                        "model, the other 20%% set the unknown threshold; official trains on all of them")
    parser.add_argument("--data-dir", help="dataset folder (default: the profile's)")
    parser.add_argument("--epochs", type=int, help="train this many epochs instead of the recipe's "
                        "(into <protocol>-e<epochs>, beside notebook 03's run folder)")
    parser.add_argument("--image-size", type=int, help="input size instead of the recipe's (make identifier: 160; "
                        "into <protocol>-e<epochs>-<size>px)")
    args = parser.parse_args(argv)
    # the run folder alone on stdout, so that `make identifier` can hand it to the app
    print(train_identifier(args.profile, args.protocol, args.data_dir, epochs=args.epochs, image_size=args.image_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
