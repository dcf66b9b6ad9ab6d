"""Tests for vericar.losses (MS loss vs pml, hierarchical MS losses, the registry) and for the "gradient bug"
reproductions of vericar.analyses.seed_losses, which register with it.

The accumulation-variant tests are the guard that a notebook's conclusion about the seed's "gradient
bug" cannot drift from the code: which variants deliver gradients to the model and which do not.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from vericar.data.hierarchy import hierarchy_table
from vericar.analyses.seed_losses import (
    ACCUMULATION_VARIANTS,
    GRAPH_CUTTING_VARIANTS,
    GRAPH_PRESERVING_VARIANTS,
    RAISING_VARIANTS,
    AccumulatedMSLoss,
    SeedHierarchicalLoss,
    accumulate,
    gradient_report,
    per_sample_ms_losses,
)
from vericar.losses import (
    LOSSES,
    ZHANG_LEVEL_WEIGHTS,
    HierarchicalMSLoss,
    MSLoss,
    level_label_matrix,
    loss_names,
    make_loss,
    register_loss,
)
from vericar.models import build_model

LEAF_INPLACE_MESSAGE = "a leaf Variable that requires grad is being used in an in-place operation"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(seed: int = 0, n: int = 24, dim: int = 16, n_classes: int = 7):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return emb, labels


def _grad(fn, emb: torch.Tensor) -> torch.Tensor:
    e = emb.clone().requires_grad_(True)
    fn(e).backward()
    return e.grad


# --------------------------------------------------------------------------------------------------
# Flat MS loss vs pml
# --------------------------------------------------------------------------------------------------

def test_make_loss_ms_equals_pml_loss_and_miner():
    emb, labels = _batch()
    ref_loss = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    ref_miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    expected = ref_loss(emb, labels, ref_miner(emb, labels))
    loss_fn = make_loss("ms")
    assert isinstance(loss_fn, MSLoss) and not loss_fn.needs_level_labels
    got = loss_fn(emb, labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    g_ref = _grad(lambda e: ref_loss(e, labels, ref_miner(e, labels)), emb)
    g_got = _grad(lambda e: loss_fn(e, labels), emb)
    torch.testing.assert_close(g_got, g_ref)
    # level_labels are ignored by flat losses
    assert loss_fn(emb, labels, level_labels=torch.zeros(len(labels), 4)).item() == pytest.approx(got.item())


def test_make_loss_passes_parameters_and_nominer():
    emb, labels = _batch(1)
    got = make_loss("ms_nominer", alpha=3.0, beta=40.0, base=0.6)(emb, labels)
    expected = pml_losses.MultiSimilarityLoss(alpha=3.0, beta=40.0, base=0.6)(emb, labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    mined = make_loss("ms", epsilon=0.3)(emb, labels)
    expected_mined = pml_losses.MultiSimilarityLoss()(emb, labels, pml_miners.MultiSimilarityMiner(0.3)(emb, labels))
    assert mined.item() == pytest.approx(expected_mined.item(), rel=1e-6)


def test_make_loss_unknown_name_lists_names():
    with pytest.raises(ValueError) as err:
        make_loss("triplet")
    msg = str(err.value)
    for name in ("ms", "ms_nominer", "hims_min", "hims_max", "hims_none", "seed_hier_clamp",
                 "ms_accum:list_stack_mean"):
        assert name in msg
    assert set(LOSSES) >= {f"ms_accum:{v}" for v in ACCUMULATION_VARIANTS}


@pytest.mark.parametrize("seed,epsilon,base", [(0, 0.1, 0.5), (3, 0.1, 0.5), (4, 0.3, 0.2), (5, None, 0.5)])
def test_per_sample_mean_equals_pml(seed, epsilon, base):
    """Mean over ALL anchors of the per-sample losses == pml loss (+ miner unless epsilon is None)."""
    emb, labels = _batch(seed)
    losses, has_pairs = per_sample_ms_losses(emb, labels, 2.0, 50.0, base, epsilon)
    assert len(losses) == len(labels) and all(l.ndim == 0 and l.grad_fn is None for l in losses)  # no grad input
    ref = pml_losses.MultiSimilarityLoss(base=base)
    if epsilon is None:
        expected = ref(emb, labels)
    else:
        expected = ref(emb, labels, pml_miners.MultiSimilarityMiner(epsilon)(emb, labels))
    assert torch.stack(losses).mean().item() == pytest.approx(expected.item(), rel=1e-5)
    # anchors without a mined pair contribute exactly 0
    stacked = torch.stack(losses)
    assert torch.all(stacked[~has_pairs] == 0)
    # gradients agree too
    g_ref = _grad(lambda e: ref(e, labels) if epsilon is None
                  else ref(e, labels, pml_miners.MultiSimilarityMiner(epsilon)(e, labels)), emb)
    g_got = _grad(lambda e: torch.stack(per_sample_ms_losses(e, labels, 2.0, 50.0, base, epsilon)[0]).mean(), emb)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)


def test_per_sample_mining_matches_pml_miner_pairs():
    from vericar.analyses.seed_losses import _ms_mining_masks

    emb, labels = _batch(7, n=32)
    e = torch.nn.functional.normalize(emb)
    pos, neg = _ms_mining_masks(e @ e.T, labels, 0.1)
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(0.1)(emb, labels)
    assert set(zip(a1.tolist(), p.tolist())) == set(zip(*[t.tolist() for t in torch.where(pos)]))
    assert set(zip(a2.tolist(), n.tolist())) == set(zip(*[t.tolist() for t in torch.where(neg)]))


def test_pml_mean_counts_anchors_without_pairs():
    """pml's MeanReducer divides by N, anchors with no mined pair included (checked on pml 2.9)."""
    emb, _ = _batch(2, n=12)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7])  # six singletons: no positive pairs
    losses, has_pairs = per_sample_ms_losses(emb, labels)
    stacked = torch.stack(losses)
    pml_value = make_loss("ms")(emb, labels).item()
    n_pairs = int(has_pairs.sum())
    assert 0 < n_pairs < len(labels)
    assert pml_value == pytest.approx(stacked.mean().item(), rel=1e-5)
    assert pml_value != pytest.approx(stacked[has_pairs].mean().item(), rel=1e-3)
    has_pairs_loss = make_loss("ms_accum:list_stack_mean", mean_over="has_pairs")(emb, labels)
    assert has_pairs_loss.item() == pytest.approx(pml_value * len(labels) / n_pairs, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Accumulation variants ("gradient bug" reproductions)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(ACCUMULATION_VARIANTS))
