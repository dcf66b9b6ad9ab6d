"""EDA figures (notebook 01)."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["class_count_figure", "level_count_figure", "size_figure", "image_grid", "hierarchy_figure", "pair_grid"]


# -- EDA ---------------------------------------------------------------------------------------------------

def class_count_figure(counts: pd.DataFrame, title: str = ""):
    """Images per class, sorted, train and test stacked, coloured bars; the imbalance at a glance."""
    c = counts.sort_values("n_total", ascending=False).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(12, 3.6))
    x = np.arange(len(c))
    ax.bar(x, c["n_train"], width=1.0, color="#4C72B0", label="train")
    ax.bar(x, c["n_test"], bottom=c["n_train"], width=1.0, color="#DD8452", label="test")
    ax.set_xlim(-0.5, len(c) - 0.5)
    ax.set_xlabel(f"class (sorted by image count; {len(c)} classes)")
    ax.set_ylabel("images")
    ax.set_xticks([])
    ax.legend(loc="upper right")
    ax.set_title(title or "Images per class")
    return fig


def level_count_figure(levels: dict[str, pd.DataFrame], title: str = ""):
    """Images (bars) and classes (annotations) per make, body type and model year."""
    fig, axes = plt.subplots(1, 3, figsize=(15, max(4, 0.22 * len(levels["make"]))),
                             gridspec_kw={"width_ratios": [1.4, 1, 1]})
    for ax, level in zip(axes, ("make", "type", "year")):
        df = levels[level]
        if level == "year":
            df = df.sort_index(ascending=False)
        ax.barh([str(i) for i in df.index], df["images"], color=sns.color_palette("crest", 3)[1])
        for y, (n_img, n_cls) in enumerate(zip(df["images"], df["classes"])):
            ax.text(n_img, y, f" {n_cls}", va="center", fontsize=7, color="0.3")
        ax.invert_yaxis()
        ax.set_title(f"images per {level} (label: classes)")
        ax.tick_params(axis="y", labelsize=8 if len(df) > 30 else 9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def size_figure(scan: pd.DataFrame, table: pd.DataFrame):
    """Image width/height and aspect ratio distributions (as used, after cropping), by split."""
    df = scan.assign(split=table["split"].to_numpy())
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    sns.scatterplot(df.sample(min(len(df), 4000), random_state=0), x="width", y="height", hue="split", s=8,
                    alpha=0.5, ax=axes[0], linewidth=0)
    axes[0].set_title("image size (px)")
    sns.histplot(df, x="aspect", hue="split", bins=60, element="step", ax=axes[1])
    axes[1].set_title("aspect ratio (width / height)")
    fig.tight_layout()
    return fig


def image_grid(images: Sequence, titles: Sequence[str] = (), ncols: int = 8, size: float = 1.9, title: str = ""):
    """A grid of PIL images with small titles."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 0.8), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, im in enumerate(images):
        ax = axes.ravel()[i]
        ax.imshow(im)
        if i < len(titles):
            ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def hierarchy_figure(hierarchy: pd.DataFrame, title: str = ""):
    """The label hierarchy as a make x body-type matrix: how many models (classes) each make has per type."""
    m = pd.crosstab(hierarchy["make"], hierarchy["type"])
    m = m.loc[m.sum(axis=1).sort_values(ascending=False).index, m.sum(axis=0).sort_values(ascending=False).index]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * m.shape[1], 1.0 + 0.22 * m.shape[0]))
    sns.heatmap(m.replace(0, np.nan), annot=True, fmt=".0f", cmap="crest", cbar=False, linewidths=0.5,
                linecolor="white", ax=ax, annot_kws={"fontsize": 7})
    ax.set_xlabel("body type")
    ax.set_ylabel("make")
    ax.tick_params(axis="y", labelsize=7 if m.shape[0] > 30 else 9)
    ax.set_title(title or "classes per make and body type (each class = model + year)")
    return fig


def pair_grid(pairs: Sequence[tuple], titles: Sequence[str] = (), size: float = 2.2, title: str = ""):
    """Rows of image pairs (e.g. near-duplicates, or query vs wrong neighbour)."""
    n = len(pairs)
    k = len(pairs[0]) if n else 2
    fig, axes = plt.subplots(n, k, figsize=(k * size, n * size * 0.75), squeeze=False)
    for r, row in enumerate(pairs):
        for c, im in enumerate(row):
            ax = axes[r, c]
            ax.imshow(im)
            ax.axis("off")
            if r * k + c < len(titles):
                ax.set_title(titles[r * k + c], fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
