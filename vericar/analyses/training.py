"""Notebook 03: the per-protocol tables of the trained runs and the results entries they are published as.

A "run" here is anything with ``config`` (a :class:`vericar.config.TrainConfig`), ``metrics`` (the dict
:func:`vericar.train.train` stores: ``frozen`` and ``trained`` metric dicts, ``train_seconds``,
``images_per_second``, ``device``, optionally ``peak_memory_gib``) and ``path``, as a
:class:`vericar.runs.TrainedRun` has.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from vericar.results import results_entry

#: The retrieval and attribute metrics notebook 03 shows per protocol and stage.
TABLE_METRICS = ("precision_at_1", "recall_at_5", "map_at_r", "accuracy_make", "accuracy_type", "accuracy_model")


def frozen_vs_trained_table(runs: Mapping[str, Any]) -> pd.DataFrame:
    """One row per protocol and stage (``frozen`` backbone before training, then ``trained``), with every metric.

    ``runs`` maps a protocol to its run. Columns: ``protocol``, ``stage`` and the metrics of that stage, in the
    order of ``runs`` (frozen first), so the table can be indexed by ``["protocol", "stage"]`` directly and fed
    to :func:`vericar.plots.frozen_vs_trained_figure`.
    """
    rows = [{"protocol": protocol, "stage": stage, **run.metrics[stage]}
            for protocol, run in runs.items() for stage in ("frozen", "trained")]
    return pd.DataFrame(rows)


def training_entries(runs: Mapping[str, Any], dataset: str, data_dir: str) -> list[dict[str, Any]]:
    """The results entries of notebook 03 (``results/03_training.json``), one per protocol.

    Each entry's ``metrics`` are the trained model's metrics plus ``train_seconds`` and ``images_per_second``;
    ``frozen_metrics`` are the frozen backbone's, measured the same way (the baseline every gain is measured
    against); the rest labels the recipe (mode, epochs, batch, loss, ...) and where the run lies.
    """
    entries = []
    for protocol, run in runs.items():
        c, m = run.config, run.metrics
        entries.append(results_entry(
            dataset=dataset, protocol=protocol, backbone=c.backbone, image_size=c.image_size, device=m["device"],
            metrics={**m["trained"], "train_seconds": m["train_seconds"], "images_per_second": m["images_per_second"]},
            frozen_metrics=m["frozen"], mode=c.describe(),
            epochs=c.epochs, batch_size=c.batch_size, m_per_class=c.m_per_class, loss=c.loss,
            peak_memory_gib=m.get("peak_memory_gib"), aug_views=c.aug_views, cpu_bf16=c.cpu_bf16,
            data_dir=str(data_dir), run_folder=str(run.path)))
    return entries


def gain_summary(entries: list[dict[str, Any]], metric: str = "precision_at_1") -> pd.DataFrame:
    """Per protocol: the frozen and trained value of ``metric``, the gain (trained - frozen), MAP@R and train time.

    Read from results entries (:func:`training_entries`), so it shows exactly what the results file says.
    """
    return pd.DataFrame([{"protocol": e["protocol"], f"frozen {metric}": e["frozen_metrics"].get(metric),
                          f"trained {metric}": e["metrics"].get(metric),
                          "gain": e["metrics"].get(metric) - e["frozen_metrics"].get(metric),
                          "map_at_r": e["metrics"].get("map_at_r"), "train_seconds": e["metrics"].get("train_seconds")}
                         for e in entries]).set_index("protocol")
