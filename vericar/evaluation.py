"""Evaluate embeddings on a split protocol: retrieval metrics and per-level accuracy from the same neighbours."""

from __future__ import annotations

import numpy as np

from .data.dataset import CarsDataset
from .data.splits import Split
from .metrics import level_accuracy, retrieval_metrics
from .retrieval import KNNIndex, hierarchical_predict


def evaluate_embeddings(embeddings: np.ndarray, cars: CarsDataset, split: Split, *, k: int = 1,
                        levels: bool = True, device: str = "cpu") -> dict[str, float]:
    """Metrics of ``embeddings`` (one row per image of ``cars``) on ``split``'s queries against its database.

    ``precision_at_1`` / ``map_at_r`` / ``r_precision`` come from pytorch-metric-learning's AccuracyCalculator
    and ``recall_at_k`` from the same neighbour lists (:func:`vericar.metrics.retrieval_metrics`);
    ``accuracy_make`` ... ``accuracy_year`` from a ``k``-NN vote at each level
    (``k=1``: the nearest neighbour's labels). ``zero-shot`` is leave-one-out within its query set.
    """
    labels = cars.labels
    q, db = embeddings[split.query], embeddings[split.database]
    if split.leave_one_out:
        out = retrieval_metrics(q, labels[split.query])
    else:
        out = retrieval_metrics(q, labels[split.query], db, labels[split.database])
    if levels:
        index = KNNIndex(db, labels[split.database], device=device)
        distances, neighbours = index.search(q, k, exclude_self=split.leave_one_out)
        pred = hierarchical_predict(index.labels[neighbours], distances, cars.hierarchy)
        out.update(level_accuracy(pred, labels[split.query], cars.hierarchy))
    return out
