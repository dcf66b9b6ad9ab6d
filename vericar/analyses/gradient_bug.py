"""Reproductions of the seed's reported failures, and the grid of training runs that measures each (notebook 02).

The seed (a public re-implementation) reported being stuck at 0.20% accuracy "while the loss decreased" and
blamed its loss accumulation (``loss = loss + sample_loss`` "severs the computational graph"). It also had
three other suspects, each reproduced here so that one training grid can measure them side by side:

* **Loss accumulation** (:data:`vericar.analyses.seed_losses.ACCUMULATION_VARIANTS`): the write-up's "wrong" loop, its
  "fix" and the accumulations that really cut the graph, as ``make_loss("ms_accum:<variant>")``.
* **Plain shuffled batches** (``TrainConfig(sampler="shuffle")``) instead of class-balanced ones
  (``MPerClassSampler``): :func:`positive_coverage` measures how many anchors of a batch have a positive at all.
* **Corrupted labels** (:func:`unlabelled_test_file_labels`): what a reader gets from the devkit's
  *unlabelled* test annotation file ``cars_test_annos.mat``.
* **Evaluation with train-time augmentation** (``TrainConfig(eval_augment=True)``, fine-tune only).
* **The seed's hierarchical clamp** (``"seed_hier_clamp"``) vs HiMS-Min (``"hims_min"``) and flat MS.

:func:`comparison_variants` names the grid, :func:`run_comparison` trains it (one run folder per variant,
``<run_dir>/models/02_<variant>``, reused when finished), :func:`classify_outcomes` turns the final metrics
into verdicts (breaks / slows / no change), and :func:`gradient_verdicts` does the same for one batch's
gradients (:func:`vericar.analyses.seed_losses.gradient_report`).

Importing this module imports :mod:`.seed_losses`, which registers the seed's losses (``"ms_accum:<variant>"``,
``"seed_hier_clamp"``) with :func:`vericar.losses.make_loss`, so that :func:`run_comparison` trains, and resumes,
their run folders in any process.

The label corruption
--------------------
The devkit's training annotations have six fields per image, ``bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
fname``; its test file ``cars_test_annos.mat`` has five, ``bbox_x1, bbox_y1, bbox_x2, bbox_y2, fname`` (no
class; the labels are in the separately released ``cars_test_annos_withlabels.mat``). Code that reads the
class as "the last numeric field" (or as the field before the file name, ``anno[-2]``) gets the class in
the train file and **``bbox_y2``**, the bottom edge of the car's box in pixels of the original image, in
the test file. So the corrupted label of an image is a function of its box bottom only: images whose boxes
end on the same pixel row share a "class", and the class id is that row number. On the devkit test set
this gives 1,103 distinct "classes" (the count the seed reported; measured on
``../shared/data/stanford_cars_small``, whose ``orig_bbox_y2`` column keeps the devkit's 1-based values).

:func:`unlabelled_test_file_labels` returns exactly that value (``mode="value"``, the faithful
reproduction); ``mode="mod"`` folds it into the C real class ids (``value mod C``, what a reader that
wraps out-of-range ids would see) for comparison. The column read is ``orig_bbox_y2`` where the table has
it (the compact copies of the real data, whose ``bbox_*`` columns refer to the resized stored image) and
``bbox_y2`` otherwise (devkit and ``car_ims`` layouts, where our 0-based exclusive ``bbox_y2`` equals the
devkit's 1-based inclusive value, and SynthCars, whose boxes are in its own pixels).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import CarsDataset, Split
from ..metrics import wilson_interval
from ..results import results_entry
from ..retrieval import KNNIndex
from .seed_losses import ACCUMULATION_VARIANTS, GRAPH_CUTTING_VARIANTS, GRAPH_PRESERVING_VARIANTS, RAISING_VARIANTS

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = [
    "BatchGradientCheck",
    "CORRUPTION_MODES",
    "SUSPECTS",
    "Comparison",
    "Variant",
    "accuracy_against_labels",
    "batch_gradient_check",
    "class_subset",
    "classify_outcomes",
    "comparison_variants",
    "corrupted_test_accuracy",
    "expected_gradient_verdict",
    "gradient_verdicts",
    "label_corruption_summary",
    "positive_coverage",
    "real_batch",
    "run_comparison",
    "unlabelled_test_file_labels",
    "verdict_groups",
    "LabelCorruption",
    "comparison_lines",
    "conclusion_lines",
    "corrupted_scores_text",
    "coverage_table",
    "expected_shuffle_coverage",
    "gradient_bug_entries",
    "gradient_check_lines",
    "label_corruption_study",
    "variants_table",
]

CORRUPTION_MODES = ("value", "mod")

#: The seed's suspects besides loss accumulation, by name (see :func:`comparison_variants`).
SUSPECTS: dict[str, str] = {
    "shuffle": "plain shuffled batches (sampler='shuffle') instead of class-balanced MPerClassSampler batches",
    "corrupt_labels": "training labels read from the 5-field unlabelled test file: class = bbox_y2",
    "seed_hier_clamp": "the seed's hierarchical loss: each level clamped by torch.tensor(prev.item())",
    "hims_min": "HiMS-Min: hierarchical MS, each level min()-ed with the previous one, differentiably",
    "eval_augment": "evaluation with the train-time augmentation (fine-tune; vs the same model with eval transforms)",
}


# ==================================================================================================
# Label corruption
# ==================================================================================================

def _bbox_column(table: pd.DataFrame, column: str | None) -> str:
    if column is not None:
        if column not in table.columns:
            raise ValueError(f"no column {column!r} in the table (columns: {', '.join(table.columns)})")
        return column
    for name in ("orig_bbox_y2", "bbox_y2"):
        if name in table.columns:
            return name
    raise ValueError("the table has no box (orig_bbox_y2 or bbox_y2): this dataset's layout has no annotation "
                     "boxes, so the unlabelled-test-file corruption cannot be reproduced on it")


def unlabelled_test_file_labels(table: pd.DataFrame, rows=None, *, mode: str = "value", num_classes: int | None = None,
                                column: str | None = None) -> np.ndarray:
    """The "class" a reader takes from the devkit's 5-field ``cars_test_annos.mat``: the box bottom ``bbox_y2``.

    See the module docstring. ``rows`` selects rows of ``table`` (default all). ``mode="value"`` returns the
    field's value itself as the class id (int64; the faithful reproduction: one pseudo-class per distinct
    box-bottom row, ~1,100 on the real test set); ``mode="mod"`` returns ``value mod num_classes`` (needs
    ``num_classes``), i.e. pseudo-classes inside the real id range. ``column`` overrides the column read
    (default ``orig_bbox_y2`` if present, else ``bbox_y2``).

    The values are ids to compare for equality (what a metric-learning loss and a 1-NN accuracy use), not
    0-based indices into the class table.
    """
    if mode not in CORRUPTION_MODES:
        raise ValueError(f"mode must be one of {CORRUPTION_MODES}, got {mode!r}")
    col = _bbox_column(table, column)
    values = table[col].to_numpy()
    if rows is not None:
        values = values[np.asarray(rows, dtype=np.int64)]
    values = np.asarray(values, dtype=np.int64)
    if mode == "mod":
        if not num_classes or num_classes < 1:
            raise ValueError("mode='mod' needs num_classes >= 1")
        return values % int(num_classes)
    return values


def label_corruption_summary(true_labels, corrupted_labels) -> dict[str, float]:
    """How much class information survives the corruption, on one set of images.

    Returns ``images``, ``true_classes``, ``pseudo_classes`` (distinct corrupted labels),
    ``singleton_fraction`` (images alone in their pseudo-class: no positive pair exists for them),
    ``images_per_pseudo_class`` (mean), ``agreement`` (corrupted == true, as ids), ``pair_precision``
    (of the pairs that share a pseudo-class, the fraction that share the true class: what a metric loss
    pulls together that really belongs together; NaN without such pairs) and ``chance_pair_precision``
    (the same for random pairs, for scale).
    """
    y = np.asarray(true_labels, dtype=np.int64).ravel()
    z = np.asarray(corrupted_labels, dtype=np.int64).ravel()
    if len(y) != len(z):
        raise ValueError(f"{len(y)} true labels but {len(z)} corrupted labels")
    n = len(y)
    _, z_codes, z_counts = np.unique(z, return_inverse=True, return_counts=True)
    _, y_counts = np.unique(y, return_counts=True)
    joint = pd.Series(1, index=pd.MultiIndex.from_arrays([z, y])).groupby(level=[0, 1]).size().to_numpy()

    def pairs(counts):
        counts = np.asarray(counts, dtype=np.float64)
        return float((counts * (counts - 1) / 2).sum())

    same_pseudo, same_both, same_true = pairs(z_counts), pairs(joint), pairs(y_counts)
    all_pairs = n * (n - 1) / 2
    return {
        "images": n,
        "true_classes": int(len(y_counts)),
        "pseudo_classes": int(len(z_counts)),
        "singleton_fraction": float((z_counts[z_codes] == 1).mean()) if n else float("nan"),
        "images_per_pseudo_class": float(n / len(z_counts)) if n else float("nan"),
        "agreement": float((y == z).mean()) if n else float("nan"),
        "pair_precision": same_both / same_pseudo if same_pseudo else float("nan"),
        "chance_pair_precision": same_true / all_pairs if all_pairs else float("nan"),
    }


def accuracy_against_labels(embeddings: np.ndarray, database_rows, database_labels, query_rows, query_labels,
                            *, device: str = "cpu") -> float:
    """1-NN accuracy of ``query_rows`` against a labelled database, scored against the given query labels."""
    index = KNNIndex(embeddings[np.asarray(database_rows)], np.asarray(database_labels), device=device)
    pred, _ = index.predict(embeddings[np.asarray(query_rows)], k=1)
    return float((pred == np.asarray(query_labels)).mean())


def corrupted_test_accuracy(embeddings: np.ndarray, cars: CarsDataset, database_rows, *, column: str | None = None,
                            device: str = "cpu") -> dict[str, float]:
    """What a test-set accuracy looks like when the test labels come from the unlabelled test file.

    Queries: the official test images; database: ``database_rows`` with their true class ids (1-based, as in
    the devkit). The prediction (the nearest database image's class id) is scored against the true class and
    against the corrupted label (:func:`unlabelled_test_file_labels`, the devkit's 1-based ``bbox_y2``).
    Also returned: ``oracle_corrupted`` (a perfect classifier scored against the corrupted labels),
    ``chance_corrupted`` (the expected score of a uniformly random class id in 1..C) and the number of test
    images and distinct corrupted labels.
    """
    t = cars.table
    test = np.flatnonzero((t["split"] == "test").to_numpy())
    if len(test) == 0:
        raise ValueError("this dataset has no official test images")
    class_id = t["class_id"].to_numpy()
    corrupted = unlabelled_test_file_labels(t, test, column=column)
    db = np.asarray(database_rows)
    true_acc = accuracy_against_labels(embeddings, db, class_id[db], test, class_id[test], device=device)
    bad_acc = accuracy_against_labels(embeddings, db, class_id[db], test, corrupted, device=device)
    c = cars.num_classes
    return {
        "test_images": int(len(test)),
        "pseudo_classes": int(len(np.unique(corrupted))),
        "accuracy_true_labels": true_acc,
        "accuracy_corrupted_labels": bad_acc,
        "oracle_corrupted": float((corrupted == class_id[test]).mean()),
        "chance_corrupted": float(((corrupted >= 1) & (corrupted <= c)).mean() / c),
    }


# ==================================================================================================
# Batches
# ==================================================================================================

def positive_coverage(labels, batch_size: int, sampler: str = "m_per_class", m_per_class: int = 4, *,
                      epochs: int = 1, seed: int = 0) -> float:
    """Fraction of anchors that have at least one positive (same label) in their batch.

    Batches are drawn exactly as :func:`vericar.train.train` draws them (its ``epoch_batches``: plain shuffling or
    ``MPerClassSampler``), over ``epochs`` epochs. An anchor without a positive contributes only the negative
    term of the MS loss: nothing pulls it towards its class.
    """
    from ..config import TrainConfig
    from ..train import epoch_batches

    labels = np.asarray(labels, dtype=np.int64)
    config = TrainConfig(batch_size=batch_size, sampler=sampler, m_per_class=m_per_class, seed=seed)
    covered = total = 0
    for epoch in range(epochs):
        for positions in epoch_batches(labels, config, epoch):
            y = labels[positions]
            _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
            covered += int((counts[inverse] > 1).sum())
            total += len(y)
    return covered / total if total else float("nan")


def real_batch(cars: CarsDataset, rows, spec, image_size: int, *, n_classes: int = 8, m_per_class: int = 4,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A class-balanced batch of real images: ``(images, labels, rows)``.

    ``n_classes`` classes (drawn with ``seed`` among those with at least ``m_per_class`` images in ``rows``),
    ``m_per_class`` images each, decoded at ``image_size`` and normalised for the backbone ``spec`` (eval
    transform: resize, no augmentation). ``labels`` are 0-based class indices.
    """
    from ..embed import decode_images, normalize

    rows = np.asarray(rows, dtype=np.int64)
    labels = cars.labels[rows]
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= m_per_class]
    if len(eligible) < 2:
        raise ValueError(f"need at least 2 classes with {m_per_class} images among the rows given")
    chosen = rng.choice(eligible, size=min(n_classes, len(eligible)), replace=False)
    picked = np.concatenate([rng.choice(rows[labels == c], size=m_per_class, replace=False) for c in chosen])
    images = normalize(decode_images(cars, picked, image_size, spec.interpolation, progress=False), spec)
    return images, torch.from_numpy(cars.labels[picked]), picked


@dataclass
class BatchGradientCheck:
    """What :func:`batch_gradient_check` measured: the report and what it was measured on."""

    report: pd.DataFrame
    rows: np.ndarray  # the batch's dataset rows
    labels: np.ndarray
    backbone_parameters: int
    head_parameters: int


def batch_gradient_check(cars: CarsDataset, rows, *, backbone: str, embedding_dim: int, image_size: int,
                         n_classes: int = 8, m_per_class: int = 4, seed: int = 0, device="cpu",
                         variants: Iterable[str] | None = None) -> BatchGradientCheck:
    """Notebook 02's one-batch check: what every accumulation variant sends back into a pretrained model.

    The model (``backbone`` pretrained, a fresh head) is built under ``seed`` in a forked RNG, so the head's
    initial weights, and with them every number of the report, depend on ``seed`` only, not on whatever drew
    from torch's global generator before (the global state is left as it was). The batch is
    :func:`real_batch`'s; the report is :func:`.seed_losses.gradient_report`'s with :func:`gradient_verdicts`.
    """
    from ..models import build_model
    from .seed_losses import gradient_report

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(backbone, embedding_dim, pretrained=True).to(device)
    images, labels, batch_rows = real_batch(cars, rows, model.spec, image_size, n_classes=n_classes,
                                            m_per_class=m_per_class, seed=seed)
    report = gradient_verdicts(gradient_report(model, images.to(device), labels.to(device),
                                               variants=list(variants or ACCUMULATION_VARIANTS)))
    report["expected"] = [None if r == "reference" else expected_gradient_verdict(v)
                          for v, r in zip(report["variant"], report["role"])]
    return BatchGradientCheck(report, batch_rows, labels.numpy(), sum(p.numel() for p in model.backbone.parameters()),
                              sum(p.numel() for p in model.head.parameters()))


def class_subset(cars: CarsDataset, n_classes: int | None, *, seed: int = 0) -> CarsDataset:
    """``cars`` restricted to ``n_classes`` classes drawn with ``seed`` (all of them if None or too many).

    Keeps the class table (ids and hierarchy unchanged), so labels mean the same; row indices are new.
    Used to make a CPU fine-tune small.
    """
    if n_classes is None or n_classes >= cars.num_classes:
        return cars
    present = np.unique(cars.table["class_id"].to_numpy())
    chosen = np.sort(np.random.default_rng(seed).choice(present, size=min(n_classes, len(present)), replace=False))
    table = cars.table[cars.table["class_id"].isin(chosen)].reset_index(drop=True)
    return CarsDataset(root=cars.root, table=table, class_names=list(cars.class_names),
                       name=f"{cars.name} ({len(chosen)} classes)", layout=cars.layout, crop_to_bbox=cars.crop_to_bbox)


# ==================================================================================================
# The comparison grid
# ==================================================================================================

@dataclass
class Variant:
    """One training run of the comparison: the base config plus ``overrides`` (and maybe corrupted labels).

    ``reference`` names the variant it is judged against; ``kind`` is ``"cached"`` (the cheap partial mode)
    or ``"finetune"`` (the small end-to-end fine-tune); ``affects`` is ``"training"`` or ``"evaluation"``.
    """

    name: str
    group: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    corrupt_labels: bool = False
    kind: str = "cached"
    reference: str = "ms"
    affects: str = "training"

    @property
    def folder_name(self) -> str:
        return self.name.replace(":", "_").replace("/", "_")


def comparison_variants(accumulation: Iterable[str] | None = None,
                        suspects: Iterable[str] = tuple(SUSPECTS)) -> list[Variant]:
    """The grid: the pml MS reference, the accumulation variants, then the other suspects.

    ``accumulation``: names from :data:`.seed_losses.ACCUMULATION_VARIANTS` (default all), each trained as
    ``loss="ms_accum:<name>"`` (variant name ``"accum:<name>"``). ``suspects``: names from :data:`SUSPECTS`;
    ``"eval_augment"`` adds two fine-tune runs, ``"finetune"`` (eval transforms, its reference) and
    ``"finetune_eval_augment"``.
    """
    accumulation = list(ACCUMULATION_VARIANTS) if accumulation is None else list(accumulation)
    suspects = list(suspects)
    unknown = [a for a in accumulation if a not in ACCUMULATION_VARIANTS]
    unknown += [s for s in suspects if s not in SUSPECTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; accumulation: {', '.join(ACCUMULATION_VARIANTS)}; "
                         f"suspects: {', '.join(SUSPECTS)}")
    out = [Variant("ms", "reference", "pml MultiSimilarityMiner + MultiSimilarityLoss, class-balanced batches",
                   reference="ms")]
    out += [Variant(f"accum:{a}", "loss accumulation", ACCUMULATION_VARIANTS[a], {"loss": f"ms_accum:{a}"})
            for a in accumulation]
    for s in suspects:
        if s == "shuffle":
            out.append(Variant("shuffle", "batches", SUSPECTS[s], {"sampler": "shuffle"}))
        elif s == "corrupt_labels":
            out.append(Variant("corrupt_labels", "labels", SUSPECTS[s], corrupt_labels=True))
        elif s in ("seed_hier_clamp", "hims_min"):
            out.append(Variant(s, "hierarchical loss", SUSPECTS[s], {"loss": s}))
        elif s == "eval_augment":
            out.append(Variant("finetune", "evaluation", "small fine-tune, evaluated with eval transforms",
                               {"eval_augment": False}, kind="finetune", reference="finetune"))
            out.append(Variant("finetune_eval_augment", "evaluation", SUSPECTS[s], {"eval_augment": True},
                               kind="finetune", reference="finetune", affects="evaluation"))
    return out


@dataclass
class Comparison:
    """The trained grid: ``runs`` (variant name -> TrainedRun, or None when training raised) and ``errors``."""

    variants: list[Variant]
    runs: dict[str, Any]
    errors: dict[str, str]
    folders: dict[str, Path]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def histories(self) -> pd.DataFrame:
        """Per-epoch history of every run that trained, long format with ``variant`` and ``group`` columns."""
        frames = []
        for v in self.variants:
            run = self.runs.get(v.name)
            if run is None or len(run.history) == 0:
                continue
            frames.append(run.history.assign(variant=v.name, group=v.group))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["variant", "group", "epoch"])

    def final(self) -> pd.DataFrame:
        """One row per variant: final and frozen metrics, loss at the first and last epoch, time, error."""
        rows = []
        for v in self.variants:
            run = self.runs.get(v.name)
            row: dict[str, Any] = {"variant": v.name, "group": v.group, "reference": v.reference, "kind": v.kind,
                                   "affects": v.affects, "description": v.description,
                                   "error": self.errors.get(v.name)}
            if run is not None:
                m, h = run.metrics, run.history
                row.update(precision_at_1=m["trained"]["precision_at_1"], map_at_r=m["trained"]["map_at_r"],
                           frozen_precision_at_1=m["frozen"]["precision_at_1"], n_query=len(run.split.query),
                           loss_first=float(h["loss"].iloc[0]), loss_last=float(h["loss"].iloc[-1]),
                           epochs=len(h), train_seconds=m["train_seconds"])
                row["loss_change"] = (row["loss_last"] - row["loss_first"]) / abs(row["loss_first"]) \
                    if row["loss_first"] else float("nan")
            rows.append(row)
        cols = ["variant", "group", "reference", "kind", "affects", "precision_at_1", "map_at_r",
                "frozen_precision_at_1", "n_query", "loss_first", "loss_last", "loss_change", "epochs",
                "train_seconds", "error", "description"]
        return pd.DataFrame(rows).reindex(columns=cols)


