"""Figures of the gradient-bug comparison (notebook 02)."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["VERDICT_COLORS", "gradient_norms_figure", "comparison_curves_figure", "final_precision_figure",
           "label_corruption_figure"]

#: One colour per verdict, shared by every figure of notebook 02.
VERDICT_COLORS: dict[str, str] = {
    "reference": "#4C72B0",
    "same gradient as pml": "#4C72B0",
    "no change": "#55A868",
    "better": "#2E8B57",
    "slows learning": "#DD8452",
    "lowers measured accuracy": "#DD8452",
    "raises measured accuracy": "#8172B3",
    "breaks learning": "#C44E52",
    "no gradient reaches the model": "#C44E52",
    "different gradient": "#8172B3",
    "raises": "#7F7F7F",
    "inconclusive": "#B0B0B0",
}


def _color(verdict: str) -> str:
    return VERDICT_COLORS.get(verdict, "#937860")


def gradient_norms_figure(report: pd.DataFrame, title: str = ""):
    """Loss value and gradient norm reaching the backbone and the head, per accumulation variant, on one batch.

    ``report``: :func:`vericar.reproductions.gradient_verdicts` of :func:`vericar.losses.gradient_report`
    (needs ``verdict``). Bars coloured by verdict; a variant with no gradient is marked "0", one that raises
    "raises".
    """
    df = report.reset_index(drop=True)
    names = list(df["variant"])
    y = np.arange(len(df))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.42 * len(df) + 1.6), sharey=True)
    panels = [("loss", "loss value (same batch, same embeddings)"),
              ("grad_norm_backbone", "‖gradient‖ reaching the backbone"),
              ("grad_norm_head", "‖gradient‖ reaching the head")]
    colors = [_color(v) for v in df["verdict"]]
    for ax, (col, label) in zip(axes, panels):
        values = df[col].to_numpy(dtype=float)
        ax.barh(y, np.nan_to_num(values), color=colors, height=0.7)
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        for i, v in enumerate(values):
            if df["verdict"].iat[i] == "raises":
                ax.text(top * 0.02, i, "raises", va="center", fontsize=8, color="0.25")
            elif np.isfinite(v):
                ax.text(v + top * 0.02, i, "0" if v == 0 else f"{v:.3g}", va="center", fontsize=8, color="0.25")
        ax.set_xlim(0, top * 1.3 if top > 0 else 1)
        ax.set_title(label, fontsize=10)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=_color(v)) for v in dict.fromkeys(df["verdict"])]
    fig.legend(handles, list(dict.fromkeys(df["verdict"])), loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, -0.02), frameon=False)
    fig.suptitle(title or "What each accumulation sends back into the model")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def comparison_curves_figure(histories: pd.DataFrame, outcomes: pd.DataFrame, metric: str = "precision_at_1",
                             groups: Sequence[Sequence[str]] | None = None, group_titles: Sequence[str] = ()):
    """Training loss (left) and ``metric`` (right) per epoch, one row per group of variants.

    ``histories``: :meth:`vericar.reproductions.Comparison.histories`; ``outcomes``:
    :func:`vericar.reproductions.classify_outcomes` (colours lines by verdict, dashes the references).
    ``groups``: lists of variant names per row (default: one row per ``group`` column value, each with its
    reference).
    """
    verdict = outcomes.set_index("variant")["verdict"].to_dict()
    ref_of = outcomes.set_index("variant")["reference"].to_dict()
    if groups is None:
        groups, group_titles = [], []
        for g, sub in outcomes[outcomes["group"] != "reference"].groupby("group", sort=False):
            names = list(sub["variant"])
            refs = [r for r in dict.fromkeys(sub["reference"]) if r not in names]
            groups.append(refs + names)
            group_titles.append(str(g))
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.3 * len(groups)), squeeze=False)
    for row, names in enumerate(groups):
        palette = sns.color_palette("tab10", max(3, len(names)))
        for i, name in enumerate(names):
            h = histories[histories["variant"] == name]
            if len(h) == 0:
                continue
            is_ref = ref_of.get(name) == name
            style = dict(color="0.15" if is_ref else palette[i % len(palette)], lw=2.2 if is_ref else 1.5,
                         ls="--" if is_ref else "-", label=f"{name} ({verdict.get(name, '')})")
            axes[row, 0].plot(h["epoch"], h["loss"], **style)
            ok = h[metric].notna() if metric in h else []
            if metric in h:
                axes[row, 1].plot(h.loc[ok, "epoch"], h.loc[ok, metric], marker="o", ms=3, **style)
        title = group_titles[row] if row < len(group_titles) else ""
        axes[row, 0].set(title=f"{title}: training loss", xlabel="epoch")
        axes[row, 1].set(title=f"{title}: {metric.replace('_', ' ')} (queries)", xlabel="epoch", ylim=(0, 1))
        axes[row, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def final_precision_figure(outcomes: pd.DataFrame, title: str = ""):
    """Final P@1 per variant (95% Wilson interval) against its frozen backbone, coloured by verdict."""
    from vericar.metrics import wilson_interval

    df = outcomes.reset_index(drop=True)
    y = np.arange(len(df))
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(df) + 1.4))
    for i, r in df.iterrows():
        if pd.isna(r["precision_at_1"]):
            ax.text(0.01, i, f"{r['verdict']}: {str(r.get('error') or '')[:70]}", va="center", fontsize=8, color="0.3")
            continue
        n = int(r["n_query"])
        lo, hi = wilson_interval(int(round(r["precision_at_1"] * n)), n)
        ax.barh(i, r["precision_at_1"], color=_color(r["verdict"]), height=0.7)
        ax.errorbar(r["precision_at_1"], i, xerr=[[r["precision_at_1"] - lo], [hi - r["precision_at_1"]]],
                    color="0.2", capsize=2, lw=1)
        ax.plot([r["frozen_precision_at_1"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1.5)
        ax.text(min(hi, 1) + 0.01, i, f"{r['precision_at_1']:.3f}  {r['verdict']}", va="center", fontsize=8)
    ax.set_yticks(y, df["variant"])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.3)
    ax.set_xlabel("final precision@1 (bars, 95% CI); black tick: the same run's frozen backbone")
    ax.set_title(title or "Final P@1 per variant")
    fig.tight_layout()
    return fig


def label_corruption_figure(true_labels, corrupted_labels, title: str = ""):
    """Images per class: true classes vs the pseudo-classes read from the unlabelled test file (log count axis)."""
    y = pd.Series(np.asarray(true_labels)).value_counts()
    z = pd.Series(np.asarray(corrupted_labels)).value_counts()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 2.2]})
    bars = axes[0].bar(["true labels", "bbox_y2 read\nas the class"], [len(y), len(z)], color=["#4C72B0", "#C44E52"])
    axes[0].bar_label(bars, fmt="%d")
    axes[0].set(title="distinct classes", ylabel="classes")
    bins = np.unique(np.round(np.logspace(0, np.log10(max(y.max(), z.max()) + 1), 25)))
    axes[1].hist([y.to_numpy(), z.to_numpy()], bins=bins, label=["true classes", "pseudo-classes (bbox_y2)"],
                 color=["#4C72B0", "#C44E52"])
    axes[1].set_xscale("log")
    axes[1].set(title="images per class", xlabel="images in the class (log)", ylabel="classes")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