def test_variant_groups_match_what_each_variant_does(variant):
    """Each variant is in the group that its behaviour puts it in: it keeps the graph (gradients reach the
    embeddings), cuts it (the loss has no gradient) or raises."""
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_(True)
    per_sample = per_sample_ms_losses(emb, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))[0]
    if variant in RAISING_VARIANTS:
        with pytest.raises(RuntimeError):
            accumulate(per_sample, variant).backward()
        return
    loss = accumulate(per_sample, variant)
    if loss.requires_grad:
        loss.backward()
    reached = emb.grad is not None and float(emb.grad.abs().sum()) > 0
    assert reached == (variant in GRAPH_PRESERVING_VARIANTS)
    assert reached != (variant in GRAPH_CUTTING_VARIANTS)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", pretrained=False, embedding_dim=32, hidden_dim=64)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(10, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 4])
    return model, images, labels


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    return _model_grads(*tiny, "ms")


def _model_grads(model, images, labels, loss_name):
    """Train-mode forward (dropout off), backward of make_loss(loss_name); grads of backbone and head."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    model.zero_grad(set_to_none=True)
    loss = make_loss(loss_name)(model(images), labels)
    loss.backward()
    grads = {part: [p.grad for p in getattr(model, part).parameters()] for part in ("backbone", "head")}
    model.zero_grad(set_to_none=True)
    return loss, grads


def _reaches(grads) -> bool:
    return any(g is not None and bool(torch.any(g != 0)) for g in grads)


@pytest.mark.parametrize("variant", GRAPH_PRESERVING_VARIANTS)
def test_graph_preserving_variants_train_like_pml(tiny, tiny_reference, variant):
    model, images, labels = tiny
    ref_loss, ref = tiny_reference
    loss, got = _model_grads(model, images, labels, f"ms_accum:{variant}")
    assert loss.requires_grad and loss.grad_fn is not None
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for part in ("backbone", "head"):
        assert _reaches(got[part]), f"{variant}: no gradient reached the {part}"
        for g, r in zip(got[part], ref[part]):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", GRAPH_CUTTING_VARIANTS)
def test_graph_cutting_variants_deliver_no_gradient(tiny, tiny_reference, variant):
    model, images, labels = tiny
    ref_loss, _ = tiny_reference
    loss, got = _model_grads(model, images, labels, f"ms_accum:{variant}")
    # Same value, backward() runs ...
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert loss.requires_grad
    # ... but nothing reaches the model.
    for part in ("backbone", "head"):
        assert not _reaches(got[part]), f"{variant}: a gradient reached the {part}"
        assert all(g is None for g in got[part])


def test_graph_cutting_variants_grad_fn_facts():
    emb, labels = _batch()
    e = emb.clone().requires_grad_(True)
    losses, _ = per_sample_ms_losses(e, labels)
    facts = {}
    for v in GRAPH_CUTTING_VARIANTS:
        loss = accumulate(losses, v)
        facts[v] = (loss.is_leaf, loss.grad_fn is not None)
    # item_accumulate / no_grad: a fresh leaf; tensor_of_loss / detach: a graph, but rooted in new leaves
    assert facts == {"item_accumulate": (True, False), "no_grad": (True, False),
                     "tensor_of_loss": (False, True), "detach": (False, True)}


def test_inplace_leaf_raises_pytorchs_error(tiny):
    model, images, labels = tiny
    with pytest.raises(RuntimeError, match=LEAF_INPLACE_MESSAGE):
        _model_grads(model, images, labels, "ms_accum:inplace_leaf")
    # the very error PyTorch raises for the pattern itself
    leaf = torch.zeros((), requires_grad=True)
    with pytest.raises(RuntimeError) as direct:
        leaf += torch.ones((), requires_grad=True) * 2
    emb, labels2 = _batch()
    with pytest.raises(RuntimeError) as ours:
        accumulate(per_sample_ms_losses(emb.requires_grad_(True), labels2)[0], "inplace_leaf")
    assert str(ours.value) == str(direct.value)


def test_accumulate_input_checks():
    x = torch.arange(4.0, requires_grad=True)
    assert accumulate(x * 2, "list_stack_mean").item() == pytest.approx(3.0)
    assert accumulate(list(x * 2), "writeup_wrong_loop").item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown accumulation variant"):
        accumulate([x.sum()], "sum")
    with pytest.raises(ValueError, match="no per-sample losses"):
        accumulate([], "list_stack_mean")
    with pytest.raises(ValueError):
        AccumulatedMSLoss("list_stack_mean", mean_over="some")


def test_gradient_report(tiny):
    model, images, labels = tiny
    model.eval()
    before = {k: v.clone() for k, v in model.named_buffers()}
    df = gradient_report(model, images, labels)
    assert isinstance(df, pd.DataFrame)
    assert list(df["variant"]) == ["ms", *ACCUMULATION_VARIANTS]
    rows = df.set_index("variant")
    ref = rows.loc["ms"]
    assert ref["role"] == "reference" and ref["reaches_backbone"] and ref["reaches_head"]
    for v in GRAPH_PRESERVING_VARIANTS:
        r = rows.loc[v]
        assert r["reaches_backbone"] and r["reaches_head"]
        assert r["cos_all"] == pytest.approx(1.0, abs=1e-6) and r["rel_diff_all"] < 1e-4
        assert r["grad_norm_backbone"] == pytest.approx(ref["grad_norm_backbone"], rel=1e-4)
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for v in GRAPH_CUTTING_VARIANTS:
        r = rows.loc[v]
        assert not r["reaches_backbone"] and not r["reaches_head"]
        assert r["grad_norm_backbone"] == 0.0 and r["grad_norm_head"] == 0.0
        assert math.isnan(r["cos_all"]) and r["rel_diff_all"] == pytest.approx(1.0)
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5) and r["requires_grad"]
        assert r["error"] is None
    r = rows.loc["inplace_leaf"]
    assert LEAF_INPLACE_MESSAGE in r["error"] and math.isnan(r["loss"]) and math.isnan(r["grad_norm_head"])
    # no side effects: modes, BatchNorm running stats and gradients are restored/cleared
    assert not model.training
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, before[k])
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Hierarchical MS losses
# --------------------------------------------------------------------------------------------------

def _ms_numpy(emb: np.ndarray, labels: np.ndarray, alpha=2.0, beta=50.0, base=0.5, eps=0.1) -> float:
    """MS loss with MS mining by the formula, mean over all anchors."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    s = e @ e.T
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    pos_all, neg_all = same & ~np.eye(n, dtype=bool), ~same
    total = 0.0
    for i in range(n):
        max_neg = s[i][neg_all[i]].max() if neg_all[i].any() else -np.inf
        min_pos = s[i][pos_all[i]].min() if pos_all[i].any() else np.inf
        p = s[i][pos_all[i] & (s[i] - eps < max_neg)]
        q = s[i][neg_all[i] & (s[i] + eps > min_pos)]
        total += np.log1p(np.exp(-alpha * (p - base)).sum()) / alpha
        total += np.log1p(np.exp(beta * (q - base)).sum()) / beta
    return total / n