def run_comparison(cars: CarsDataset, variants: Sequence[Variant], base: "TrainConfig", run_dir, *,
                   finetune_base=None, finetune_cars: CarsDataset | None = None, split: Split | None = None,
                   finetune_split: Split | None = None, corrupt_mode: str = "value", prefix: str = "02_",
                   progress: bool = False, cache_dir=None) -> Comparison:
    """Train every variant into ``<run_dir>/models/<prefix><variant>`` (finished folders are loaded, not retrained).

    ``base`` (a :class:`vericar.config.TrainConfig`) is the config of the ``"cached"`` variants and
    ``finetune_base`` that of the ``"finetune"`` ones, on ``finetune_cars`` (default ``cars``); each variant
    applies its ``overrides``. Corrupted-label variants pass :func:`unlabelled_test_file_labels` of the
    training rows as ``train_labels``. A run that raises (``accum:inplace_leaf`` does, at its first step) is
    recorded in ``errors`` with PyTorch's message; the others go on.
    """
    from ..runs import split_for
    from ..train import DEFAULT_CACHE, train

    run_dir = Path(run_dir)
    runs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    folders: dict[str, Path] = {}
    for v in variants:
        if v.kind == "finetune":
            if finetune_base is None:
                raise ValueError(f"variant {v.name!r} is a fine-tune; pass finetune_base=")
            data = finetune_cars if finetune_cars is not None else cars
            config = dataclasses.replace(finetune_base, **v.overrides)
            this_split = finetune_split
        else:
            data, config, this_split = cars, dataclasses.replace(base, **v.overrides), split
        this_split = this_split if this_split is not None else split_for(data, config)
        labels = (unlabelled_test_file_labels(data.table, this_split.train, mode=corrupt_mode,
                                              num_classes=data.num_classes)
                  if v.corrupt_labels else None)
        suffix = f"_{corrupt_mode}" if v.corrupt_labels and corrupt_mode != "value" else ""
        folder = run_dir / "models" / f"{prefix}{v.folder_name}{suffix}"
        folders[v.name] = folder
        try:
            runs[v.name] = train(data, config, folder, split=this_split, train_labels=labels, progress=progress,
                                 cache_dir=cache_dir if cache_dir is not None else DEFAULT_CACHE)
        except RuntimeError as err:
            runs[v.name] = None
            errors[v.name] = f"{type(err).__name__}: {err}"
    return Comparison(list(variants), runs, errors, folders)


