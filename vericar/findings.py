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
def nb01(result: dict[str, Any]) -> str:
    """Notebook 01: the data's size, balance, hierarchy, image sizes and the photos filed twice."""
    m = result["metrics"]
    name = result.get("dataset_name") or result.get("dataset")
    cross_class, pairs = m.get("near_duplicates_cross_class", 0), m.get("near_duplicate_pairs", 0)
    dup = (f"{pairs} pairs of images are the same photo, {cross_class} of them filed under two different classes"
           if cross_class else f"{pairs} pairs of images are the same photo, none filed under two different classes")
    lines = [f"**{name} holds {m['images']:,} images of {m['classes']} car models from {m['makes']} makes; {dup} "
             f"(dHash within {result.get('near_duplicate_bits', '?')} bits).**", "",
             f"- Data: {_data_words_01_04(result.get('dataset'))} ({name}, {result.get('device')}): "
             f"{m['train_images']:,} training and {m['test_images']:,} test images, {m['types']} body types, "
             f"{m['years']} model years.",
             f"- Balance: {m['train_per_class_min']:.0f} to {m['train_per_class_max']:.0f} training images per class "
             f"(median {m['train_per_class_median']:.0f}, Gini {m['train_per_class_gini']:.3f}"
             + (": close to balanced)." if m["train_per_class_gini"] < 0.1 else ": unbalanced, per-class numbers matter)."),
             f"- Images: median {m['median_width']:.0f} x {m['median_height']:.0f} px as used; "
             f"{m['unreadable_images']} unreadable."]
    leak = m.get("near_duplicates_cross_split", 0)
    lines.append(f"- Duplicates: {leak} of the {pairs} pairs straddle train and test (a small leak between the "
                 f"protocols' sets); {cross_class} under different classes are label noise that caps the accuracy any model can reach."
                 if pairs else "- Duplicates: none found.")
    if "reference_reference_pairs" in m:
        lines.append(f"- Against the folder's reference list of {m['reference_reference_pairs']} pairs, the hash check "
                     f"recovers {m['reference_recovered']} and misses {m['reference_missed']}; it finds "
                     f"{m['reference_extra']} more.")
    return "\n".join(lines) + "\n"



# --- 02 · the gradient bug -----------------------------------------------------------------------------------
def _p1_02(e: dict[str, Any]) -> str:
    """A variant's P@1 with its 95% interval: the entry's ``precision_at_1_ci``, else Wilson over ``n_queries``."""
    m = e.get("metrics", {})
    ci = e.get("precision_at_1_ci")
    if ci:
        return f"{pct(m.get('precision_at_1'))} (95% CI {100 * ci[0]:.1f}-{pct(ci[1])})"
    return _with_ci_01_04(m.get("precision_at_1"), m.get("n_queries"))


def _flat_02(e: dict[str, Any], ref: dict[str, Any] | None) -> bool:
    """The run's loss moved by less than a quarter of the reference's relative change (first to last epoch)."""
    def change(x: dict[str, Any]) -> float:
        m = x.get("metrics", {})
        return abs(m.get("loss_last", 0) - m.get("loss_first", 0)) / max(abs(m.get("loss_first") or 0), 1e-12)
    return ref is not None and change(e) < 0.25 * change(ref)


