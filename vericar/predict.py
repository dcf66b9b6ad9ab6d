"""Name a car from a photo, flag cars that are in no database, and add new cars without retraining.

>>> identifier = CarIdentifier.from_run("runs/full/models/open-world", cars)
>>> identifier.identify([photo])          # make / type / model / year, a confidence each, known or not
>>> identifier.add(photos_of_new_model, "Zentra Volo Sedan 2013")   # recognised from now on
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .data.dataset import CarsDataset
from .data.hierarchy import parse_class_name
from .data.images import load_image
from .embed import embed_batches, resolve_device, square_tensor
from .ood import knn_scores, threshold_at_tpr
from .retrieval import KNNIndex, hierarchical_predict
from .runs import TrainedRun, load_model, load_run


#: protocols whose queries are held-out photos of the training classes (80/20 within each class): an
#: identifier built on such a run puts them in its database and sets the unknown threshold on them
HELDOUT_PROTOCOLS = ("seed", "val")


def database_rows(run: TrainedRun) -> tuple[np.ndarray, np.ndarray | None]:
    """The dataset rows an identifier built on ``run`` holds, and which of them the model never trained on.

    For :data:`HELDOUT_PROTOCOLS`: every image of the training classes (``split.database`` and the held-out
    ``split.query``), with the mask of the held-out ones (for :meth:`CarIdentifier.calibrate`). Otherwise the
    split's database and None (the threshold is then set on photos the model trained on)."""
    split = run.split
    rows = split.database
    if run.config.protocol in HELDOUT_PROTOCOLS and not len(np.intersect1d(split.query, split.train)):
        rows = np.union1d(split.database, split.query)
    heldout = ~np.isin(rows, split.train)  # e.g. zero-shot: a database of classes never trained on
    return rows, heldout if heldout.any() else None


class CarIdentifier:
    """K-NN identification at every level of make > type > model > year, with a KNN+ "unknown car" flag.

    ``database_embeddings`` (L2-normalised) and ``database_labels`` (0-based class indices into
    ``class_table``, one row per class with ``class_name, make, type, model, year``) form the database.
    Identification votes over the ``k`` nearest database images at each level independently
    (:func:`vericar.retrieval.hierarchical_predict`), each neighbour's vote weighted by ``1 / distance``
    (``weighted=True``, the default), so that a class with fewer than ``k`` images (a car just added from one
    photo) is not outvoted by farther images of other classes; ``weighted=False`` counts votes. The KNN+
    score is minus the distance to the ``ood_k``-th nearest database image, and a car is *known* when its score
    clears the threshold that accepts ``tpr`` of the calibration photos (the in-distribution side only), each
    scored against the rest of the database (leave-one-out). The calibration photos are ``heldout`` (a boolean
    mask over the database: photos in it that the model never trained on) when given, else the whole database.
    Set on photos the model trained on, the threshold is too strict for new photos (their nearest neighbours
    are farther): notebook 08 measures both. :meth:`from_run` holds photos out for runs whose split has them.
    """

    def __init__(self, model, image_size: int, database_embeddings: np.ndarray, database_labels: np.ndarray,
                 class_table: pd.DataFrame, *, k: int = 5, ood_k: int = 1, tpr: float = 0.95,
                 weighted: bool = True, device: str = "cpu", heldout: np.ndarray | None = None) -> None:
        self.model = model.eval() if model is not None else None
        self.image_size = image_size
        self.device = resolve_device(device)
        self.k, self.ood_k, self.tpr, self.weighted = _check_k(k, "k"), _check_k(ood_k, "ood_k"), tpr, weighted
        self.class_table = class_table[["class_name", "make", "type", "model", "year"]].reset_index(drop=True)
        self.index = KNNIndex(database_embeddings, np.asarray(database_labels, dtype=np.int64), device=str(self.device))
        self.heldout = None if heldout is None else np.asarray(heldout, dtype=bool)
        if self.heldout is not None and (self.heldout.shape != (len(self.index),) or not self.heldout.any()):
            raise ValueError(f"heldout must be a boolean mask over the {len(self.index)} database photos with at "
                             f"least one True; got shape {self.heldout.shape} with {int(self.heldout.sum())} True")
        self.calibrate()

    @classmethod
    def from_run(cls, run: TrainedRun | str | Path, cars: CarsDataset, *, k: int = 5, ood_k: int = 1,
                 tpr: float = 0.95, weighted: bool = True, device: str = "cpu") -> "CarIdentifier":
        """An identifier over a trained run's database (its split's ``database`` images).

        Refuses (:class:`vericar.runs.RunConfigError`) a dataset other than the one the run was trained on.
        """
        run = load_run(run.path if isinstance(run, TrainedRun) else run, cars)  # checks the data fingerprint
        model = load_model(run, device=device)
        rows, heldout = database_rows(run)
        return cls(model, run.config.image_size, run.embeddings[rows], cars.labels[rows], cars.hierarchy,
                   k=k, ood_k=ood_k, tpr=tpr, weighted=weighted, device=device, heldout=heldout)

    @property
    def calibration(self) -> str:
        """Which photos set the threshold, in words (the app's /health shows it)."""
        if self.heldout is None:
            return (f"{len(self.index):,} database photos, leave-one-out (photos the model trained on: too strict "
                    "for new photos)")
        return f"{int(self.heldout.sum()):,} database photos the model never trained on, leave-one-out"

    def calibrate(self) -> float:
        """Set the KNN+ threshold so ``tpr`` of the calibration photos count as known (see the class)."""
        scores = knn_scores(self.index.embeddings, self.index.embeddings, self.ood_k, exclude_self=True)
        if self.heldout is not None:
            scores = scores[:len(self.heldout)][self.heldout]  # photos added later are not held out
        self.threshold = threshold_at_tpr(scores, self.tpr)
        return self.threshold

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeddings of PIL images, prepared exactly as in training's evaluation (square resize, normalise)."""
        if self.model is None:
            raise RuntimeError("this identifier has no model; pass embeddings instead of images")
        batch = torch.stack([square_tensor(im, self.image_size, self.model.spec.interpolation) for im in images])
        return embed_batches(self.model, batch, self.model.spec, device=self.device, progress=False)

    def identify(self, images_or_embeddings, k: int | None = None) -> pd.DataFrame:
        """One row per car: predicted ``make, type, model, year, class_name`` with a confidence per level
        (vote share among the ``k`` neighbours), the KNN+ ``score`` and ``known`` (False: in no database),
        then the winning ``class_index`` and prefix keys ``make_key .. year_key`` (levels are voted
        independently, so the ``type`` answer's make may differ from the ``make`` answer; the keys keep it).

        Accepts PIL images, image paths, uint8 image arrays (H x W or H x W x 3), one of these alone, or an
        (N, D) float array of embeddings."""
        q = self._embeddings(images_or_embeddings)
        k = min(self.k if k is None else _check_k(k, "k"), len(self.index))
        distances, neighbours = self.index.search(q, k)
        pred = hierarchical_predict(self.index.labels[neighbours], distances, self.class_table,
                                    weighted=self.weighted)
        scores = knn_scores(q, self.index.embeddings, self.ood_k)
        out = pred[["make", "type", "model", "year", "make_confidence", "type_confidence", "model_confidence",
                    "year_confidence"]].copy()
        out.insert(4, "class_name", self.class_table["class_name"].to_numpy()[pred["class_index"].to_numpy()])
        out["score"] = scores
        out["known"] = scores >= self.threshold
        # the winning class and prefix keys, so that vericar.metrics.level_correct scores these answers
        out["class_index"] = pred["class_index"].to_numpy()
        for level in ("make", "type", "model", "year"):
            out[f"{level}_key"] = pred[f"{level}_key"].to_numpy()
        return out

    def add(self, images_or_embeddings, class_name: str, *, recalibrate: bool = False) -> int:
        """Add images of a (new or existing) class to the database; no retraining. Returns its class index.

        A new ``class_name`` is parsed into make / type / model / year (it must follow the
        "Make Model Body Year" pattern of the class list). The KNN+ threshold stays calibrated on the
        original database unless ``recalibrate``.
        """
        q = self._embeddings(images_or_embeddings)
        names = self.class_table["class_name"].tolist()
        folded = {n.casefold(): n for n in names}
        if class_name in names:
            index = names.index(class_name)
        elif class_name.casefold() in folded:
            raise ValueError(f"{class_name!r} differs from the existing class {folded[class_name.casefold()]!r} "
                             "only in case; pass that name to add images to it (a new class needs a new name)")
        else:
            label = parse_class_name(class_name)
            makes = {m.casefold(): m for m in self.class_table["make"]}  # "acura ..." is the make "Acura"
            row = {"class_name": class_name, "make": makes.get(label.make.casefold(), label.make),
                   "type": label.type, "model": label.model, "year": label.year}
            self.class_table = pd.concat([self.class_table, pd.DataFrame([row])], ignore_index=True)
            index = len(self.class_table) - 1
        self.index.add(q, np.full(len(q), index, dtype=np.int64))
        if recalibrate:
            self.calibrate()
        return index

    def _embeddings(self, images_or_embeddings) -> np.ndarray:
        """(N, D) float32 embeddings of a batch of images / paths / image arrays, or of given embeddings."""
        x, dim = images_or_embeddings, self.index.embeddings.shape[1]
        if isinstance(x, (str, Path, Image.Image)) or (isinstance(x, np.ndarray) and _is_one_image(x)):
            x = [x]  # one image
        if isinstance(x, np.ndarray):
            if x.ndim == 1 and len(x) == dim:
                x = x[None]
            if x.ndim != 2 or x.shape[1] != dim or x.dtype.kind != "f":
                raise ValueError(f"an array passed as embeddings must be float (N, {dim}); got {x.dtype} "
                                 f"{x.shape}. Pass images as PIL images, paths or uint8 arrays (H x W x 3)")
            if not len(x):
                raise ValueError("nothing to identify: the embedding array is empty")
            if not np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-2):
                raise ValueError(f"a float {x.shape} array was passed as embeddings, but its rows are not unit length "
                                 "as the model's embeddings are. An image? Pass it as uint8 pixels or a PIL image")
            return x.astype(np.float32)
        if x is None:
            raise ValueError("nothing to identify: got None; pass images, paths or embeddings")
        items = list(x)
        if not items:
            raise ValueError("nothing to identify: the list of images is empty")
        images = []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                item = load_image(item)
            elif isinstance(item, np.ndarray):
                if item.dtype != np.uint8 or not _is_one_image(item):
                    raise TypeError(f"item {i} of the batch is a {item.dtype} array of shape {item.shape}; an image "
                                    "array must be uint8, H x W or H x W x 3")
                item = Image.fromarray(item)
            if not isinstance(item, Image.Image):
                raise TypeError(f"item {i} of the batch is {type(item).__name__}, not an image: pass PIL images, "
                                "image paths or uint8 arrays (H x W x 3), or one (N, D) array of embeddings")
            images.append(item)
        return self.embed(images)


def _check_k(k, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a whole number >= 1 (neighbours to use), got {k!r}")
    return int(k)


def _is_one_image(x: np.ndarray) -> bool:
    """H x W x 3/4 pixels, or uint8 H x W (grayscale), as opposed to an (N, D) array of embeddings."""
    return (x.ndim == 3 and x.shape[2] in (3, 4)) or (x.ndim == 2 and x.dtype == np.uint8)
