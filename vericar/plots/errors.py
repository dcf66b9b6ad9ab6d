"""Error-analysis figures (notebook 05): accuracy per group and level, confusion structure, size effects,
claims."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .eda import pair_grid

__all__ = ["group_accuracy_figure", "level_accuracy_figure", "confusion_structure_figure", "size_effect_figure",
           "claims_figure", "confused_pairs_figure", "near_duplicate_errors_figure"]

_KIND_COLOURS = {"correct": "#55A868", "same model, other year": "#8172B3", "same family, other body": "#64B5CD",
                 "same make, other model": "#DD8452", "other make": "#C44E52"}


def _ci_dots(ax, table: pd.DataFrame, labels, overall: float | None, colour="#4C72B0"):
    y = np.arange(len(table))
    acc = table["accuracy"].to_numpy(dtype=float)
    err = np.vstack([acc - table["ci_low"].to_numpy(dtype=float), table["ci_high"].to_numpy(dtype=float) - acc])
    ax.errorbar(acc, y, xerr=err, fmt="o", ms=4, color=colour, ecolor="0.6", elinewidth=1.2, capsize=0)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7 if len(table) > 25 else 8)
    ax.invert_yaxis()
    ax.set_xlim(-0.02, 1.02)
    if overall is not None:
        ax.axvline(overall, color="k", lw=0.8, ls="--", label=f"all queries {overall:.2f}")
        ax.legend(fontsize=7, loc="lower right")


def group_accuracy_figure(tables: dict[str, pd.DataFrame], *, overall: float | None = None, max_groups: int = 30,
                          title: str = ""):
    """Accuracy with 95% Wilson intervals per group, one panel per table, worst first (labels show n).

    ``tables``: {panel name: :func:`vericar.metrics.grouped_accuracy` table}; a table with more than
    ``max_groups`` rows shows its ``max_groups`` worst groups (said in the panel title).
    """
    names = list(tables)
    shown = {k: t.sort_values(["accuracy", "group"], kind="stable").head(max_groups) for k, t in tables.items()}
    height = max(3.0, 0.19 * max(len(t) for t in shown.values()) + 1.2)
    fig, axes = plt.subplots(1, len(names), figsize=(6.0 * len(names), height), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        t, full = shown[name], tables[name]
        labels = [f"{g} (n={n})" for g, n in zip(t["group"], t["n"])]
        _ci_dots(ax, t, labels, overall)
        part = f"worst {len(t)} of {len(full)}" if len(t) < len(full) else f"{len(full)} groups"
        ax.set_title(f"1-NN accuracy per {name} ({part})", fontsize=10)
        ax.set_xlabel("accuracy (95% Wilson CI)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def level_accuracy_figure(table: pd.DataFrame, *, title: str = ""):
    """Accuracy at make / type / model / year with Wilson intervals; one bar per ``stage`` if the column exists."""
    t = table if "stage" in table else table.assign(stage="")
    levels = list(dict.fromkeys(t["level"]))
    stages = list(dict.fromkeys(t["stage"]))
    colours = ["#B0B0B0", "#4C72B0", "#DD8452"][: len(stages)] if len(stages) > 1 else ["#4C72B0"]
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (stage, colour) in enumerate(zip(stages, colours)):
        s = t[t["stage"] == stage].set_index("level").reindex(levels)
        x = np.arange(len(levels)) + (i - (len(stages) - 1) / 2) * width
        acc = s["accuracy"].to_numpy(dtype=float)
        err = np.vstack([acc - s["ci_low"].to_numpy(dtype=float), s["ci_high"].to_numpy(dtype=float) - acc])
        bars = ax.bar(x, acc, width=width, color=colour, label=stage or None, yerr=err, ecolor="0.3", capsize=3)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(np.arange(len(levels)))
    ax.set_xticklabels(["make", "+ body type", "+ model", "+ year (class)"][: len(levels)]
                       if levels == ["make", "type", "model", "year"][: len(levels)] else levels)
    ax.set(ylim=(0, 1.1), ylabel="1-NN accuracy (95% CI)")
    if len(stages) > 1:
        ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or "accuracy per hierarchy level (same 1-NN)")
    fig.tight_layout()
    return fig


def confusion_structure_figure(structures: dict[str, pd.DataFrame], n_queries: dict[str, int], *, title: str = ""):
    """One horizontal bar per stage: the share of queries correct and wrong by kind of confusion.

    ``structures``: {stage: :func:`vericar.analyses.errors.confusion_structure` table};
    ``n_queries``: {stage: number of queries}.
    """
    stages = list(structures)
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.7 * len(stages)))
    for y, stage in enumerate(stages):
        s = structures[stage].set_index("kind")["errors"]
        n = n_queries[stage]
        parts = [("correct", n - int(s.sum()))] + [(k, int(v)) for k, v in s.items()]
        left = 0.0
        for kind, count in parts:
            share = count / n if n else 0.0
            ax.barh(y, share, left=left, color=_KIND_COLOURS.get(kind, "0.5"), edgecolor="white",
                    label=kind if y == 0 else None)
            if share >= 0.04:
                ax.text(left + share / 2, y, f"{share:.0%}", ha="center", va="center", fontsize=8, color="white")
            left += share
    ax.set_yticks(range(len(stages)))
    ax.set_yticklabels(stages)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of queries")
    ax.legend(ncol=5, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(title or "what the nearest neighbour is, when it is not the right class", pad=26)
    fig.tight_layout()
    return fig


def size_effect_figure(class_sizes: pd.DataFrame, class_bins: pd.DataFrame, image_bins: pd.DataFrame, *,
                       image_label: str = "image width (px)", seed: int = 0, title: str = ""):
    """Left: per-class accuracy vs training images (dots) with the pooled accuracy per size bin (95% CI).
    Right: accuracy per bin of the car's pixel width."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.9))
    ax = axes[0]
    rng = np.random.default_rng(seed)
    x = class_sizes["n_train"].to_numpy(dtype=float)
    ax.scatter(x + rng.uniform(-0.3, 0.3, len(x)), class_sizes["accuracy"], s=10, c="#B0B0B0", linewidths=0,
               label="one class")
    mid = (class_bins["lo"] + class_bins["hi"]) / 2
    acc = class_bins["accuracy"].to_numpy(dtype=float)
    err = np.vstack([acc - class_bins["ci_low"], class_bins["ci_high"] - acc])
    ax.errorbar(mid, acc, xerr=[mid - class_bins["lo"], class_bins["hi"] - mid], yerr=err, fmt="o-", color="#4C72B0",
                capsize=3, label="queries pooled per bin")
    ax.set(xlabel="training images of the class", ylabel="1-NN accuracy", ylim=(-0.03, 1.03),
           title="accuracy vs class size")
    ax.legend(fontsize=8)
    ax = axes[1]
    acc = image_bins["accuracy"].to_numpy(dtype=float)
    err = np.vstack([acc - image_bins["ci_low"], image_bins["ci_high"] - acc])
    xb = np.arange(len(image_bins))
    ax.bar(xb, acc, yerr=err, color="#55A868", capsize=3)
    for i, (a, n) in enumerate(zip(acc, image_bins["n"])):
        ax.text(i, 0.02, f"n={n}", ha="center", fontsize=7, color="white")
    ax.set_xticks(xb)
    ax.set_xticklabels(image_bins["label"], fontsize=8)
    ax.set(xlabel=image_label + ", quantile bins", ylabel="1-NN accuracy", ylim=(0, 1.05),
           title="accuracy vs image size")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def claims_figure(claims: pd.DataFrame, *, title: str = ""):
    """Each claim's measured accuracy (95% Wilson CI) next to the claimed value (red cross)."""
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.75 * len(claims)))
    y = np.arange(len(claims))
    acc = claims["accuracy"].to_numpy(dtype=float)
    err = np.vstack([acc - claims["ci_low"].to_numpy(dtype=float), claims["ci_high"].to_numpy(dtype=float) - acc])
    ax.errorbar(acc, y, xerr=err, fmt="o", color="#4C72B0", capsize=3, label="measured (95% CI)")
    ax.scatter(claims["claimed"], y, marker="x", s=60, c="#C44E52", zorder=5, label="claimed")
    labels = [f"{c}\n{_wrap(d, 70)}\n({q} queries, {k} classes)"
              for c, d, q, k in zip(claims["claim"], claims["definition"], claims["queries"], claims["classes"])]
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.02), xlabel="1-NN accuracy")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "claims printed without measuring, measured")
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width))