# ==================================================================================================
# Verdicts
# ==================================================================================================

VERDICTS = ("raises", "breaks learning", "slows learning", "no change", "better", "inconclusive",
            "lowers measured accuracy", "raises measured accuracy")


def _ci(p: float, n: int) -> tuple[float, float]:
    return wilson_interval(int(round(p * n)), int(n))


def classify_outcomes(final: pd.DataFrame, histories: pd.DataFrame | None = None, *,
                      break_fraction: float = 0.25, slow_epochs: int = 2) -> pd.DataFrame:
    """Add ``verdict`` and ``reason`` to :meth:`Comparison.final`'s table, judging each run against its reference.

    With ``p`` the final P@1, ``p_ref`` the reference's, ``[lo, hi]`` the reference's 95% Wilson interval (its
    queries) and ``gain = p - frozen`` (the frozen-backbone P@1 of the same run):

    * ``raises``: training raised.
    * ``inconclusive``: the reference itself gained no more than its interval's half-width over the frozen
      backbone, so there is no learning to break.
    * ``breaks learning``: ``gain < break_fraction * gain_ref`` (keeps less than a quarter of what the
      reference learned, by default; a loss with no gradient keeps none).
    * ``slows learning``: ``p < lo`` (but keeps more than that), or ``p`` within the interval but reaching
      ``lo`` at least ``slow_epochs`` epochs after the reference (needs ``histories``).
    * ``better``: ``p > hi``; ``no change``: otherwise.

    Variants that affect only evaluation (``affects == "evaluation"``: same training, another measurement)
    get ``lowers measured accuracy`` / ``raises measured accuracy`` / ``no change`` by the same interval.
    """
    out = final.copy()
    by_name = out.set_index("variant")
    verdicts, reasons = [], []
    for _, row in out.iterrows():
        if isinstance(row.get("error"), str) and row["error"]:
            verdicts.append("raises")
            reasons.append(row["error"].splitlines()[0])
            continue
        ref_name = row["reference"]
        if ref_name not in by_name.index or pd.isna(by_name.loc[ref_name, "precision_at_1"]):
            verdicts.append("inconclusive")
            reasons.append(f"no result for the reference {ref_name!r}")
            continue
        ref = by_name.loc[ref_name]
        p, p_ref, n = float(row["precision_at_1"]), float(ref["precision_at_1"]), int(ref["n_query"])
        lo, hi = _ci(p_ref, n)
        ci_text = f"reference {ref_name} {p_ref:.3f} [{lo:.3f}, {hi:.3f}]"
        if row["variant"] == ref_name:
            verdicts.append("reference")
            reasons.append(f"P@1 {p:.3f} (frozen backbone {row['frozen_precision_at_1']:.3f})")
            continue
        if row.get("affects") == "evaluation":
            v = "lowers measured accuracy" if p < lo else "raises measured accuracy" if p > hi else "no change"
            verdicts.append(v)
            reasons.append(f"P@1 {p:.3f} vs {ci_text}; same training, other evaluation")
            continue
        gain, gain_ref = p - float(row["frozen_precision_at_1"]), p_ref - float(ref["frozen_precision_at_1"])
        if gain_ref <= (hi - lo) / 2:
            verdicts.append("inconclusive")
            reasons.append(f"the reference gained only {gain_ref:+.3f} over its frozen backbone")
            continue
        if gain < break_fraction * gain_ref:
            verdicts.append("breaks learning")
            reasons.append(f"P@1 {p:.3f}, {gain:+.3f} over its frozen backbone where the reference gained "
                           f"{gain_ref:+.3f} ({ci_text})")
            continue
        if p < lo:
            verdicts.append("slows learning")
            reasons.append(f"P@1 {p:.3f} below {ci_text}; {gain:+.3f} over its frozen backbone where the "
                           f"reference gained {gain_ref:+.3f}")
            continue
        if p > hi:
            verdicts.append("better")
            reasons.append(f"P@1 {p:.3f} above {ci_text}")
            continue
        late = _epochs_late(histories, row["variant"], ref_name, lo) if histories is not None else None
        if late is not None and late >= slow_epochs:
            verdicts.append("slows learning")
            reasons.append(f"P@1 {p:.3f} within {ci_text}, but reaches {lo:.3f} {late} epochs later")
            continue
        verdicts.append("no change")
        reasons.append(f"P@1 {p:.3f} within {ci_text}")
    out["verdict"] = verdicts
    out["reason"] = reasons
    return out


