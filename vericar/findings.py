"""What each notebook found, in words: Markdown built from the notebook's results JSON (``results/NN_name.json``).

A notebook's closing cell only displays ``findings("NN", read_results(...))``; the README quotes the first line
(the headline) of each; a test checks that every published notebook shows exactly what these functions build
from the committed results. Each function reads only the results dict (no model, no data), so the words can
never drift from the numbers. Where the re-implementation this study follows made a claim, it stands beside ours
(:data:`SEED_CLAIMS`).
"""

from __future__ import annotations

from typing import Any, Callable

# The re-implementation's claims (its README), quoted beside our numbers. Stanford Cars 196, ResNet50, 224 px.
SEED_CLAIMS: dict[str, float] = {
    "seed_precision_at_1": 0.7245,   # 1-NN accuracy, its 80/20 split of the training images
    "heldout_fpr95": 0.2872,         # KNN+ on its held-out car models
    "heldout_auroc": 0.9310,
    "buggy_precision_at_1": 0.0020,  # the "gradient bug" run
}

#: The figure the README shows beside each notebook's headline (files in figures/).
KEY_FIGURES: dict[str, str] = {
    "01": "01_sample_grid.png", "02": "02_final_precision.png", "03": "03_frozen_vs_trained.png",
    "04": "04_umap_before_after.png", "05": "05_level_accuracy.png", "06": "06_ssb_roc.png",
    "07": "07_difference_from_ms.png", "08": "08_examples.png",
}


def pct(x: float | None, digits: int = 1) -> str:
    """A rate as a percentage ("72.4%"); "n/a" for a missing value."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def label(entry: dict[str, Any]) -> str:
    """What a number was measured on: dataset, protocol, backbone @ input size, device (from a results entry)."""
    parts = [entry.get("dataset"), entry.get("protocol"),
             f"{entry['backbone']} @ {entry['image_size']} px" if entry.get("backbone") else None, entry.get("device")]
    return ", ".join(str(p) for p in parts if p)


# Each notebook's function: ``nbNN(result) -> str``, Markdown whose first line is a one-sentence headline in bold.
# --- 01 · the data -------------------------------------------------------------------------------------------


# --- 02 · the gradient bug -----------------------------------------------------------------------------------


# --- 03 · training ----------------------------------------------------------------------------------------------


# --- 04 · embeddings and UMAP --------------------------------------------------------------------------------------


# --- 05 · error analysis ----------------------------------------------------------------------------------------


# --- 06 · out-of-distribution and open-set -----------------------------------------------------------------------


# --- 07 · hierarchy ablation --------------------------------------------------------------------------------------


# --- 08 · identify a car -------------------------------------------------------------------------------------------


def findings(notebook: str, result: dict[str, Any]) -> str:
    """The closing "what we found" Markdown of notebook ``notebook`` ("01".."08") from its results dict."""
    fn: Callable[[dict[str, Any]], str] | None = globals().get(f"nb{notebook[:2]}")
    if fn is None:
        raise KeyError(f"no findings for notebook {notebook!r}; known: {sorted(k[2:] for k in globals() if k.startswith('nb') and k[2:].isdigit())}")
    return fn(result)


def headline(notebook: str, result: dict[str, Any]) -> str:
    """The first line of :func:`findings` (the README's one-line summary of the notebook)."""
    return findings(notebook, result).strip().splitlines()[0]