def nb02(result: dict[str, Any]) -> str:
    """Notebook 02: does the write-up's "severed graph" explain the seed's 0.20%, or do the labels it read?

    The headline judges the write-up's "wrong" loop by its one-batch gradient verdict and its trained P@1 beside
    the reference's; the bullets give the accumulations that really cut the graph, the corrupted test labels
    (beside the seed's 0.20% and 1,103 "classes") and every other suspect's verdict with its reason.
    """
    by = {e.get("variant"): e for e in result.get("entries", [result])}
    ref, wl, ct = by.get("ms"), by.get("accum:writeup_wrong_loop"), by.get("corrupted_test_labels")
    seed_claim = pct(SEED_CLAIMS["buggy_precision_at_1"], 2)
    if wl is not None and ref is not None:
        holds = wl.get("gradient_verdict") != "same gradient as pml"
        cos = wl["metrics"].get("grad_cosine_with_pml")
        grad = {"same gradient as pml": "pml's own gradient", "no gradient reaches the model": "no gradient at all",
                "raises": "an error", "different gradient": "a gradient other than pml's"}.get(
                    wl.get("gradient_verdict"), str(wl.get("gradient_verdict")))
        grad += "" if cos is None else f" (cosine {cos:.6f} with pml's)"
        first = (f"**The write-up's diagnosis {'holds' if holds else 'does not hold'} here: its \"wrong\" loop "
                 f"`loss = loss + sample_loss` gives {grad} on one batch and trains to P@1 {pct(wl['metrics'].get('precision_at_1'))} "
                 f"against the reference's {pct(ref['metrics'].get('precision_at_1'))} ({wl.get('verdict')}; {label(ref)}).**")
    elif ct is not None:
        first = (f"**A correctly trained model scores {pct(ct['metrics']['accuracy_corrupted_labels'], 2)} against labels read "
                 f"from the unlabelled test file ({label(ct)}), near the seed's {seed_claim}.**")
    else:
        first = f"**The reference trains to P@1 {_p1_02(ref) if ref else 'n/a'} ({label(ref) if ref else 'no reference'}).**"
    lines = [first, ""]
    if ref is not None:
        lines.append(f"- Reference (pml Multi-Similarity, class-balanced batches, true labels, {ref.get('mode')}): P@1 "
                     f"{_p1_02(ref)} after {ref.get('epochs')} epochs, frozen backbone "
                     f"{pct(ref['metrics'].get('frozen_precision_at_1'))} ({label(ref)}).")
    cut = [e for e in by.values() if e.get("gradient_verdict") == "no gradient reaches the model"]
    if cut:
        lines.append("- Accumulations that really cut the graph (" + ", ".join(e["variant"] for e in cut) + "): "
                     + "; ".join(f"{e['variant']} {e['verdict']}, P@1 {pct(e['metrics'].get('precision_at_1'))}, loss "
                                 f"{e['metrics'].get('loss_first', float('nan')):.3f} -> {e['metrics'].get('loss_last', float('nan')):.3f}"
                                 for e in cut)
                     + (": a cut graph leaves the loss flat, it does not give \"stuck while the loss decreased\"."
                        if all(_flat_02(e, ref) for e in cut) else "."))
    if ct is not None:
        m = ct["metrics"]
        lines.append(f"- Labels read from the unlabelled test file ({label(ct)}): {m['pseudo_classes']:,} \"classes\" on "
                     f"{m['test_images']:,} test images (the seed reported 1,103); the reference model scores "
                     f"{pct(m['accuracy_corrupted_labels'], 2)} against them and {pct(m['accuracy_true_labels'])} against the "
                     f"true labels; a perfect model would score {pct(m['oracle_corrupted'], 2)}. So a near-zero score like the "
                     f"seed's {seed_claim} is consistent with these labels, whatever the loss code.")
    cl = by.get("corrupt_labels")
    if cl is not None and cl["metrics"].get("precision_at_1") is not None:
        m = cl["metrics"]
        lines.append(f"- Training on those labels: {cl['verdict']}, P@1 {_p1_02(cl)} (frozen backbone "
                     f"{pct(m.get('frozen_precision_at_1'))}) while the training loss went from {m.get('loss_first', 0):.3f} "
                     f"to {m.get('loss_last', 0):.3f}.")
    others = [by[n] for n in ("shuffle", "seed_hier_clamp", "hims_min", "finetune_eval_augment", "accum:inplace_leaf")
              if n in by]
    if others:
        lines.append("- Other suspects, each judged against its reference's 95% interval: "
                     + "; ".join(f"{e['variant']}: {e['verdict']} ({e.get('reason')})" for e in others) + ".")
    lines.append(f"- Data: {_data_words_01_04((ref or ct or {}).get('dataset'))}; \"no change\" means inside the "
                 "reference's interval, not proven equal.")
    return "\n".join(lines) + "\n"



