"""Hierarchy ablation figures (notebook 07): MS vs HiMS-Min vs HiMS-Max, level by level.

Every figure takes tidy tables (one row per loss x panel x level) built by the notebook from
:mod:`vericar.analyses.hierarchy`; a *panel* is a protocol or a query set such as "open-world, held-out models".
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["hierarchy_levels_figure", "hierarchy_difference_figure", "hierarchy_error_depth_figure",
           "hierarchy_loss_shares_figure"]

_LEVEL_TICKS = {"make": "make", "type": "+ type", "model": "+ model", "year": "+ year\n(class)",
                "precision_at_1": "P@1", "map_at_r": "MAP@R"}
_DEPTH_COLOURS = ["#C44E52", "#DD8452", "#CCB974", "#8C8C8C"]
_LEVEL_COLOURS = dict(zip(("make", "type", "model", "year"), sns.color_palette("crest", 4)))


def _loss_colours(losses: Sequence[str]) -> dict[str, tuple]:
    base = {"MS": "#8C8C8C", "HiMS-Min": "#4C72B0", "HiMS-Max": "#DD8452"}
    extra = iter(sns.color_palette("deep", 10)[3:])
    return {l: base.get(l) or next(extra) for l in losses}


def _panels_axes(n: int, width: float, height: float):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, sharey=True)
    return fig, axes.ravel()


def hierarchy_levels_figure(table: pd.DataFrame, *, ylabel: str = "accuracy (95% Wilson CI)", title: str = ""):
    """Grouped bars: accuracy at each level (x) per loss (colour), one panel per ``panel``.

    ``table`` columns: ``panel``, ``loss``, ``level`` (make/type/model/year, or a metric such as
    precision_at_1), ``accuracy``, optional ``ci_low``/``ci_high``, optional ``n`` (shown in the panel title).
    Missing combinations are left empty.
    """
    panels = list(dict.fromkeys(table["panel"]))
    losses = list(dict.fromkeys(table["loss"]))
    colours = _loss_colours(losses)
    fig, axes = _panels_axes(len(panels), 4.4, 4.0)
    width = 0.8 / max(1, len(losses))
    for ax, panel in zip(axes, panels):
        t = table[table["panel"] == panel]
        levels = list(dict.fromkeys(t["level"]))
        for j, loss in enumerate(losses):
            s = t[t["loss"] == loss].set_index("level").reindex(levels)
            x = np.arange(len(levels)) + (j - (len(losses) - 1) / 2) * width
            acc = s["accuracy"].to_numpy(dtype=float)
            err = None
            if {"ci_low", "ci_high"} <= set(s.columns):
                err = np.vstack([acc - s["ci_low"].to_numpy(dtype=float), s["ci_high"].to_numpy(dtype=float) - acc])
                err = np.where(np.isnan(err), 0.0, err)
            bars = ax.bar(x, np.nan_to_num(acc), width, color=colours[loss], label=loss, yerr=err, ecolor="0.3",
                          capsize=2, error_kw={"lw": 0.8})
            ax.bar_label(bars, labels=["" if np.isnan(a) else f"{a:.2f}" for a in acc], fontsize=6.5, padding=1,
                         rotation=90 if len(losses) * len(levels) > 12 else 0)
        ax.set_xticks(np.arange(len(levels)), [_LEVEL_TICKS.get(l, l) for l in levels], fontsize=8)
        n = t["n"].iloc[0] if "n" in t.columns and len(t) else None
        ax.set_title(f"{panel}" + (f"\n({int(n)} queries)" if n is not None and not pd.isna(n) else ""), fontsize=9)
        ax.set_ylim(0, 1.12)
    axes[0].set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(losses), frameon=False)
    fig.suptitle(title or "accuracy per hierarchy level, by loss")
    fig.tight_layout()
    return fig


def hierarchy_difference_figure(comparison: pd.DataFrame, *, baseline: str = "MS", title: str = ""):
    """Paired difference of each variant's accuracy from the baseline's, per level and panel, with 95% CIs.

    ``comparison`` columns: ``panel``, ``loss`` (variant), ``level``, ``diff``, ``ci_low``, ``ci_high``,
    ``significant`` (bool; filled markers), as built from :func:`vericar.analyses.hierarchy.compare_variants`.
    Points right of zero: the variant is more often right at that level than the baseline.
    """
    from matplotlib.lines import Line2D

    panels = list(dict.fromkeys(comparison["panel"]))
    losses = list(dict.fromkeys(comparison["loss"]))
    levels = list(dict.fromkeys(comparison["level"]))
    order = [l for l in _LEVEL_TICKS if l in levels] + [l for l in levels if l not in _LEVEL_TICKS]
    pos = {l: i for i, l in enumerate(order)}
    colours = _loss_colours(losses)
    fig, axes = _panels_axes(len(panels), 3.6, 1.4 + 0.55 * len(order))
    bounds = comparison[["ci_low", "ci_high", "diff"]].to_numpy(dtype=float)
    span = float(np.nanmax(np.abs(bounds))) if len(comparison) and np.isfinite(bounds).any() else 0.0
    span = max(0.02, span * 1.15)
    for ax, panel in zip(axes, panels):
        t = comparison[comparison["panel"] == panel]
        for j, loss in enumerate(losses):
            s = t[t["loss"] == loss]
            if s.empty:
                continue
            y = np.array([pos[l] for l in s["level"]]) + (j - (len(losses) - 1) / 2) * 0.22
            d = s["diff"].to_numpy(dtype=float)
            err = np.vstack([d - s["ci_low"].to_numpy(dtype=float), s["ci_high"].to_numpy(dtype=float) - d])
            ax.errorbar(d, y, xerr=np.where(np.isnan(err), 0.0, err), fmt="none", ecolor=colours[loss], lw=1.2,
                        capsize=2)
            sig = (s["significant"].fillna(False).to_numpy(dtype=bool) if "significant" in s
                   else np.zeros(len(s), bool))
            ax.scatter(d[sig], y[sig], color=colours[loss], s=40, zorder=3)
            ax.scatter(d[~sig], y[~sig], facecolor="white", edgecolor=colours[loss], s=40, zorder=3)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_xlim(-span, span)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(f"accuracy minus {baseline}'s")
    axes[0].set_yticks(np.arange(len(order)), [_LEVEL_TICKS.get(l, l).replace("\n", " ") for l in order])
    axes[0].set_ylim(len(order) - 0.5, -0.5)
    handles = [Line2D([], [], marker="o", ls="-", color=colours[l], mfc="white", label=l) for l in losses]
    handles.append(Line2D([], [], marker="o", ls="", color="0.3", label="filled: significant after Holm"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), frameon=False,
               fontsize=8)
    fig.suptitle(title or f"paired difference from {baseline} on the same queries (95% CI)")
    fig.tight_layout()
    return fig


def _stacked_shares(ax, y: float, shares, colours, labels=None, *, min_label: float, height: float = 0.8) -> None:
    """One horizontal bar of shares stacked left to right, each segment >= ``min_label`` labelled in percent."""
    left = 0.0
    for j, (share, colour) in enumerate(zip(shares, colours)):
        ax.barh(y, share, left=left, color=colour, edgecolor="white", height=height,
                label=labels[j] if labels is not None else None)
        if share >= min_label:
            ax.text(left + share / 2, y, f"{share:.0%}", ha="center", va="center", fontsize=7, color="white")
        left += share


def hierarchy_error_depth_figure(depths: pd.DataFrame, *, title: str = ""):
    """When the class is wrong, how much is still right: stacked bars per loss, grouped by panel.

    ``depths`` columns: ``panel``, ``loss``, ``n`` (class-wrong queries) and one column per depth label in
    coarse-to-fine order (:data:`vericar.analyses.hierarchy.DEPTH_LABELS` values), shares summing to 1.
    """
    depth_cols = [c for c in depths.columns if c not in ("panel", "loss", "n")]
    panels = list(dict.fromkeys(depths["panel"]))
    rows = []
    for p in panels:
        rows += [(p, l) for l in depths.loc[depths["panel"] == p, "loss"]]
    d = depths.set_index(["panel", "loss"])
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * len(rows) + 0.25 * len(panels)))
    y, ticks, labels, y_pos = 0.0, [], [], []
    for i, (p, l) in enumerate(rows):
        if i and rows[i - 1][0] != p:
            y += 0.6
        y_pos.append(y)
        ticks.append(y)
        n = d.loc[(p, l), "n"] if "n" in d.columns else None
        labels.append(f"{p} | {l}" + (f" (n={int(n)})" if n is not None and not pd.isna(n) else ""))
        colours = _DEPTH_COLOURS + list(sns.color_palette("deep", 10))
        shares = [float(v) if not pd.isna(v) else 0.0 for v in d.loc[(p, l), depth_cols]]
        _stacked_shares(ax, y, shares, colours, depth_cols if i == 0 else None, min_label=0.05, height=0.8)
        y += 1.0
    return _finish_share_bars(fig, ax, ticks, labels, "share of the queries whose class is wrong", len(depth_cols),
                              title or "class wrong: how far down the hierarchy is the answer still right?")


def hierarchy_loss_shares_figure(shares: pd.DataFrame, *, levels: Sequence[str] = ("make", "type", "model", "year"),
                                 title: str = ""):
    """Which raw level loss the constrained hierarchical loss is made of: stacked bars per row of ``shares``.

    ``shares`` columns: ``label`` (row name, e.g. "HiMS-Min | seed"), one share column per level (summing to
    1, from :func:`vericar.analyses.hierarchy.effective_level_weights`) and optional ``binding``.
    """
    fig, ax = plt.subplots(figsize=(9, 1.1 + 0.36 * len(shares)))
    for y, (_, row) in enumerate(shares.iterrows()):
        _stacked_shares(ax, y, [float(row[level]) for level in levels],
                        [_LEVEL_COLOURS.get(level, "0.5") for level in levels], list(levels) if y == 0 else None,
                        min_label=0.06)
    return _finish_share_bars(fig, ax, np.arange(len(shares)), shares["label"],
                              "share of the loss (and its gradient) supplied by each level's own MS loss",
                              len(levels), title or "what the min/max constraint leaves of each level")


def _finish_share_bars(fig, ax, ticks, labels, xlabel: str, legend_columns: int, title: str):
    """Row labels, a 0-1 axis, the legend above the plot and the title: the end of both stacked-share figures."""
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.legend(ncol=legend_columns, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(title, pad=24)
    fig.tight_layout()
    return fig