# 4 unit vectors in 2-D; two levels (coarse refines into fine).
_ANGLES = np.deg2rad([0.0, 100.0, 40.0, 150.0])
_EMB2D = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], axis=1)
_LEVELS2 = np.array([[0, 0], [0, 0], [1, 1], [1, 2]])


@pytest.mark.parametrize("constraint", ["none", "min", "max"])
@pytest.mark.parametrize("order", ["fine_to_coarse", "coarse_to_fine"])
def test_hierarchical_value_hand_computed(constraint, order):
    m0 = _ms_numpy(_EMB2D, _LEVELS2[:, 0])
    m1 = _ms_numpy(_EMB2D, _LEVELS2[:, 1])
    assert abs(m0 - m1) > 0.05  # min and max differ on this case
    w = (1.0, 3.0)
    if constraint == "none":
        c0, c1 = m0, m1
    elif order == "fine_to_coarse":  # the coarse level is clamped against the fine one
        c1 = m1
        c0 = min(m0, m1) if constraint == "min" else max(m0, m1)
    else:  # the fine level is clamped against the coarse one
        c0 = m0
        c1 = min(m1, m0) if constraint == "min" else max(m1, m0)
    expected = (w[0] * c0 + w[1] * c1) / sum(w)
    loss_fn = HierarchicalMSLoss(level_weights=w, constraint=constraint, order=order)
    got = loss_fn(torch.tensor(_EMB2D, dtype=torch.float64), torch.tensor(_LEVELS2))
    assert got.item() == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(loss_fn.last_level_losses.numpy(), [m0, m1], rtol=1e-9)


