"""Identification figures (notebook 08): each photo beside its nearest database images, with the answer."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt

__all__ = ["identification_figure"]

_RIGHT, _WRONG, _UNKNOWN = "#2E7D32", "#C62828", "#DD8452"


def _answer_text(answer: dict, truth: str | None) -> str:
    levels = "\n".join(f"{lv}: {a['answer']} ({a['confidence']:.0%})" for lv, a in answer["levels"].items())
    flag = "known" if answer["known"] else "UNKNOWN car"
    head = f"true: {truth}\n" if truth else ""
    return f"{head}{levels}\n{flag} (score {answer['score']:.3f} vs {answer['threshold']:.3f})"


def identification_figure(photos, answers, neighbour_images, truths=None, size: float = 2.2, width: int = 24,
                          title: str = ""):
    """One row per photo: the photo with the answer per level, its confidence and the unknown flag, then its
    nearest database images titled with class name and distance.

    ``neighbour_images[i]`` are the images of ``answers[i]["neighbours"]``; ``truths`` (optional) the true
    class names: the answer's title is green when right, red when wrong, orange when flagged unknown.
    """
    n, k = len(photos), max(len(a["neighbours"]) for a in answers)
    fig, axes = plt.subplots(n, k + 2, figsize=((k + 2) * size, n * size * 0.85), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.1] + [1] * k})
    for ax in axes.ravel():
        ax.axis("off")
    for i, (photo, answer) in enumerate(zip(photos, answers)):
        truth = truths[i] if truths is not None else None
        colour = _UNKNOWN if not answer["known"] else (_RIGHT if truth in (None, answer["class_name"]) else _WRONG)
        axes[i, 0].imshow(photo)
        axes[i, 0].set_title(textwrap.fill(answer["class_name"], width), fontsize=7, color=colour)
        axes[i, 1].text(0, 0.5, _answer_text(answer, truth), fontsize=6.5, va="center", color=colour,
                        transform=axes[i, 1].transAxes)
        for j, (image, nb) in enumerate(zip(neighbour_images[i], answer["neighbours"])):
            axes[i, j + 2].imshow(image)
            axes[i, j + 2].set_title(textwrap.fill(f"{nb['class_name']} (d {nb['distance']:.3f})", width),
                                     fontsize=6.5)
    fig.suptitle(title or "Photos, the answer per level, and the nearest database images")
    fig.tight_layout()
    return fig