def _first_epoch_at(h: pd.DataFrame, level: float) -> float:
    h = h[h["precision_at_1"].notna()]
    hit = h.loc[h["precision_at_1"] >= level, "epoch"]
    return float(hit.iloc[0]) if len(hit) else math.inf


def _epochs_late(histories: pd.DataFrame, name: str, ref: str, level: float) -> int | None:
    if histories is None or "precision_at_1" not in histories:
        return None
    mine, theirs = histories[histories["variant"] == name], histories[histories["variant"] == ref]
    if len(mine) == 0 or len(theirs) == 0:
        return None
    a, b = _first_epoch_at(mine, level), _first_epoch_at(theirs, level)
    if math.isinf(b):
        return None
    return int(a - b) if not math.isinf(a) else 10**6


def verdict_groups(outcomes: pd.DataFrame) -> dict[str, list[str]]:
    """Verdict -> variant names, in the grid's order (the reference left out)."""
    groups: dict[str, list[str]] = {}
    for _, row in outcomes.iterrows():
        if row["verdict"] != "reference":
            groups.setdefault(row["verdict"], []).append(row["variant"])
    return groups


def expected_gradient_verdict(variant: str) -> str:
    """What :mod:`.seed_losses` establishes for an accumulation variant (its tests): the notebook's claim."""
    if variant in GRAPH_PRESERVING_VARIANTS:
        return "same gradient as pml"
    if variant in GRAPH_CUTTING_VARIANTS:
        return "no gradient reaches the model"
    if variant in RAISING_VARIANTS:
        return "raises"
    raise ValueError(f"unknown accumulation variant {variant!r}")


def gradient_verdicts(report: pd.DataFrame, *, rtol: float = 1e-3) -> pd.DataFrame:
    """Classify each row of :func:`.seed_losses.gradient_report` from its measured numbers.

    ``raises`` (an error), ``no gradient reaches the model`` (neither backbone nor head gets a non-zero
    gradient), ``same gradient as pml`` (cosine with the reference > 1 - rtol and relative difference < rtol
    over all parameters, and the same loss value to rtol), ``different gradient`` otherwise; the reference row
    gets ``reference``. Adds ``verdict`` and ``loss_matches`` (the loss value equals the reference's).
    """
    out = report.copy()
    ref_loss = float(out.loc[out["role"] == "reference", "loss"].iloc[0])
    verdicts, matches = [], []
    for _, r in out.iterrows():
        same_loss = bool(np.isfinite(r["loss"]) and abs(r["loss"] - ref_loss) <= rtol * max(abs(ref_loss), 1e-12))
        matches.append(same_loss)
        if r["role"] == "reference":
            verdicts.append("reference")
        elif r["error"]:
            verdicts.append("raises")
        elif not (r["reaches_backbone"] or r["reaches_head"]):
            verdicts.append("no gradient reaches the model")
        elif r["cos_all"] > 1 - rtol and r["rel_diff_all"] < rtol and same_loss:
            verdicts.append("same gradient as pml")
        else:
            verdicts.append("different gradient")
    out["verdict"] = verdicts
    out["loss_matches"] = matches
    return out


# ==================================================================================================
# The notebook's tables, sentences and results entries (notebook 02 shows what these build)
# ==================================================================================================


def gradient_check_lines(report: pd.DataFrame) -> list[str]:
    """One line per accumulation variant of the one-batch check (:func:`gradient_verdicts` with an ``expected``
    column), then whether the measured verdicts agree with :func:`expected_gradient_verdict`, then the write-up's
    "wrong" loop in words when it was checked."""
    ref = report.set_index("variant").loc["ms"]
    lines = []
    for _, r in report[report["role"] == "variant"].iterrows():
        detail = (r["error"] if r["verdict"] == "raises" else
                  f"loss {r['loss']:.4f} (pml {ref['loss']:.4f}), gradient norm backbone {r['grad_norm_backbone']:.3g} / "
                  f"head {r['grad_norm_head']:.3g} (pml {ref['grad_norm_backbone']:.3g} / {ref['grad_norm_head']:.3g})")
        lines.append(f"{r['variant']:>18}: {r['verdict']:<30} {detail}")
    mismatch = report[(report["role"] == "variant") & (report["verdict"] != report["expected"])]
    lines.append("\nagrees with vericar.analyses.seed_losses' tested classification: "
                 + ("yes" if mismatch.empty else f"NO for {list(mismatch['variant'])}"))
    if "writeup_wrong_loop" in set(report["variant"]):
        wl = report.set_index("variant").loc["writeup_wrong_loop"]
        lines.append(f"The write-up's 'wrong' loop (loss = loss + sample_loss): {wl['verdict']}; cosine with pml's "
                     f"gradient {wl['cos_all']:.6f}, relative difference {wl['rel_diff_all']:.1e}.")
    return lines


@dataclass
class LabelCorruption:
    """What the unlabelled test file's labels do to a dataset (:func:`label_corruption_study`).

    ``table``: :func:`label_corruption_summary` per set (the official test set when there is one, then the
    training rows); ``train_corrupt``: the corrupted labels of the training rows (what ``corrupt_labels`` trains
    on); ``test_rows``; ``figure_true`` / ``figure_corrupt`` / ``figure_set``: what the figure compares (the test
    set, else the training rows); ``text``: the measurements in words.
    """

    table: pd.DataFrame
    train_corrupt: np.ndarray
    test_rows: np.ndarray
    figure_true: np.ndarray
    figure_corrupt: np.ndarray
    figure_set: str
    text: str


def label_corruption_study(cars: CarsDataset, train_rows, *, protocol: str, mode: str = "value") -> LabelCorruption:
    """Read the labels as the seed did (:func:`unlabelled_test_file_labels`) on the official test set (when the
    dataset has one) and on ``train_rows``, and summarise how much class information survives."""
    t = cars.table
    test_rows = np.flatnonzero((t["split"] == "test").to_numpy())
    summaries, lines = {}, []
    test_corrupt = unlabelled_test_file_labels(t, test_rows) if len(test_rows) else None
    if len(test_rows):
        s = summaries["official test set"] = label_corruption_summary(cars.labels[test_rows], test_corrupt)
        lines.append(f"Read this way, the {s['images']:,} test images fall into {s['pseudo_classes']:,} 'classes' "
                     f"(true: {s['true_classes']}); the write-up reported 1,103 on Stanford Cars.")
    train_rows = np.asarray(train_rows)
    train_corrupt = unlabelled_test_file_labels(t, train_rows, mode=mode, num_classes=cars.num_classes)
    s = summaries[f"{protocol} training rows"] = label_corruption_summary(cars.labels[train_rows], train_corrupt)
    lines.append(f"On the training rows, of the image pairs that share a corrupted label only {s['pair_precision']:.1%} "
                 f"share the true class (random pairs: {s['chance_pair_precision']:.1%}); {s['singleton_fraction']:.0%} "
                 "of the images are alone in their pseudo-class.")
    if len(test_rows):
        fig_true, fig_corrupt, fig_set = cars.labels[test_rows], test_corrupt, "test set"
    else:
        fig_true, fig_corrupt, fig_set = cars.labels[train_rows], train_corrupt, "training rows"
    return LabelCorruption(pd.DataFrame(summaries).T, train_corrupt, test_rows, fig_true, fig_corrupt, fig_set,
                           "\n".join(lines))


def coverage_table(true_labels, corrupted_labels, batch_size: int, m_per_class: int, *, seed: int = 0) -> pd.DataFrame:
    """Fraction of anchors with at least one positive in the batch (:func:`positive_coverage`), for the
    class-balanced sampler and plain shuffling (columns) on the true and the corrupted labels (rows)."""
    labels = {"true labels": true_labels, "corrupted labels": corrupted_labels}
    return pd.DataFrame({
        "m_per_class": {k: positive_coverage(y, batch_size, "m_per_class", m_per_class, seed=seed) for k, y in labels.items()},
        "shuffle": {k: positive_coverage(y, batch_size, "shuffle", seed=seed) for k, y in labels.items()},
    })


def expected_shuffle_coverage(n_classes: int, batch_size: int) -> float:
    """Chance that an anchor has a positive in a shuffled batch from ``n_classes`` equal classes:
    ``1 - (1 - 1/C)^(B-1)`` (196 classes, batch 64: 27%)."""
    return 1 - (1 - 1 / n_classes) ** (batch_size - 1)


def variants_table(variants: Sequence[Variant]) -> pd.DataFrame:
    """The grid in a table: name, group, kind, what it changes against the reference, description."""
    return pd.DataFrame([{"variant": v.name, "group": v.group, "kind": v.kind,
                          "changes": v.overrides or ("train_labels = bbox_y2" if v.corrupt_labels else "-"),
                          "description": v.description} for v in variants])


def comparison_lines(comparison: Comparison, outcomes: pd.DataFrame, finetune_cars: CarsDataset | None) -> list[str]:
    """What the grid trained, in words: the fine-tune's own gain (when it ran), runs, seconds, raised variants."""
    lines = []
    if finetune_cars is not None and comparison.runs.get("finetune") is not None:
        m = comparison.runs["finetune"].metrics
        lines.append(f"fine-tune data: {finetune_cars}; fine-tuned P@1 {m['trained']['precision_at_1']:.3f} vs its frozen "
                     f"backbone {m['frozen']['precision_at_1']:.3f} (the comparison is between two measurements of the "
                     "same weights)")
    lines.append(f"trained {sum(r is not None for r in comparison.runs.values())} runs "
                 f"({sum(outcomes['train_seconds'].fillna(0)):.0f} s of training); raised: {list(comparison.errors) or 'none'}")
    return lines


def corrupted_scores_text(scores: dict[str, float] | None) -> str:
    """Part 5 in words: the reference model scored against the true and the corrupted test labels."""
    if scores is None:
        return "no official test images in this dataset: skipped"
    return (f"Scored against the true labels the reference model gets {scores['accuracy_true_labels']:.1%} on the "
            f"{scores['test_images']:,} test images; against labels read from the unlabelled file it gets "
            f"{scores['accuracy_corrupted_labels']:.2%}. Against those labels a perfect classifier would get "
            f"{scores['oracle_corrupted']:.2%} and a random one {scores['chance_corrupted']:.2%}.")


_VERDICT_ORDER = ("breaks learning", "slows learning", "no change", "better", "lowers measured accuracy",
                  "raises measured accuracy", "raises", "inconclusive")


def conclusion_lines(outcomes: pd.DataFrame, report: pd.DataFrame, histories: pd.DataFrame | None,
                     scores: dict[str, float] | None, *, data_name: str, protocol: str, epochs: int) -> list[str]:
    """The notebook's conclusions, each a measurement: the reference, the variants grouped by verdict, then the
    write-up's diagnosis (one-batch gradient and training of its "wrong" loop), the accumulations that really cut
    the graph, the corrupted labels and the other suspects."""
    groups, o = verdict_groups(outcomes), outcomes.set_index("variant")
    lines = [f"Reference (pml MS, class-balanced batches, true labels): P@1 {o.loc['ms', 'precision_at_1']:.3f} after "
             f"{epochs} epochs (frozen backbone {o.loc['ms', 'frozen_precision_at_1']:.3f}); {data_name}, protocol {protocol}.\n"]
    for verdict in (v for v in _VERDICT_ORDER if v in groups):
        names = ", ".join(f"{n} ({o.loc[n, 'precision_at_1']:.3f})" if pd.notna(o.loc[n, "precision_at_1"]) else n
                          for n in groups[verdict])
        lines.append(f"- {verdict.upper()}: {names}")
    lines.append("\nThe write-up's diagnosis:")
    grad = report.set_index("variant")
    if "writeup_wrong_loop" in grad.index:
        wl = grad.loc["writeup_wrong_loop"]
        wt = o.loc["accum:writeup_wrong_loop"] if "accum:writeup_wrong_loop" in o.index else None
        same = wl["verdict"] == "same gradient as pml"
        lines.append(f"- 'loss = loss + sample_loss severs the graph': {'does NOT hold' if same else 'holds'} here. On one "
                     f"real batch its gradient is {wl['verdict']} (cosine {wl['cos_all']:.6f})"
                     + (f"; trained, it reaches P@1 {wt['precision_at_1']:.3f} ({wt['verdict']})."
                        if wt is not None and pd.notna(wt["precision_at_1"]) else "."))
    cut = [n for n in o.index if n.startswith("accum:") and n.split(":", 1)[1] in GRAPH_CUTTING_VARIANTS]
    if cut:
        ref_change = o.loc["ms", "loss_change"]
        changes = ", ".join(f"{n} {o.loc[n, 'verdict']}, loss {o.loc[n, 'loss_change']:+.1%}" for n in cut)
        flat = all(abs(o.loc[n, "loss_change"]) < 0.25 * abs(ref_change) for n in cut)
        lines.append(f"- The accumulations that really cut the graph: {changes} from the first to the last epoch "
                     f"(reference {ref_change:+.1%}). Their loss {'stays flat' if flat else 'also moves'}"
                     + (": 'stuck while the loss decreased' is not what a cut graph looks like." if flat else "."))
    if "accum:inplace_leaf" in o.index:
        lines.append("- In-place accumulation on a leaf that requires grad does not train silently: "
                     f"{o.loc['accum:inplace_leaf', 'verdict']}.")
    if scores is not None:
        lines.append(f"- Labels read from the unlabelled test file: {scores['pseudo_classes']:,} pseudo-classes on the test "
                     f"set; a correctly trained model scores {scores['accuracy_corrupted_labels']:.2%} against them "
                     f"({scores['accuracy_true_labels']:.1%} against the true labels), a perfect one "
                     f"{scores['oracle_corrupted']:.2%}. A near-zero test accuracy while the loss decreases is what these "
                     "labels produce, whatever the loss code.")
    if "corrupt_labels" in o.index and pd.notna(o.loc["corrupt_labels", "precision_at_1"]):
        c = o.loc["corrupt_labels"]
        lines.append(f"- Training on those labels: {c['verdict']} (P@1 {c['precision_at_1']:.3f}, frozen backbone "
                     f"{c['frozen_precision_at_1']:.3f}) while its training loss went "
                     f"{'down' if c['loss_change'] < 0 else 'up'} by {abs(c['loss_change']):.0%}.")
    for name, what in (("shuffle", "Plain shuffled batches"), ("seed_hier_clamp", "The seed's hierarchical clamp"),
                       ("hims_min", "HiMS-Min"), ("finetune_eval_augment", "Evaluating with the training augmentation")):
        if name in o.index:
            lines.append(f"- {what}: {o.loc[name, 'verdict']} ({o.loc[name, 'reason']}).")
    if histories is not None and "finetune_eval_augment" in o.index and "finetune" in o.index:
        h = histories
        same_training = np.allclose(h.loc[h["variant"] == "finetune", "loss"].to_numpy(),
                                    h.loc[h["variant"] == "finetune_eval_augment", "loss"].to_numpy())
        lines.append(f"  (its training losses equal the plain fine-tune's epoch by epoch: {same_training}; only the "
                     "measurement differs.)")
    return lines


def gradient_bug_entries(outcomes: pd.DataFrame, comparison: Comparison, report: pd.DataFrame, *, base: "TrainConfig",
                         finetune_base: "TrainConfig | None", cars: CarsDataset, finetune_cars: CarsDataset | None,
                         dataset: str, device: str, data_dir, scores: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The results entries of notebook 02: one per variant of the grid (final metrics, verdict and reason, the
    one-batch gradient numbers on the accumulation variants, ``n_queries`` and the reference-free 95% Wilson
    interval of its P@1 as ``precision_at_1_ci``), then the corrupted-test-label scores of the reference model
    (variant ``corrupted_test_labels``) when ``scores`` are given."""
    grad = report.set_index("variant")
    entries = []
    for _, r in outcomes.iterrows():
        v = comparison.variant(r["variant"])
        run = comparison.runs.get(v.name)
        cfg = run.config if run is not None else (finetune_base if v.kind == "finetune" else base)
        metrics = {k: r[k] for k in ("precision_at_1", "map_at_r", "frozen_precision_at_1", "loss_first", "loss_last",
                                     "train_seconds") if pd.notna(r[k])}
        ci = None
        if run is not None:
            metrics.update({k: val for k, val in run.metrics["trained"].items() if k.startswith("accuracy_")})
            metrics["images_per_second"] = run.metrics["images_per_second"]
            metrics["n_queries"] = int(r["n_query"])
            ci = list(_ci(float(r["precision_at_1"]), int(r["n_query"])))
        acc = v.name.split(":", 1)[1] if v.name.startswith("accum:") else ("ms" if v.name == "ms" else None)
        if acc in grad.index:
            g = grad.loc[acc]
            metrics.update({"grad_norm_backbone": g["grad_norm_backbone"], "grad_norm_head": g["grad_norm_head"],
                            "grad_cosine_with_pml": g["cos_all"], "batch_loss": g["loss"]})
        entries.append(results_entry(
            dataset=dataset, protocol=cfg.protocol, backbone=cfg.backbone, image_size=cfg.image_size,
            device=run.metrics["device"] if run is not None else str(device), metrics=metrics,
            variant=v.name, group=v.group, description=v.description, verdict=r["verdict"], reason=r["reason"],
            error=r["error"] if isinstance(r["error"], str) else None, precision_at_1_ci=ci,
            gradient_verdict=grad.loc[acc, "verdict"] if acc in grad.index else None, mode=cfg.describe(),
            epochs=cfg.epochs, batch_size=cfg.batch_size, sampler=cfg.sampler, loss=cfg.loss,
            classes=int(len(np.unique((finetune_cars if v.kind == "finetune" else cars).labels))),
            run_folder=str(comparison.folders[v.name]), data_dir=str(data_dir)))
    ref_run = comparison.runs.get("ms")
    if scores is not None and ref_run is not None:
        entries.append(results_entry(dataset=dataset, protocol="official", backbone=base.backbone,
                                     image_size=base.image_size, device=ref_run.metrics["device"], metrics=scores,
                                     variant="corrupted_test_labels",
                                     description="reference model's 1-NN predictions on the official test set scored "
                                                 "against labels read from the unlabelled test file (bbox_y2)"))
    return entries
