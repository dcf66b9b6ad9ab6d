"""Embedding-space figures (notebook 04): UMAP maps before/after training, the open-world map, purity."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

__all__ = ["umap_grid_figure", "open_world_map_figure", "purity_figure"]

_GREY = "#C8C8C8"


def _scatter_categorical(ax, xy, values, order: Sequence, palette, *, other: str | None = None, s: float = 4):
    """Draw ``other`` first in grey, then each value of ``order`` in its colour (later = on top)."""
    values = np.asarray(values, dtype=object)
    if other is not None:
        m = values == other
        ax.scatter(xy[m, 0], xy[m, 1], s=s * 0.7, c=_GREY, linewidths=0, alpha=0.5, rasterized=True)
    for v, colour in zip(order, palette):
        m = values == v
        ax.scatter(xy[m, 0], xy[m, 1], s=s, color=colour, linewidths=0, alpha=0.8, label=str(v), rasterized=True)


def _palette(n: int) -> list:
    """``n`` distinct colours without greys (grey is reserved for "other"): tab20's dark, then light shades."""
    tab20 = sns.color_palette("tab20", 20)
    dark = [tab20[i] for i in range(0, 20, 2) if i != 14]
    light = [tab20[i] for i in range(1, 20, 2) if i != 15]
    colours = dark + light
    return [colours[i % len(colours)] for i in range(n)]


def _auto_size(n: int) -> float:
    """Marker area for n points: larger when there are few."""
    return float(np.clip(12000 / max(n, 1), 3, 24))


def umap_grid_figure(maps: dict[str, np.ndarray], colours: pd.DataFrame, *, make_order: Sequence | None = None,
                     other: str = "other", point_size: float | None = None, title: str = ""):
    """UMAP maps, one row per stage (e.g. frozen backbone / trained), columns coloured by make, body type, year.

    Parameters
    ----------
    maps : {stage name: (N, 2) coordinates}, the same N points in every map.
    colours : DataFrame (N rows) with ``make`` (already reduced to the top makes + ``other``, see
        :func:`vericar.analyses.embeddings.top_n_labels`), ``type`` and ``year``.
    make_order : the coloured makes in legend order (default: by number of points); others are ``other``.
    point_size : marker area; by default larger for fewer points.
    """
    stages = list(maps)
    point_size = point_size or _auto_size(len(colours))
    fig, axes = plt.subplots(len(stages), 3, figsize=(16, 4.8 * len(stages)), squeeze=False)
    present = set(pd.unique(colours["make"]))
    makes = [m for m in (make_order if make_order is not None else pd.Series(colours["make"]).value_counts().index)
             if m != other and m in present]
    n_other = int((colours["make"] == other).sum())
    make_pal = _palette(len(makes))
    types = sorted(pd.unique(colours["type"]))
    type_pal = _palette(len(types))
    years = np.asarray(colours["year"], dtype=float)
    for r, stage in enumerate(stages):
        xy = np.asarray(maps[stage])
        ax = axes[r, 0]
        _scatter_categorical(ax, xy, colours["make"], makes, make_pal, other=other if n_other else None,
                             s=point_size)
        ax.set_title(f"{stage}: make")
        if r == 0:
            handles, labels = ax.get_legend_handles_labels()
            extra = f"; grey: the other makes ({n_other} points)" if n_other else ""
            ax.legend(handles, labels, title=f"top {len(makes)} makes{extra}", fontsize=7, title_fontsize=7,
                      markerscale=2.5, loc="upper left", bbox_to_anchor=(0, -0.02), ncol=4, frameon=False)
        ax = axes[r, 1]
        _scatter_categorical(ax, xy, colours["type"], types, type_pal, s=point_size)
        ax.set_title(f"{stage}: body type")
        if r == 0:
            ax.legend(fontsize=7, markerscale=2.5, loc="upper left", bbox_to_anchor=(0, -0.02), ncol=4,
                      frameon=False)
        ax = axes[r, 2]
        order = np.argsort(years, kind="stable")
        sc = ax.scatter(xy[order, 0], xy[order, 1], c=years[order], cmap="viridis", s=point_size, linewidths=0,
                        alpha=0.8, rasterized=True)
        ax.set_title(f"{stage}: model year")
        cbar = fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.01)
        cbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        cbar.ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%d"))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def open_world_map_figure(maps: dict[str, np.ndarray], heldout, *, point_size: float | None = None, title: str = "",
                          heldout_label: str = "held-out classes (OOD queries)",
                          known_label: str = "known classes (database + queries)"):
    """Known (grey) vs held-out (red) points in the same UMAP map, one panel per stage."""
    heldout = np.asarray(heldout, dtype=bool)
    point_size = point_size or _auto_size(len(heldout))
    stages = list(maps)
    fig, axes = plt.subplots(1, len(stages), figsize=(6.2 * len(stages), 5.4), squeeze=False)
    for ax, stage in zip(axes.ravel(), stages):
        xy = np.asarray(maps[stage])
        ax.scatter(xy[~heldout, 0], xy[~heldout, 1], s=point_size, c=_GREY, linewidths=0, alpha=0.6,
                   label=f"{known_label}: {int((~heldout).sum())}", rasterized=True)
        ax.scatter(xy[heldout, 0], xy[heldout, 1], s=point_size * 1.5, c="#C44E52", linewidths=0, alpha=0.85,
                   label=f"{heldout_label}: {int(heldout.sum())}", rasterized=True)
        ax.set_title(stage)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=8, markerscale=2.5, loc="upper left", bbox_to_anchor=(0, -0.01), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def purity_figure(table: pd.DataFrame, *, title: str = ""):
    """Neighbourhood purity (with chance level) and cosine silhouette per level, one bar per stage.

    ``table``: :func:`vericar.analyses.embeddings.embedding_quality`'s long table (``stage, level, purity,
    chance, silhouette``).
    """
    has_sil = "silhouette" in table and table["silhouette"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_sil else 1, figsize=(12 if has_sil else 6.5, 3.8), squeeze=False)
    levels = list(dict.fromkeys(table["level"]))
    stages = list(dict.fromkeys(table["stage"]))
    pal = dict(zip(stages, ["#B0B0B0", "#4C72B0", "#DD8452", "#55A868"][: len(stages)]))
    ax = axes[0, 0]
    sns.barplot(table, x="level", y="purity", hue="stage", order=levels, hue_order=stages, palette=pal, ax=ax)
    for c in ax.containers:
        ax.bar_label(c, fmt="%.2f", fontsize=7)
    chance = table.groupby("level", sort=False)["chance"].first().reindex(levels)
    ax.scatter(np.arange(len(levels)), chance.to_numpy(), marker="_", s=600, c="k", zorder=5, label="chance")
    k = int(table["k"].iloc[0]) if "k" in table else None
    ax.set(ylim=(0, 1.05), xlabel="", title=f"neighbourhood purity (k = {k})" if k else "neighbourhood purity")
    ax.set_xticks(range(len(levels)), [lv.replace("_", "\n") for lv in levels])
    ax.legend(fontsize=8, loc="upper right")
    if has_sil:
        ax = axes[0, 1]
        sns.barplot(table, x="level", y="silhouette", hue="stage", order=levels, hue_order=stages, palette=pal,
                    ax=ax)
        for c in ax.containers:
            ax.bar_label(c, fmt="%.2f", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="", title="silhouette (cosine)")
        ax.set_xticks(range(len(levels)), [lv.replace("_", "\n") for lv in levels])
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