def _two_level_case(kind: str):
    """Embeddings (8, 4) and (coarse, fine) labels with M_coarse > M_fine ("coarse_high") or < ("fine_high")."""
    coarse = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    fine = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 4, generator=g, dtype=torch.float64)
    if kind == "coarse_high":  # random embeddings: the coarse level's many positives are far apart
        emb = noise
    else:  # tight coarse clusters: coarse loss small, fine negatives inside a cluster are close
        centers = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0]], dtype=torch.float64)
        emb = centers[coarse] + noise
    ms = MSLoss()
    m = (ms(emb, coarse).item(), ms(emb, fine).item())
    assert (m[0] > m[1] + 0.05) if kind == "coarse_high" else (m[1] > m[0] + 0.05)
    return emb, torch.stack([coarse, fine], dim=1), m


@pytest.mark.parametrize("kind", ["coarse_high", "fine_high"])
@pytest.mark.parametrize("constraint", ["min", "max"])
@pytest.mark.parametrize("order", ["fine_to_coarse", "coarse_to_fine"])
def test_hierarchical_gradient_flows_through_winning_branch(kind, constraint, order):
    emb, levels, m = _two_level_case(kind)
    ms = MSLoss()
    clamped = 0 if order == "fine_to_coarse" else 1
    other = 1 - clamped
    pick = min if constraint == "min" else max
    winner = clamped if pick(m[clamped], m[other]) == m[clamped] else other

    loss_fn = HierarchicalMSLoss(level_weights=(1.0, 1.0), constraint=constraint, order=order)
    got = _grad(lambda e: loss_fn(e, levels), emb)
    expected = _grad(lambda e: (ms(e, levels[:, other]) + ms(e, levels[:, winner])) / 2, emb)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, expected)
    value = loss_fn(emb, levels).item()
    assert value == pytest.approx((m[other] + m[winner]) / 2, rel=1e-9)


