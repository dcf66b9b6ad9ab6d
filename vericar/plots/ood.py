"""Open-world / OOD figures (notebook 06): k sweeps, ROC curves, score histograms, method comparison, and
adding new classes without retraining."""

from __future__ import annotations

import textwrap
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..ood import roc_curve_points

__all__ = ["k_sweep_figure", "roc_figure", "score_histogram_figure", "method_comparison_figure",
           "add_classes_figure", "neighbour_pairs_figure", "familiar_unknowns_figure", "ssb_roc_figure",
           "ssb_histogram_figure", "best_ssb_score"]

_ID_COLOUR, _OOD_COLOUR = "#4C72B0", "#DD8452"


def k_sweep_figure(sweeps: pd.DataFrame, chosen: Mapping[str, int] | None = None, title: str = ""):
    """FPR95 and AUROC of KNN+ against k (log scale), one colour per holdout.

    ``sweeps`` has columns ``holdout``, ``on`` (e.g. "validation" / "test"), ``k``, ``fpr95``, ``auroc``;
    solid lines are the test sweep, dashed the validation sweep; ``chosen`` (holdout -> k) is marked on the
    test line with a large dot.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    holdouts = list(dict.fromkeys(sweeps["holdout"]))
    colours = dict(zip(holdouts, sns.color_palette("deep", len(holdouts))))
    dashes = {"test": "-", "validation": "--"}
    for ax, metric, label in zip(axes, ("fpr95", "auroc"), ("FPR at 95% TPR (lower is better)",
                                                             "AUROC (higher is better)")):
        for (h, on), df in sweeps.groupby(["holdout", "on"], sort=False):
            df = df.sort_values("k")
            ax.plot(df["k"], df[metric], dashes.get(on, ":"), marker="o", ms=3, color=colours[h],
                    label=f"{h} ({on})")
            if chosen and on == "test" and h in chosen:
                row = df[df["k"] == chosen[h]]
                ax.plot(row["k"], row[metric], "o", ms=10, color=colours[h], mec="black", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel("k (k-th nearest database neighbour)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
    fig.suptitle(title or "KNN+: FPR95 and AUROC against k (big dot: k chosen on validation)")
    fig.tight_layout()
    _legend_below(fig, axes[0])
    return fig


def roc_figure(curves: Mapping[str, Mapping[str, tuple]], aurocs: Mapping[tuple, float] | None = None,
               names: Mapping[str, str] | None = None, title: str = ""):
    """ROC curves (ID positive) per holdout panel, one line per method.

    ``curves[holdout][method] = (fpr, tpr)``; ``aurocs[(holdout, method)]`` goes into the legend; the
    dotted line is TPR 95% (where FPR95 is read off).
    """
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.4), squeeze=False)
    methods = list(dict.fromkeys(m for per_method in curves.values() for m in per_method))
    colours = dict(zip(methods, sns.color_palette("deep", len(methods))))
    styles = dict(zip(methods, ["-", "--", "-.", ":"] * len(methods)))
    for ax, (h, per_method) in zip(axes[0], curves.items()):
        for m, (fpr, tpr) in per_method.items():
            label = f"AUROC {aurocs[(h, m)]:.3f}" if aurocs and (h, m) in aurocs else None
            ax.plot(fpr, tpr, styles[m], lw=1.6, color=colours[m], label=label)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        ax.axhline(0.95, color="0.3", ls=":", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("FPR (unknown cars accepted)")
        ax.set_title(f"held out by {h}")
        if aurocs:
            ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("TPR (known cars accepted)")
    fig.suptitle(title or "ROC curves, known cars = positive")
    fig.tight_layout()
    handles = [plt.Line2D([], [], ls=styles[m], color=colours[m], lw=1.6) for m in methods]
    fig.legend(handles, [(names or {}).get(m, m) for m in methods], loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(methods), 2), fontsize=9, frameon=False)
    return fig


def score_histogram_figure(scores: Mapping[str, tuple], xlabel: str = "KNN+ score (minus k-th NN distance)",
                           title: str = ""):
    """ID vs OOD score histograms per panel; ``scores[panel] = (id_scores, ood_scores, threshold)``.

    The vertical line is the threshold that accepts 95% of the known queries; OOD mass right of it is FPR95.
    """
    n = len(scores)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False)
    for ax, (h, (s_id, s_ood, t)) in zip(axes[0], scores.items()):
        bins = np.histogram_bin_edges(np.concatenate([s_id, s_ood]), bins=40)
        ax.hist(s_id, bins=bins, density=True, alpha=0.55, color=_ID_COLOUR, label=f"known ({len(s_id)})")
        ax.hist(s_ood, bins=bins, density=True, alpha=0.55, color=_OOD_COLOUR, label=f"held out ({len(s_ood)})")
        ax.axvline(t, color="black", ls="--", lw=1, label="95% TPR threshold")
        ax.set_title(f"held out by {h}")
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("density")
    fig.suptitle(title or "Scores of known vs held-out queries")
    fig.tight_layout()
    return fig


def method_comparison_figure(table: pd.DataFrame, names: Mapping[str, str] | None = None,
                             references: Mapping[str, tuple[float, float]] | None = None, title: str = ""):
    """FPR95 (with its Wilson 95% interval) and AUROC per holdout (x) and method (colour).

    ``table`` columns: ``holdout``, ``method``, ``fpr95``, ``fpr95_lo``, ``fpr95_hi``, ``auroc``.
    ``references`` maps a label to ``(fpr95, auroc)`` drawn as horizontal lines (e.g. a claimed result and a
    target).
    """
    holdouts = list(dict.fromkeys(table["holdout"]))
    methods = list(dict.fromkeys(table["method"]))
    colours = dict(zip(methods, sns.color_palette("deep", len(methods))))
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    t = table.set_index(["holdout", "method"])
    for j, m in enumerate(methods):
        x = np.arange(len(holdouts)) + (j - (len(methods) - 1) / 2) * width
        rows = [t.loc[(h, m)] if (h, m) in t.index else None for h in holdouts]
        fpr = np.array([r["fpr95"] if r is not None else np.nan for r in rows])
        lo = np.array([r["fpr95_lo"] if r is not None else np.nan for r in rows])
        hi = np.array([r["fpr95_hi"] if r is not None else np.nan for r in rows])
        au = np.array([r["auroc"] if r is not None else np.nan for r in rows])
        label = (names or {}).get(m, m)
        axes[0].bar(x, fpr, width, color=colours[m], label=label)
        axes[0].errorbar(x, fpr, yerr=[fpr - lo, hi - fpr], fmt="none", ecolor="0.2", lw=0.8, capsize=2)
        axes[1].bar(x, au, width, color=colours[m], label=label)
    styles = [":", "--", "-."]
    for i, (label, (f, a)) in enumerate((references or {}).items()):
        axes[0].axhline(f, color="0.25", ls=styles[i % 3], lw=1, label=label)
        axes[1].axhline(a, color="0.25", ls=styles[i % 3], lw=1, label=label)
    for ax, ylabel in zip(axes, ("FPR at 95% TPR (lower is better)", "AUROC (higher is better)")):
        ax.set_xticks(np.arange(len(holdouts)), [f"held out by {h}" for h in holdouts])
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
    lo_auroc = np.nanmin(table["auroc"].to_numpy()) if len(table) else 0.5
    axes[1].set_ylim(max(0.0, min(0.5, lo_auroc - 0.05)), 1.0)
    fig.suptitle(title or "Open-world detection of unknown cars: methods and holdouts")
    fig.tight_layout()
    _legend_below(fig, axes[0], ncol=3)
    return fig


def add_classes_figure(df: pd.DataFrame, title: str = ""):
    """Adding held-out classes to the database without retraining, one panel per holdout.

    ``df`` rows from :func:`vericar.analyses.open_world.add_classes_experiment` plus a ``holdout`` column. x: shots
    per new class; lines: known-class P@1 before and after, new-class P@1, share of new-class queries now
    accepted as known; error bars: standard deviation over the shot-sampling seeds.
    """
    holdouts = list(dict.fromkeys(df["holdout"]))
    series = [("new_accepted_before", "new-class queries accepted before adding (FPR95)", "#A6D8B4", ":"),
              ("known_p1_before", "known P@1, before adding", "0.5", "--"),
              ("known_p1_after", "known P@1, after adding", _ID_COLOUR, "-"),
              ("new_p1", "new-class P@1 (union database)", _OOD_COLOUR, "-"),
              ("new_accepted", "new-class queries accepted after adding", "#55A868", ":")]
    fig, axes = plt.subplots(1, len(holdouts), figsize=(4.6 * len(holdouts), 3.9), squeeze=False, sharey=True)
    for ax, h in zip(axes[0], holdouts):
        d = df[df["holdout"] == h].copy()
        d["shots"] = d["shots"].astype(str)
        order = list(dict.fromkeys(d["shots"]))
        g = d.groupby("shots", sort=False)
        x = np.arange(len(order))
        for col, label, colour, ls in (s for s in series if s[0] in d):
            mean = g[col].mean().reindex(order).to_numpy()
            std = g[col].std(ddof=0).reindex(order).fillna(0).to_numpy()
            ax.errorbar(x, mean, yerr=std, ls=ls, marker="o", ms=4, color=colour, capsize=3, label=label)
        ax.set_xticks(x, order)
        ax.set_xlabel("labelled images added per new class")
        ax.set_title(f"held out by {h}")
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel("fraction")
    fig.suptitle(title or "New cars added to the database without retraining")
    fig.tight_layout()
    _legend_below(fig, axes[0, 0], ncol=3)
    return fig


def neighbour_pairs_figure(queries, neighbours, query_titles, neighbour_titles, pairs_per_row: int = 4,
                           size: float = 2.4, width: int = 28, title: str = ""):
    """Query images beside their nearest database image, ``pairs_per_row`` pairs per row, wrapped titles."""
    n = len(queries)
    nrows = max(1, int(np.ceil(n / pairs_per_row)))
    fig, axes = plt.subplots(nrows, 2 * pairs_per_row, figsize=(2 * pairs_per_row * size, nrows * size * 1.05),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (q, nb) in enumerate(zip(queries, neighbours)):
        r, c = divmod(i, pairs_per_row)
        for j, (im, t, colour) in enumerate(((q, query_titles[i], _OOD_COLOUR), (nb, neighbour_titles[i], _ID_COLOUR))):
            ax = axes[r, 2 * c + j]
            ax.imshow(im)
            ax.set_title(textwrap.fill(t, width), fontsize=7, color=colour)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _legend_below(fig, ax, ncol: int = 2) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=9, frameon=False)


def familiar_unknowns_figure(cars, query_rows, neighbour_rows, scores, title: str = ""):
    """Unknown query images (``query_rows`` of ``cars``) beside their nearest known image (``neighbour_rows``),
    titled with class names and KNN+ scores (from
    :func:`vericar.analyses.open_world.most_familiar_unknowns`)."""
    labels, names = cars.labels, cars.class_names
    return neighbour_pairs_figure(
        [cars.image(int(i)) for i in query_rows], [cars.image(int(i)) for i in neighbour_rows],
        [f"unknown: {names[labels[i]]} (score {sc:.3f})" for i, sc in zip(query_rows, scores)],
        [f"nearest known: {names[labels[i]]}" for i in neighbour_rows], title=title)


_SSB_MAIN = ("easy", "hard (medium+hard)")


def ssb_roc_figure(ssb_eval: Mapping, known_rows, names: Mapping[str, str] | None = None, title: str = ""):
    """ROC curves of every SSB score (known test cars positive), one panel for Easy and one for Hard
    (Medium + Hard); ``ssb_eval`` from :func:`vericar.analyses.open_set.ssb_evaluation`, ``known_rows`` the
    split's known queries."""
    curves = {g: {m: roc_curve_points(s[known_rows], s[ssb_eval["groups"][g]]) for m, s in ssb_eval["scores"].items()}
              for g in _SSB_MAIN}
    aurocs = {(r.unknown, r.score): r.auroc for r in ssb_eval["table"].itertuples()}
    return roc_figure(curves, aurocs, names=names, title=title or "SSB: ROC curves, known cars positive")


def best_ssb_score(ssb_eval: Mapping, group: str = "easy") -> str:
    """The score chosen on validation (``ssb_eval["chosen"]``) or, without a validation model, the one with
    the highest AUROC on ``group`` (a description of the test results, not a choice made for them)."""
    if ssb_eval.get("chosen"):
        return str(ssb_eval["chosen"])
    t = ssb_eval["table"]
    return str(t[t["unknown"] == group].sort_values("auroc", kind="stable").iloc[-1]["score"])


def ssb_histogram_figure(ssb_eval: Mapping, known_rows, names: Mapping[str, str] | None = None, title: str = ""):
    """Histograms of the chosen (or best on Easy) score (:func:`best_ssb_score`) for known test cars against Easy and Hard
    unknowns, with the threshold that keeps 95% of the known cars."""
    best = best_ssb_score(ssb_eval)
    s = ssb_eval["scores"][best]
    hist = {g: (s[known_rows], s[ssb_eval["groups"][g]], np.quantile(s[known_rows], 0.05)) for g in _SSB_MAIN}
    return score_histogram_figure(hist, xlabel=(names or {}).get(best, best), title=title or "SSB: Easy against Hard")