def confused_pairs_figure(cars, examples: pd.DataFrame, *, size: float = 2.6, title: str = ""):
    """One row per confused pair (:func:`vericar.analyses.errors.pair_examples`): the query, its wrong nearest
    neighbour and the nearest database image of its own class, titled with class names and distances."""
    names = cars.class_names
    images, titles = [], []
    for e in examples.itertuples():
        images.append(tuple(cars.image(int(i)) if i >= 0 else cars.image(int(e.query))
                            for i in (e.query, e.neighbour, e.true_example)))
        titles += [f"query:\n{names[e.true_class][:36]}",
                   f"wrong 1-NN, distance {e.distance:.2f}:\n{names[e.pred_class][:36]}",
                   f"nearest of its own class, distance {e.true_distance:.2f}" if e.true_example >= 0
                   else "no other image of its class"]
    fig = pair_grid(images, titles, size=size, title=title or "most confused pairs: query, wrong neighbour, own class")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def near_duplicate_errors_figure(cars, explained: pd.DataFrame, n: int = 4, *, size: float = 2.8, title: str = ""):
    """The first ``n`` errors that are label noise (:func:`vericar.analyses.errors.near_duplicate_errors`'
    table): each query beside its nearest neighbour, the same photo filed under another class."""
    shown = explained.head(n)
    fig = pair_grid([(cars.image(int(r.query)), cars.image(int(r.neighbour))) for r in shown.itertuples()],
                    [t for r in shown.itertuples() for t in (f"query:\n{r.true_class_name[:40]}",
                                                             f"1-NN, distance {r.distance:.2f}:\n{r.pred_class_name[:40]}")],
                    size=size, title=title or "errors that are label noise: the same photo under two classes")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig
