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
def _wilson_01_04(p: float | None, n: int | None) -> tuple[float, float] | None:
    """95% Wilson interval of a rate ``p`` measured on ``n`` queries (None when either is missing); the rate is
    a share of queries, so ``p * n`` successes (vericar.metrics.wilson_interval, statsmodels)."""
    if p is None or not n:
        return None
    from .metrics import wilson_interval

    return wilson_interval(int(round(p * n)), int(n))


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
_LEVEL_WORDS_04 = {"make": "make", "type": "make + body type", "model": "model", "year": "exact class"}


def _change_04(before: float | None, after: float | None, tol: float = 0.005) -> str:
    """A rate's change from the frozen backbone to the trained model, in words."""
    if before is None or after is None:
        return f"is {pct(after)} after training (frozen backbone {pct(before)})"
    if abs(after - before) <= tol:
        return f"stays at about {pct(after)} (frozen backbone {pct(before)})"
    return f"{'rises' if after > before else 'falls'} from {pct(before)} with the frozen backbone to {pct(after)} after training"


def nb04(result: dict[str, Any]) -> str:
    """Notebook 04: neighbourhood purity and silhouette of the query images, frozen backbone -> trained, per
    level; the training images beside them; the held-out cars of the open-world model. Means over the images,
    no interval (an image's neighbours are shared with other images', so they are not independent)."""
    m, where = result["metrics"], label(result)
    k = result.get("purity_k", "k")

    def q(stage: str, level: str, set_name: str = "query") -> float | None:
        return m.get(f"purity_{set_name}_{stage}_{level}")

    f_y, t_y, f_m, t_m = q("frozen", "year"), q("trained", "year"), q("frozen", "make"), q("trained", "make")
    note = "On SynthCars (synthetic data), among" if result.get("dataset") == "synthetic" else "Among"
    lines = [f"**{note} each test image's {k} nearest neighbours, the share of the same exact class "
             f"{_change_04(f_y, t_y)} (chance {pct(m.get('purity_query_chance_year'))}); of the same make, from "
             f"{pct(f_m)} to {pct(t_m)} ({where}).**", ""]
    setting = ", ".join(str(x) for x in (result.get("setting"), result.get("loss") and f"{result['loss']} loss",
                                         result.get("epochs") and f"{result['epochs']} epochs") if x)
    levels = [lv for lv in _LEVEL_WORDS_04 if q("trained", lv) is not None]
    lines.append(f"- Per level, query images ({where}{'; ' + setting if setting else ''}), purity frozen -> trained "
                 "(chance; silhouette frozen -> trained): " + "; ".join(
                     f"{_LEVEL_WORDS_04[lv]} {pct(q('frozen', lv))} -> {pct(q('trained', lv))} "
                     f"({pct(m.get(f'purity_query_chance_{lv}'))}; {m.get(f'silhouette_query_frozen_{lv}', float('nan')):+.2f} -> "
                     f"{m.get(f'silhouette_query_trained_{lv}', float('nan')):+.2f})" for lv in levels) + ".")
    sil = m.get("silhouette_query_trained_year")
    if sil is not None:
        lines.append(f"- Clusters: the class-level silhouette after training is {sil:+.2f} (1 would be tight, "
                     "separate clusters, 0 overlapping ones): "
                     + ("the classes are separated clusters." if sil >= 0.5 else
                        "the cars of one class are near each other but the classes are not separate clusters; "
                        "a nearest-neighbour search needs only the first." if t_y is not None
                        and t_y > 2 * (m.get("purity_query_chance_year") or 0) else
                        "the classes overlap, a test image's neighbours are mostly of other classes."))
    d_y = q("trained", "year", "database")
    if d_y is not None and t_y is not None:
        train_words = "training images" if result.get("protocol") == "official" else "database images"
        lines.append(f"- Training images against new ones: among the {train_words} the same-class share is "
                     f"{pct(d_y)} (frozen {pct(q('frozen', 'year', 'database'))}), against {pct(t_y)} for the test "
                     "images: " + ("the gap is how much tighter the model packs what it was trained on than new "
                                   "photos of the same cars (fit, not generalisation)." if d_y - t_y > 0.1
                                   else "new photos are packed about as tightly as the training images."))
    fb, tb = q("frozen", "body_only"), q("trained", "body_only")
    if fb is not None and tb is not None:
        lines.append(f"- Body type alone: {pct(fb)} of a test image's neighbours share it with the frozen backbone "
                     f"(chance {pct(m.get('purity_query_chance_body_only'))}), {pct(tb)} after training: "
                     + ("the ImageNet features already see body shape." if fb > 2 * (m.get("purity_query_chance_body_only") or 1)
                        else "the frozen features barely see it."))
    ho = {s: m.get(f"open_world_{s}_heldout_purity") for s in ("frozen", "trained")}
    if ho["trained"] is not None:
        hc, kc = m.get("open_world_trained_heldout_class_purity"), m.get("open_world_trained_known_class_purity")
        chance = m.get("open_world_heldout_chance")
        lines.append(
            f"- Held-out car models (open-world model, held out by {result.get('open_world_holdout', '?')}, "
            f"{result.get('heldout_classes', '?')} classes): {pct(ho['trained'])} of their neighbours are held-out "
            f"too after training ({pct(ho['frozen'])} frozen, chance {pct(chance)}), {pct(hc)} are of their own "
            f"class, against {pct(kc)} for the known classes: "
            + ("they gather among themselves, if less tightly than the classes trained on, which is what lets "
               "notebook 06 flag them by distance." if ho["trained"] > 2 * (chance or 0) and hc < kc - 0.1 else
               "they gather as tightly as the classes trained on." if hc >= kc - 0.1 else
               "they barely gather more than chance: distance alone will struggle to flag them."))
    n = result.get("n_query")
    lines.append(f"- Evidence: the numbers are means over {f'{n:,} ' if n else ''}test images with k = {k}, measured "
                 f"in the embedding space; no interval is given (neighbourhoods overlap, so the images are not "
                 f"independent). The UMAP maps ({result.get('map_points', '?')} of {result.get('map_images_available', '?')} "
                 "images) are pictures of the same space, not extra evidence.")
    return "\n".join(lines) + "\n"