@pytest.mark.parametrize("kind", ["coarse_high", "fine_high"])
def test_seed_clamp_cuts_gradient_when_it_wins(kind):
    emb, levels, m = _two_level_case(kind)
    ms = MSLoss()
    seed = SeedHierarchicalLoss(level_weights=(1.0, 1.0))  # coarse to fine: fine level clamped to coarse
    got = _grad(lambda e: seed(e, levels), emb)
    grad_coarse = _grad(lambda e: ms(e, levels[:, 0]), emb)
    grad_fine = _grad(lambda e: ms(e, levels[:, 1]), emb)
    value = seed(emb, levels).item()
    if kind == "fine_high":  # clamp wins: the fine term is the constant M_coarse, no gradient from it
        assert value == pytest.approx(m[0], rel=1e-9)
        torch.testing.assert_close(got, grad_coarse / 2)
        # the differentiable HiMS-Min (same order) routes that term's gradient into the coarse loss
        hims = HierarchicalMSLoss(level_weights=(1.0, 1.0), constraint="min", order="coarse_to_fine")
        assert hims(emb, levels).item() == pytest.approx(value, rel=1e-9)
        torch.testing.assert_close(_grad(lambda e: hims(e, levels), emb), grad_coarse)
    else:  # clamp inactive: both levels' gradients flow
        assert value == pytest.approx((m[0] + m[1]) / 2, rel=1e-9)
        torch.testing.assert_close(got, (grad_coarse + grad_fine) / 2)


def test_hierarchical_make_loss_signature_and_checks():
    emb, levels, _ = _two_level_case("coarse_high")
    levels4 = torch.cat([levels[:, :1], levels[:, :1], levels[:, 1:], levels[:, 1:]], dim=1)
    for name in ("hims_min", "hims_max", "hims_none", "seed_hier_clamp"):
        loss_fn = make_loss(name)
        assert loss_fn.needs_level_labels
        e = emb.clone().requires_grad_(True)
        loss = loss_fn(e, levels4[:, -1], level_labels=levels4)
        loss.backward()
        assert torch.isfinite(loss) and e.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="level_labels"):
            loss_fn(emb, levels4[:, -1])
        with pytest.raises(ValueError, match="shape"):
            loss_fn(emb, levels4[:, -1], level_labels=levels)  # 2 columns for 4 weights
    none = make_loss("hims_none", level_weights=(1, 2, 3, 4))
    ms = MSLoss()
    expected = sum(w * ms(emb, levels4[:, l]).item() for l, w in enumerate((1, 2, 3, 4))) / 10
    assert none(emb, None, level_labels=levels4).item() == pytest.approx(expected, rel=1e-9)
    assert make_loss("hims_min", level_weights=ZHANG_LEVEL_WEIGHTS).hierarchical.level_weights == ZHANG_LEVEL_WEIGHTS
    assert ZHANG_LEVEL_WEIGHTS[-1] == 2.0 and list(ZHANG_LEVEL_WEIGHTS) == sorted(ZHANG_LEVEL_WEIGHTS)
    with pytest.raises(ValueError):
        HierarchicalMSLoss(constraint="mean")
    with pytest.raises(ValueError):
        HierarchicalMSLoss(order="up")


# --------------------------------------------------------------------------------------------------
# The registry: the seed's losses register from the analyses; the core never imports them
# --------------------------------------------------------------------------------------------------

def test_register_loss_refuses_core_names_and_another_modules_name():
    with pytest.raises(ValueError, match="own losses"):
        register_loss("ms", lambda *a, **kw: None)
    with pytest.raises(ValueError, match="proxy_anchor"):
        register_loss("proxy_anchor", lambda *a, **kw: None)

    def other(alpha, beta, base, epsilon, **kw):
        return MSLoss(alpha, beta, base, epsilon)
    other.__module__ = "somewhere.else"
    with pytest.raises(ValueError, match="registered already, by vericar.analyses.seed_losses"):
        register_loss("seed_hier_clamp", other)
    register_loss("test_only:ms", other)
    try:
        assert isinstance(make_loss("test_only:ms"), MSLoss) and "test_only:ms" in loss_names()
    finally:
        del LOSSES["test_only:ms"]


def test_an_unregistered_name_of_a_known_provider_names_the_module_to_import():
    """A run folder's loss registered by an analysis module: the core's error says what to import (a fresh process
    that has not imported it is tested in test_train.py); the seed's losses build once it is imported."""
    with pytest.raises(ValueError, match=r"unknown loss 'ms_accum:nope'; it is registered by "
                                         r"vericar.analyses.seed_losses: import that module first"):
        make_loss("ms_accum:nope")
    assert isinstance(make_loss("ms_accum:detach"), AccumulatedMSLoss)
    assert isinstance(make_loss("seed_hier_clamp").hierarchical, SeedHierarchicalLoss)