# --- 03 · training ----------------------------------------------------------------------------------------------
def _wilson_01_04(p: float | None, n: int | None, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson interval of a rate ``p`` measured on ``n`` queries (None when either is missing)."""
    if p is None or not n:
        return None
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def _with_ci_01_04(p: float | None, n: int | None) -> str:
    """``"77.7% (95% CI 76.7-78.6%)"``: a rate with its Wilson interval over ``n`` queries."""
    ci = _wilson_01_04(p, n)
    return pct(p) if ci is None else f"{pct(p)} (95% CI {100 * ci[0]:.1f}-{pct(ci[1])})"


def _data_words_01_04(dataset: str | None) -> str:
    """How the data is named in words: SynthCars is said to be synthetic."""
    return "SynthCars (synthetic images, not real cars)" if dataset == "synthetic" else "real Stanford Cars 196"


def nb03(result: dict[str, Any]) -> str:
    """Notebook 03: frozen backbone vs trained model per protocol, 1-NN precision with Wilson intervals.

    The headline is the ``official`` protocol's entry (else the first); the seed's claim (72.45% on its 80/20
    split, ResNet50 @ 224 px) is set beside our ``seed`` entry when there is one.
    """
    entries = result.get("entries", [result])
    head = next((e for e in entries if e.get("protocol") == "official"), entries[0])

    def gain(e: dict[str, Any]) -> tuple[str, str]:
        m, f = e["metrics"], e["frozen_metrics"]
        n = m.get("n_queries")
        t, fr = _wilson_01_04(m["precision_at_1"], n), _wilson_01_04(f["precision_at_1"], f.get("n_queries", n))
        if t is None or fr is None:
            verdict = "no interval to judge by"
        elif t[0] > fr[1]:
            verdict = "a clear gain, the intervals do not overlap"
        elif fr[0] > t[1]:
            verdict = "training made it worse, the intervals do not overlap"
        else:
            verdict = "no clear difference, the intervals overlap"
        return (f"{_with_ci_01_04(m['precision_at_1'], n)} trained vs {_with_ci_01_04(f['precision_at_1'], n)} "
                f"with the frozen backbone", verdict)

    hm = head["metrics"]
    lines = [f"**Training ({head.get('mode', 'the recipe')}, {head.get('loss')} loss, {head.get('epochs')} epochs) "
             f"takes 1-NN precision on protocol {head['protocol']} from {pct(head['frozen_metrics']['precision_at_1'])} "
             f"(frozen backbone) to {_with_ci_01_04(hm['precision_at_1'], hm.get('n_queries'))} ({label(head)}).**", ""]
    for e in entries:
        numbers, verdict = gain(e)
        what = "Recall@1, leave-one-out among unseen classes" if e["protocol"] == "zero-shot" else "1-NN precision"
        lines.append(f"- {label(e)}: {what} {numbers}: {verdict}; MAP@R {pct(e['metrics'].get('map_at_r'))} "
                     f"(frozen {pct(e['frozen_metrics'].get('map_at_r'))}), make right {pct(e['metrics'].get('accuracy_make'))}, "
                     f"{e['metrics'].get('train_seconds', 0):,.0f} s of training.")
    seed = next((e for e in entries if e.get("protocol") == "seed"), None)
    if seed is not None:
        claim = SEED_CLAIMS["seed_precision_at_1"]
        ci = _wilson_01_04(seed["metrics"]["precision_at_1"], seed["metrics"].get("n_queries"))
        where = ("no interval to compare it with" if ci is None else "inside our 95% interval: no evidence of a difference"
                 if ci[0] <= claim <= ci[1] else "above our 95% interval: the seed did better" if claim > ci[1]
                 else "below our 95% interval: ours did better")
        lines.append(f"- Beside the seed's claim: it reported {pct(claim, 2)} 1-NN accuracy on its own 80/20 split with "
                     f"ResNet50 @ 224 px on full images; ours on protocol seed is {pct(seed['metrics']['precision_at_1'])} "
                     f"({label(seed)}), the claim is {where}. Different backbone, input and data, so a rough comparison.")
    lines.append(f"- Data: {_data_words_01_04(head.get('dataset'))}; intervals are 95% Wilson intervals over the "
                 "queries (they ignore that queries of one class are correlated, so they are if anything too narrow).")
    return "\n".join(lines) + "\n"



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