# --- 05 · error analysis ----------------------------------------------------------------------------------------
def _acc_ci(m: dict[str, Any], level: str) -> str:
    lo, hi = m.get(f"accuracy_{level}_ci_low"), m.get(f"accuracy_{level}_ci_high")
    return _ci([lo, hi]) if lo is not None and hi is not None else ""


def _spearman_words(rho: float | None, p: float | None, what: str) -> str:
    if rho is None or p is None:
        return f"{what}: not measurable here"
    if p >= 0.05:
        return f"{what}: Spearman {rho:+.2f} (p = {p:.2g}), no evidence of a link"
    return f"{what}: Spearman {rho:+.2f} (p = {p:.2g}), accuracy {'rises' if rho > 0 else 'falls'} with it"


def nb05(result: dict[str, Any]) -> str:
    """Notebook 05: 1-NN accuracy per hierarchy level, what the errors are, the hardest groups, size effects,
    label noise and the printed claims, from ``results/05_error_analysis.json``."""
    m, where = result["metrics"], label(result)
    exact = m.get("accuracy_year", m["precision_at_1"])
    shares = {k: m.get(f"errors_share_{k}") for k in ("other_make", "same_make_other_model",
                                                      "same_family_other_body", "same_model_other_year")}
    top_kind = max((k for k in shares if shares[k] is not None), key=lambda k: shares[k], default=None)
    kind_words = {"other_make": "another make", "same_make_other_model": "another model of the same make",
                  "same_family_other_body": "a body-style sibling", "same_model_other_year": "another year of the same model"}
    note = "On SynthCars (synthetic data), the" if result.get("dataset") == "synthetic" else "The"
    head = (f"**{note} trained model's nearest neighbour has the exact class for {pct(exact)} of the "
            f"{result.get('protocol')} queries ({_acc_ci(m, 'year')}), "
            f"{'up' if exact >= m['frozen_precision_at_1'] else 'down'} from {pct(m['frozen_precision_at_1'])} with "
            f"the frozen backbone" + (f"; its most common error is {kind_words[top_kind]} "
                                     f"({pct(shares[top_kind], 0)} of {m['n_errors']} errors).**" if top_kind else ".**"))
    lines = [head, ""]
    levels = [lv for lv in ("make", "type", "model", "year") if f"accuracy_{lv}" in m]
    lines.append(f"- Per level ({where}; 1-NN, 95% Wilson intervals): " + "; ".join(
        f"{lv if lv != 'year' else 'exact class'} {pct(m[f'accuracy_{lv}'])} ({_acc_ci(m, lv)}; frozen "
        f"{pct(m.get(f'frozen_accuracy_{lv}'))})" for lv in levels) + ". The drop from make to exact class is the "
        "fine-grained part.")
    if top_kind:
        frozen = {k: m.get(f"frozen_errors_share_{k}") for k in shares}
        pair = (result.get("confused_pairs") or [None])[0]
        lines.append(f"- What the errors are ({where}), share of errors trained / frozen backbone: " + "; ".join(
            f"{kind_words[k]} {pct(shares[k], 0)} / {pct(frozen[k], 0)}" for k in shares if shares[k] is not None)
            + (f". The most confused pair is {pair['name_a']} / {pair['name_b']} ({pair['errors']} errors, "
               f"{pair['kind']})." if pair else "."))
    overall = m["precision_at_1"]
    worst = []
    for key, name in (("accuracy_per_make", "make"), ("accuracy_per_model", "model")):
        g = (result.get(key) or [None])[0]
        if g:
            side = "below" if g["ci_high"] < overall else "overlapping"
            worst.append(f"worst {name} {g['group']} {pct(g['accuracy'])} ({_ci([g['ci_low'], g['ci_high']])}, "
                         f"n = {g['n']}; interval {side} the overall {pct(overall)})")
    if worst:
        lines.append(f"- Hardest groups ({where}): " + "; ".join(worst) + ".")
    lines.append(f"- Size ({where}): " + _spearman_words(m.get("spearman_class_size_accuracy"),
                                                           m.get("spearman_class_size_p"), "training images per class")
                 + "; " + _spearman_words(m.get("spearman_width_correct"), m.get("spearman_width_p"),
                                          result.get("image_size_measure", "car width")) + ".")
    if "near_duplicates_errors_explained" in m:
        lines.append(f"- Label noise ({where}): {m['near_duplicates_errors_explained']} of {m['near_duplicates_errors']} "
                     f"errors ({pct(m['near_duplicates_explained_share'])}) are the same photo filed under another "
                     f"class; counting them correct gives {pct(m['near_duplicates_accuracy_without_explained'])}.")
    else:
        lines.append("- Label noise: not checked (no near-duplicate list for this data; SynthCars has none).")
    claims = result.get("claims") or []
    if claims:
        lines.append(f"- Claims printed without measuring ({where}): " + "; ".join(
            f"\"{c['claim']}\" ({c['definition']}): {pct(c['accuracy'])} ({_ci([c['ci_low'], c['ci_high']])}), "
            f"{c['verdict']}" for c in claims) + ".")
    return "\n".join(lines[:2 + 6]) + "\n"



# --- 06 · out-of-distribution and open-set -----------------------------------------------------------------------
def _ci(ci: list | None) -> str:
    """A 95% interval as "80.7–84.4%" (empty when missing)."""
    return "" if not ci or None in ci else f"95% CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _data_note(entry: dict[str, Any]) -> str:
    return "On SynthCars (synthetic data), " if entry.get("dataset") == "synthetic" else ""


_HELDOUT_WORDS = {"model": "car models", "year": "model years", "make": "makes"}


def _versus(ci: list | None, value: float, ref: float, lower_is_better: bool = True) -> str:
    """"better than" / "worse than" ``ref`` when the interval (or, without one, the value) clears it,
    "level with" when the interval holds it."""
    lo, hi = (ci if ci and None not in ci else (value, value))
    if lo <= ref <= hi:
        return "level with"
    return "better than" if (hi < ref) == lower_is_better else "worse than"


def _compare_intervals(a_ci: list | None, a: float, b_ci: list | None, b: float) -> str:
    """A (lower is better) against B: "level with" when their intervals (or values, without one) overlap."""
    a_lo, a_hi = a_ci if a_ci and None not in a_ci else (a, a)
    b_lo, b_hi = b_ci if b_ci and None not in b_ci else (b, b)
    if a_lo <= b_hi and b_lo <= a_hi:
        return "level with"
    return "better than" if a_hi < b_lo else "worse than"


def nb06(result: dict[str, Any]) -> str:
    """Notebook 06: KNN+ on held-out cars against the seed's claim, the baselines, the k choice, adding new cars
    without retraining, and the SSB split (where the results have it)."""
    entries = result["entries"]
    det = [e for e in entries if e.get("experiment") == "ood-detection"]
    holdouts = list(dict.fromkeys(e["holdout"] for e in det))
    main_h = result.get("main_holdout") or ("model" if "model" in holdouts else holdouts[0])
    by = {(e["holdout"], e["method"]): e for e in det}
    knn = by[(main_h, "knn_plus")]
    m, ci = knn["metrics"], knn.get("fpr95_ci95")
    claim = result.get("seed_claim") or {"fpr95": SEED_CLAIMS["heldout_fpr95"], "auroc": SEED_CLAIMS["heldout_auroc"]}
    target = result.get("target") or {"fpr95": 0.20, "auroc": 0.95}
    what = _HELDOUT_WORDS.get(main_h, f"held out by {main_h}")
    lines = [f"**{_data_note(knn)}KNN+ on the trained embeddings still accepts {pct(m['fpr95'])} of the cars from "
             f"held-out {what} as known at 95% TPR (FPR95, {_ci(ci)}; AUROC {pct(m['auroc'])}), "
             f"{_versus(ci, m['fpr95'], claim['fpr95'])} the seed's claimed FPR95 {pct(claim['fpr95'], 2)} / "
             f"AUROC {pct(claim['auroc'], 2)}.**", ""]
    met = m["fpr95"] <= target["fpr95"] and m["auroc"] >= target["auroc"]
    lines.append(f"- Measured on {label(knn)}: {knn.get('n_ood')} unknown test queries of {knn.get('heldout_classes')} "
                 f"held-out classes against {knn.get('n_id')} known ones, k = {knn.get('k')} chosen on a validation "
                 f"split of the known classes. The target (FPR95 at most {pct(target['fpr95'], 0)}, AUROC at least "
                 f"{pct(target['auroc'], 0)}) is {'met' if met else 'not met'}; the seed's claim was made on its own "
                 "held-out split with a ResNet-50 at 224 px, so the comparison is of settings as much as of methods.")
    parts = []
    for method in ("nn1_raw", "knn_plus_frozen", "msp_frozen"):
        e = by.get((main_h, method))
        if e is None:
            continue
        lo_hi = e.get("fpr95_ci95")
        v = {"level with": "level with KNN+ (the intervals overlap)", "better than": "KNN+ is better",
             "worse than": "KNN+ is worse"}[_compare_intervals(ci, m["fpr95"], lo_hi, e["metrics"]["fpr95"])]
        parts.append(f"{e.get('method_name', method)}: FPR95 {pct(e['metrics']['fpr95'])} ({_ci(lo_hi)}), "
                     f"AUROC {pct(e['metrics']['auroc'])}, {v}")
    if parts:
        lines.append(f"- Baselines on the same queries ({label(knn)}): " + "; ".join(parts) + ".")
    sweep = [r for r in result.get("k_sweep", []) if r["holdout"] == main_h and r["features"] == "trained"]
    test = [r for r in sweep if r["on"] == "test"]
    val = [r for r in sweep if r["on"] == "validation" and r["k"] == knn.get("k")]
    if test and val:
        best = min(test, key=lambda r: r["fpr95"])
        lines.append(f"- Choosing k: at k = {knn.get('k')} the validation split (pseudo-unknown classes that were "
                     f"seen in training) gives FPR95 {pct(val[0]['fpr95'])}, the never-seen test cars "
                     f"{pct(m['fpr95'])}. The best k in hindsight on the test sweep (k = {best['k']}, not a result) "
                     f"would give {pct(best['fpr95'])}, {100 * (m['fpr95'] - best['fpr95']):.1f} points better: "
                     + ("tuning k is not what is missing." if m["fpr95"] - best["fpr95"] < 0.05
                        else "the honest choice of k leaves a real margin on the table."))
    if len(holdouts) > 1:
        lines.append(f"- Per holdout, KNN+ FPR95 / AUROC ({label(knn)}, other holdouts trained with the same recipe): "
                     + "; ".join(f"held out by {h} {pct(by[(h, 'knn_plus')]['metrics']['fpr95'])} / "
                                 f"{pct(by[(h, 'knn_plus')]['metrics']['auroc'])}" for h in holdouts
                                 if (h, "knn_plus") in by) + ".")
    add = {e["shots"]: e for e in entries if e.get("experiment") == "add-without-retraining" and e["holdout"] == main_h}
    if "all" in add:
        a = add["all"]["metrics"]
        few = "; ".join(f"{s} per class {pct(add[s]['metrics']['new_precision_at_1'])}" for s in add if s != "all")
        lines.append(f"- Adding the held-out cars' labelled images to the database without retraining ({label(add['all'])}): "
                     f"with all {add['all'].get('n_added_mean', 0):.0f} of them, {pct(a['new_precision_at_1'])} of the "
                     f"new cars' test queries are named right (1-NN; {few or 'no few-shot runs'}), while known-class "
                     f"P@1 goes from {pct(a['known_precision_at_1_before'])} to {pct(a['known_precision_at_1_after'])}.")
    goal = result.get("open_set_target") or {}
    held = [e for e in entries if e.get("experiment") == "open-set-scores" and e.get("chosen_on_validation")]
    if held:
        e = held[0]
        hm = e["metrics"]
        bar = ""
        if {"heldout_auroc", "heldout_fpr95"} <= set(goal):
            parts = (f"AUROC at least {pct(goal['heldout_auroc'], 0)}", f"FPR95 at most {pct(goal['heldout_fpr95'], 0)}")
            ok = (hm["auroc"] >= goal["heldout_auroc"], hm["fpr95"] <= goal["heldout_fpr95"])
            bar = ("; the target (" + " with ".join(parts) + ") is " + ("met" if all(ok) else "not met") +
                   ("" if all(ok) or not any(ok) else f": {parts[ok.index(True)]} is met, "
                                                       f"{parts[ok.index(False)]} is not"))
        lines.append(f"- Of every score on the same held-out {what} ({label(e)}), the one chosen on a validation model "
                     f"(never shown its queries or unknowns; validation AUROC {pct(e['validation_auroc'])}) is "
                     f"{e.get('method_name', e['method'])}: AUROC {pct(hm['auroc'])} ({_ci(e.get('auroc_ci95'))}), "
                     f"FPR95 {pct(hm['fpr95'])}{bar}.")
    ssb = [e for e in entries if e.get("experiment") == "ssb-open-set"]
    if ssb:
        chosen = [e for e in ssb if e["unknown"] == "easy" and e.get("chosen_on_validation")]
        easy = chosen[0] if chosen else max((e for e in ssb if e["unknown"] == "easy"), key=lambda e: e["metrics"]["auroc"])
        hard = next(e for e in ssb if e["unknown"] == "hard (medium+hard)" and e["method"] == easy["method"])
        how = ("the score chosen on a validation model" if chosen else
               "the best score on Easy unknowns (in hindsight: no validation model chose it)")
        bar = ""
        if {"ssb_easy_auroc", "ssb_hard_auroc"} <= set(goal):
            ok = [easy["metrics"]["auroc"] >= goal["ssb_easy_auroc"], hard["metrics"]["auroc"] >= goal["ssb_hard_auroc"]]
            bar = (f" The targets (Easy at least {pct(goal['ssb_easy_auroc'], 0)}, Hard at least "
                   f"{pct(goal['ssb_hard_auroc'], 0)}) are met on " +
                   {(True, True): "both", (False, True): "Hard only", (True, False): "Easy only",
                    (False, False): "neither"}[tuple(ok)] + ".")
        lines.append(f"- On the field's SSB split ({label(easy)}), {how} is "
                     f"{easy.get('method_name', easy['method'])}: AUROC {pct(easy['metrics']['auroc'])} "
                     f"({_ci(easy.get('auroc_ci95'))}) on Easy, {pct(hard['metrics']['auroc'])} "
                     f"({_ci(hard.get('auroc_ci95'))}) on Hard (Medium + Hard), closed-set accuracy "
                     f"{pct(easy['metrics']['closed_set_accuracy'])}; the split's authors report roughly 94% / 82% "
                     "for a ResNet-50 at 448 px trained for 600 epochs, not a like-for-like comparison." + bar)
    return "\n".join(lines) + "\n"


# --- 07 · hierarchy ablation --------------------------------------------------------------------------------------
def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def _diff_ci(lo: float, hi: float) -> str:
    """A 95% interval of a difference of rates, in percentage points."""
    return f"95% CI {100 * lo:+.1f} to {100 * hi:+.1f} points"


def nb07(result: dict[str, Any]) -> str:
    """Notebook 07: MS against HiMS-Min / HiMS-Max per protocol and level, paired on the same queries, with the
    Holm-adjusted verdict; the held-out models' make."""
    entries = result["entries"]
    alpha = result.get("alpha", 0.05)
    comps = [dict(c, loss_name=e.get("loss_name", e["loss"])) for e in entries for c in e.get("vs_ms", [])
             if c.get("diff") is not None]  # a paired difference is null where a level had no query (tiny runs)
    better = [c for c in comps if c["verdict"] == "better"]
    worse = [c for c in comps if c["verdict"] == "worse"]
    note = "On SynthCars (synthetic data), " if entries and entries[0].get("dataset") == "synthetic" else ""
    if comps:
        top = max(comps, key=lambda c: c["diff"])
        top_words = (f"{top['loss_name']} {_points(top['diff'])} at {top['panel']}/{top['level']} "
                     f"({_diff_ci(top['ci_low'], top['ci_high'])}, Holm p {top['p_holm']:.2g})")
        if better:
            head = (f"**{note}a hierarchical loss beats flat MS significantly at {len(better)} of {len(comps)} "
                    f"(protocol, level) comparisons (Holm-adjusted, alpha {alpha}); the largest gain is {top_words}.**")
        else:
            head = (f"**{note}neither HiMS variant is significantly better than flat MS at any of {len(comps)} "
                    f"(protocol, level) comparisons (Holm-adjusted, alpha {alpha}); the largest gain, {top_words}, "
                    "does not survive the adjustment.**")
    else:
        head = f"**{note}no HiMS variant was compared with MS in this run.**"
    head = head[:2] + head[2].upper() + head[3:]
    lines = [head, ""]
    protocols = list(dict.fromkeys(e["protocol"] for e in entries))
    for p in protocols:
        es = [e for e in entries if e["protocol"] == p]
        parts = []
        for e in es:
            m = e["metrics"]
            cls = next((c for c in e.get("vs_ms", []) if c["level"] == "year" and c["panel"] == p), None)
            diff = f"; {_points(cls['diff'])} vs MS, {_diff_ci(cls['ci_low'], cls['ci_high'])}" if cls else ""
            parts.append(f"{e.get('loss_name', e['loss'])} {pct(m['precision_at_1'])} (make {pct(m.get('accuracy_make'))}"
                         f"{diff})")
        lines.append(f"- P@1 ({label(es[0])}, {es[0].get('mode', '')}): " + "; ".join(parts) + ".")
    ow = [e for e in entries if "ood_accuracy_make_known" in e["metrics"]]
    if ow:
        m0 = ow[0]["metrics"]
        lines.append(f"- Held-out car models ({label(ow[0])}): their make is in the known database for "
                     f"{pct(m0.get('ood_make_known_fraction'))} of their queries; of those, the make is right for "
                     + "; ".join(f"{e.get('loss_name', e['loss'])} {pct(e['metrics']['ood_accuracy_make_known'])}"
                                 for e in ow) + ".")
    if comps:
        lines.append(f"- Verdict: {len(better)} comparisons significantly better, {len(worse)} significantly worse, "
                     f"{len(comps) - len(better) - len(worse)} without a significant difference. The Veri-Car paper "
                     "reports that HiMS helps; "
                     + ("here it does at the comparisons above." if better else "here that is not reproduced.")
                     + " One training run per loss, and the HiMS formula is our interpretation of the paper's.")
    return "\n".join(lines) + "\n"



# --- 08 · identify a car -------------------------------------------------------------------------------------------
def _confidence_words_08(row: dict[str, float], n: int) -> str:
    """Does a high vote share mark the right answers? Wilson intervals of the two groups' accuracies."""
    share, sure, other = row.get("share confident"), row.get("accuracy if confident"), row.get("accuracy otherwise")
    if share is None or sure is None or other is None or not n:
        return "no answers in one of the two groups"
    n_sure, n_other = int(round(share * n)), n - int(round(share * n))
    a, b = _wilson_01_04(sure, n_sure), _wilson_01_04(other, n_other)
    verdict = ("no interval to judge by" if a is None or b is None else
               "worth reading, the intervals do not overlap" if a[0] > b[1] else
               "not told apart, the intervals overlap")
    return (f"{pct(sure)} right when the vote share is high ({pct(share, 0)} of answers) against {pct(other)} "
            f"otherwise: {verdict}")


def nb08(result: dict[str, Any]) -> str:
    """Notebook 08: the identifier on every test photo of known cars (accuracy per level with Wilson intervals,
    the share accepted as known, whether the confidence is worth reading) and one held-out car added from a few
    photos without retraining. Results written before the per-level prefix semantics (no ``levels`` key) scored
    each level alone: only the make and the exact class are reported from them."""
    entries = result["entries"]
    test = next(e for e in entries if e.get("experiment") == "identify test photos")
    add = next((e for e in entries if e.get("experiment") == "unknown car added without retraining"), None)
    m, n, where = test["metrics"], test.get("n_photos"), label(test)
    exact = m.get("accuracy_class", m.get("accuracy_year"))
    known = m.get("known_share")
    note = "On SynthCars (synthetic data), on" if test.get("dataset") == "synthetic" else "On"
    flag = ("" if known is None else f", yet flags {pct(1 - known)} of these known cars as unknown" if known < 0.9
            else f", and accepts {pct(known)} of them as known")
    head = (f"**{note} {n:,} test photos of known cars, the identifier gets the make right for "
            f"{_with_ci_01_04(m.get('accuracy_make'), n)} and the exact class for {_with_ci_01_04(exact, n)}{flag}")
    if add is not None:
        a = add["metrics"]
        head += (f"; after adding {add.get('n_added') or add.get('setting', '').split(' ')[0]} photos of a held-out "
                 f"car, {pct(a['named_after'])} of its {add.get('n_test_photos')} test photos are named right")
    lines = [head + f" ({where}).**", ""]
    prefix = "levels" in test
    levels = ["make", "type", "model", "year"] if prefix else ["make"]
    words = {"make": "make", "type": "make + body type", "model": "model", "year": "exact class"}
    if prefix:
        lines.append(f"- Per level ({where}, {test.get('setting', '')}; right at a level means right at every level "
                     "above it too; 95% Wilson intervals over the photos): " + "; ".join(
                         f"{words[lv]} {_with_ci_01_04(m.get(f'accuracy_{lv}'), n)}" for lv in levels) + ".")
    else:
        lines.append(f"- Per level ({where}): these results scored each level alone (before the study's prefix "
                     "semantics), so only the make and the exact class above are comparable with notebooks 05 and 07.")
    conf = test.get("confidence") or {}
    if conf:
        lines.append("- Confidence (vote share among the 5 nearest database images, high = at least 0.8): "
                     + "; ".join(f"{words[lv]}: {_confidence_words_08(conf[lv], n)}" for lv in levels if lv in conf) + ".")
    if known is not None:
        lines.append(f"- Unknown flag: the KNN+ threshold is set to accept 95% of the database's own images; it "
                     f"accepts {_with_ci_01_04(known, n)} of the test photos of the same known cars, "
                     + ("so set on images the model was trained on, it is too strict for new photos: a person gets "
                        "\"unknown car\" for many cars the database holds." if known < 0.9 else
                        "close to what it was set for."))
    if add is not None:
        a, nt = add["metrics"], add.get("n_test_photos")
        named = _wilson_01_04(a["named_after"], nt)
        verdict = ("no interval to judge by" if named is None else
                   "recognised" if named[0] > 0.5 else "mostly not recognised" if named[1] < 0.5 else
                   "recognised for about half of them")
        model = (f", model right {pct(a['model_before'])} -> {pct(a['model_after'])}" if "model_after" in a else "")
        lines.append(f"- Adding a car ({add.get('car')}, held out of training and database; {add.get('setting')}, no "
                     f"retraining, threshold not recalibrated): of its {nt} test photos, flagged unknown "
                     f"{pct(a['flagged_before'])} -> {pct(a['flagged_after'])}, named right {pct(a['named_before'])} -> "
                     f"{_with_ci_01_04(a['named_after'], nt)}{model}: {verdict}. One car, chosen by counts; "
                     "another could fare differently.")
    cal = next((e for e in entries if e.get("experiment") == "unknown threshold calibration"), None)
    if cal is not None:
        c, nc, photos = cal["metrics"], cal.get("n_photos") or 0, cal.get("calibration_photos") or {}
        held = photos.get("held-out photos only")
        held = f"{held:,}" if isinstance(held, int) else "held-out"
        fixed = c["accepted_heldout"] >= 0.9
        lines.append(f"- The fix ({label(cal)}, {cal.get('setting', '')}; all {nc:,} official test photos, every car "
                     f"known): the same model's threshold set on the {held} "
                     f"training photos it never trained on accepts {_with_ci_01_04(c['accepted_heldout'], nc)} of the test photos "
                     f"(set for 95%), against {_with_ci_01_04(c['accepted_every'], nc)} when set on every database "
                     f"photo ({pct(c['trained_share_every'], 0)} of them trained on); "
                     + ("so a threshold set on held-out photos is what the app should use (`make identifier` trains "
                        "such a model)." if fixed else "still too strict: the held-out photos are not like new ones.")
                     + f" This model names the make for {pct(c['accuracy_make'])} and the exact class for "
                     f"{pct(c['accuracy_year'])} of them.")
    lines.append(f"- Data: {_data_words_01_04(test.get('dataset'))}, {test.get('protocol')} protocol (some car models "
                 "held out); the re-implementation this study follows made no claim about identification to set "
                 "beside these.")
    return "\n".join(lines) + "\n"



def findings(notebook: str, result: dict[str, Any]) -> str:
    """The closing "what we found" Markdown of notebook ``notebook`` ("01".."08") from its results dict."""
    fn: Callable[[dict[str, Any]], str] | None = globals().get(f"nb{notebook[:2]}")
    if fn is None:
        raise KeyError(f"no findings for notebook {notebook!r}; known: {sorted(k[2:] for k in globals() if k.startswith('nb') and k[2:].isdigit())}")
    return fn(result)


def headline(notebook: str, result: dict[str, Any]) -> str:
    """The first line of :func:`findings` (the README's one-line summary of the notebook)."""
    return findings(notebook, result).strip().splitlines()[0]