# --------------------------------------------------------------------------------------------------
# level_label_matrix
# --------------------------------------------------------------------------------------------------

def test_level_label_matrix_toy():
    table = pd.DataFrame({
        "make": ["BMW", "BMW", "BMW", "Audi", "BMW"],
        "model": ["3 Series Sedan", "3 Series Sedan", "X5 SUV", "A4 Sedan", "5 Series Sedan"],
        "family": ["3 Series", "3 Series", "X5", "A4", "5 Series"],
        "type": ["Sedan", "Sedan", "SUV", "Sedan", "Sedan"],
        "year": [2012, 2007, 2012, 2012, 2012],
    })
    full = level_label_matrix(np.arange(5), table)
    np.testing.assert_array_equal(full, [
        # make, make+type, make+type+model, class
        [0, 0, 0, 0],
        [0, 0, 0, 1],
        [0, 1, 1, 2],
        [1, 2, 2, 3],
        [0, 0, 3, 4],
    ])
    assert full.dtype == np.int64
    idx = np.array([4, 0, 3, 3, 1])
    np.testing.assert_array_equal(level_label_matrix(idx, table), full[idx])
    with pytest.raises(ValueError, match="out of range"):
        level_label_matrix(np.array([5]), table)
    with pytest.raises(ValueError):
        level_label_matrix(np.array([[0]]), table)


def test_level_label_matrix_stanford_cars():
    from pathlib import Path

    names = pd.read_csv(Path(__file__).parent / "data" / "stanford_cars_hierarchy.csv")["class_name"]
    mat = level_label_matrix(np.arange(len(names)), hierarchy_table(names))
    assert mat.shape == (196, 4)
    assert [len(set(mat[:, l])) for l in range(4)] == [49, 107, 189, 196]
    # each level refines the coarser one: same id at level l implies same id at every coarser level
    for l in range(1, 4):
        for key in set(mat[:, l]):
            assert len(set(mat[mat[:, l] == key, l - 1])) == 1


@pytest.mark.parametrize("name", ["proxy_anchor", "norm_softmax", "arcface"])
def test_proxy_losses_learn_one_proxy_per_class(name):
    """Free embeddings of 4 classes and the loss's proxies, optimised together: each proxy ends nearest its class."""
    from vericar.losses import make_loss

    torch.manual_seed(0)
    classes = np.array([3, 5, 8, 13])  # label values need not be contiguous
    labels = torch.from_numpy(np.repeat(classes, 8))
    emb = torch.nn.Parameter(torch.randn(len(labels), 16))
    loss_fn = make_loss(name, classes=classes, embedding_size=16)
    opt = torch.optim.Adam([emb, *loss_fn.parameters()], lr=0.05)
    first = None
    for _ in range(150):
        loss = loss_fn(emb, labels)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    logits = loss_fn.logits(emb.detach())
    assert logits.shape == (32, 4)
    assert (classes[logits.argmax(1).numpy()] == labels.numpy()).all()
    with pytest.raises(ValueError, match="not among"):
        loss_fn(emb, torch.full((32,), 4))
    with pytest.raises(ValueError, match="proxy loss: pass classes"):
        make_loss(name)


def test_loss_providers_name_exactly_what_the_analysis_module_registers():
    """The core's error table (which module registers which loss) must match what that module registers."""
    import importlib

    from vericar import losses
    for module in set(losses.LOSS_PROVIDERS.values()):
        importlib.import_module(module)
    registered = {n: b.__module__ for n, b in losses.LOSSES.items() if b.__module__ != "vericar.losses"}
    assert registered, "importing the providers registered nothing"
    for name, module in registered.items():
        prefixes = [p for p in losses.LOSS_PROVIDERS if name == p or (p.endswith(":") and name.startswith(p))]
        assert prefixes, f"{name} (registered by {module}) is missing from LOSS_PROVIDERS"
        assert losses.LOSS_PROVIDERS[prefixes[0]] == module, (name, module)
    for prefix in losses.LOSS_PROVIDERS:
        assert any(n == prefix or (prefix.endswith(":") and n.startswith(prefix)) for n in registered), prefix
