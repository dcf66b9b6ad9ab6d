"""Training figures (notebook 03)."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

__all__ = ["frozen_vs_trained_figure", "training_curves_figure"]


# -- training ----------------------------------------------------------------------------------------------

def frozen_vs_trained_figure(table: pd.DataFrame, metrics: Sequence[str] = ("precision_at_1", "map_at_r"),
                             title: str = ""):
    """Grouped bars: each protocol's metric for the frozen backbone and the trained model."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes.ravel(), metrics):
        sns.barplot(table, x="protocol", y=metric, hue="stage", ax=ax, palette={"frozen": "#B0B0B0", "trained": "#4C72B0"})
        for container in ax.containers:
            ax.bar_label(container, fmt="%.2f", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_curves_figure(histories: dict[str, pd.DataFrame], metric: str = "precision_at_1"):
    """Loss and ``metric`` per epoch, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, h in histories.items():
        if len(h) == 0:
            continue
        axes[0].plot(h["epoch"], h["loss"], label=name)
        if metric in h:
            ok = h[metric].notna()
            axes[1].plot(h.loc[ok, "epoch"], h.loc[ok, metric], marker="o", ms=3, label=name)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title=metric.replace("_", " "), xlabel="epoch", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig
