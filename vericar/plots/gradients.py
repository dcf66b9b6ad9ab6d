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
    "reference": "#2B4C7E",
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

    ``report``: :func:`vericar.analyses.gradient_bug.gradient_verdicts` of :func:`vericar.analyses.seed_losses.gradient_report`
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
    """Training loss (left) and ``metric`` (right) per epoch, one row per family of variants.

    ``histories``: :meth:`vericar.analyses.gradient_bug.Comparison.histories`; ``outcomes``:
    :func:`vericar.analyses.gradient_bug.classify_outcomes` (the legend gives each verdict; references are drawn last,
    dashed black, so that identical curves stay visible). ``groups``: lists of variant names per row (default:
    loss accumulation / other suspects / evaluation, each with its reference).
    """
    from matplotlib.ticker import MaxNLocator

    verdict = outcomes.set_index("variant")["verdict"].to_dict()
    ref_of = outcomes.set_index("variant")["reference"].to_dict()
    if groups is None:
        families: dict[str, list[str]] = {}
        for _, r in outcomes.iterrows():
            if r["variant"] == r["reference"]:
                continue
            fam = r["group"] if r["group"] in ("loss accumulation", "evaluation") else "other suspects"
            families.setdefault(fam, [])
            if r["reference"] not in families[fam]:
                families[fam].insert(0, r["reference"])
            families[fam].append(r["variant"])
        order = [f for f in ("loss accumulation", "other suspects", "evaluation") if f in families]
        groups, group_titles = [families[f] for f in order], order
    present = set(histories["variant"]) if "variant" in histories else set()
    groups = [[n for n in g if n in present] for g in groups]
    fig, axes = plt.subplots(max(1, len(groups)), 2, figsize=(13, 3.4 * max(1, len(groups))), squeeze=False)
    for row, names in enumerate(groups):
        palette = sns.color_palette("tab10", 10)
        others = [n for n in names if ref_of.get(n) != n]
        refs = [n for n in names if ref_of.get(n) == n]
        for i, name in enumerate(others + refs):  # references last: on top
            h = histories[histories["variant"] == name]
            is_ref = name in refs
            style = dict(color="black" if is_ref else palette[i % 10], lw=1.6 if is_ref else 1.8,
                         ls=(0, (4, 3)) if is_ref else "-", zorder=5 if is_ref else 2,
                         label=f"{name} ({verdict.get(name, '')})")
            axes[row, 0].plot(h["epoch"], h["loss"], **style)
            if metric in h:
                ok = h[metric].notna()
                axes[row, 1].plot(h.loc[ok, "epoch"], h.loc[ok, metric], marker="o", ms=3, **style)
        title = group_titles[row] if row < len(group_titles) else ""
        axes[row, 0].set(title=f"{title}: training loss", xlabel="epoch")
        axes[row, 1].set(title=f"{title}: {metric.replace('_', ' ')} (queries)", xlabel="epoch", ylim=(0, 1))
        for ax in axes[row]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
            err = str(r.get("error") or "")
            ax.text(0.01, i, f"{r['verdict']}: {err[:60]}{'...' if len(err) > 60 else ''}", va="center", fontsize=8,
                    color="0.3")
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
    """True classes vs the pseudo-classes read from the unlabelled test file (the box bottom ``bbox_y2``).

    Left: distinct labels. Middle: images per class, classes sorted by size (log x). Right: each image's true
    class against its corrupted label: no relation, the "class" is a pixel row.
    """
    y = np.asarray(true_labels)
    z = np.asarray(corrupted_labels)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [0.8, 1.5, 1.5]})
    bars = axes[0].bar(["true\nlabels", "bbox_y2 read\nas the class"], [len(np.unique(y)), len(np.unique(z))],
                       color=["#4C72B0", "#C44E52"])
    axes[0].bar_label(bars, fmt="%d")
    axes[0].set(title="distinct classes", ylabel="classes")
    for labels, color, name in ((y, "#4C72B0", "true classes"), (z, "#C44E52", "pseudo-classes (bbox_y2)")):
        counts = np.sort(pd.Series(labels).value_counts().to_numpy())[::-1]
        axes[1].step(np.arange(1, len(counts) + 1), counts, where="mid", color=color, label=name)
    axes[1].set_xscale("log")
    axes[1].set(title="images per class, largest first", xlabel="class rank (log)", ylabel="images")
    axes[1].legend(fontsize=8)
    rng = np.random.default_rng(0)
    axes[2].scatter(y + rng.uniform(-0.3, 0.3, len(y)), z, s=4, alpha=0.4, color="#C44E52", linewidth=0)
    axes[2].set(title="each image: true class vs its corrupted label", xlabel="true class index",
                ylabel="corrupted label (bbox_y2, px)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
