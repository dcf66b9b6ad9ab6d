"""The seed re-implementation's losses, reproduced, and what their gradients do (notebook 02).

A public re-implementation (the *seed*) reported being stuck at 0.20% accuracy "while the loss decreased",
blamed ``loss = loss + sample_loss`` for "severing the computational graph" and "fixed" it with
``torch.stack(losses).mean()``.  Out-of-place addition does not cut the graph.

* :func:`per_sample_ms_losses` computes the Multi-Similarity loss of every anchor separately (as such a
  loop-based implementation does) and :func:`accumulate` reduces the per-sample losses to a batch loss in
  the ways listed in :data:`ACCUMULATION_VARIANTS`: the write-up's "wrong" loop, its "fix", and the
  accumulations that really do cut the graph.  :class:`AccumulatedMSLoss` is the two as one loss.
* :class:`SeedHierarchicalLoss` is the seed's hierarchical loss, whose clamp cuts the gradient.
* :func:`gradient_report` measures, on one batch, which of them deliver gradients to the model and how
  those gradients compare with pml's.

Importing this module registers its losses with :func:`vericar.losses.register_loss`, so that
:func:`vericar.losses.make_loss` and :func:`vericar.train.train` know them by name: ``"ms_accum:<variant>"``
(keyword ``mean_over``) and ``"seed_hier_clamp"`` (keywords ``level_weights``, ``order``).  The core does
not import this module: a run folder trained with one of these losses (its ``config.json`` names the
loss) is resumed in a fresh process after ``import vericar.analyses.seed_losses`` (which
:mod:`vericar.analyses.gradient_bug` does); without it ``train`` refuses the name, saying so.

Differences between the released MS code and pml that matter for the reproductions: the released code
(``MalongTech/research-ms-loss``) (a) keeps an anchor only when it has at least one mined positive *and*
one mined negative (pml keeps the positive or negative part alone), (b) drops "positives" with
similarity >= 1 - 1e-5 (duplicates), pml only the diagonal, and (c) divides the sum by the batch size
(like pml's mean over all anchors).  The per-sample reproduction here follows pml exactly, so that its
mean equals pml's loss (see :mod:`vericar.losses` for the MS loss and its parameters).
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..losses import LOSSES, HierarchicalLossWrapper, HierarchicalMSLoss, make_loss, register_loss

__all__ = [
    "ACCUMULATION_VARIANTS",
    "GRAPH_CUTTING_VARIANTS",
    "GRAPH_PRESERVING_VARIANTS",
    "RAISING_VARIANTS",
    "AccumulatedMSLoss",
    "SeedHierarchicalLoss",
    "accumulate",
    "gradient_report",
    "per_sample_ms_losses",
]


# ==================================================================================================
# Loss accumulation
# ==================================================================================================

ACCUMULATION_VARIANTS: dict[str, str] = {
    "list_stack_mean": "the write-up's fix: losses.append(sample_loss); torch.stack(losses).mean()",
    "writeup_wrong_loop": ("the write-up's 'wrong' code as printed: loss = torch.tensor(0.0, requires_grad=True); "
                           "loss = loss + sample_loss per sample; then loss / n (keeps the graph)"),
    "inplace_plain": ("loss = torch.zeros(()); loss += sample_loss in place on a plain tensor "
                      "(no requires_grad): keeps the graph"),
    "item_accumulate": ("total += sample_loss.item(); loss = torch.tensor(total / n, requires_grad=True): "
                        "cuts the graph (a fresh leaf)"),
    "tensor_of_loss": ("torch.tensor(sample_loss, requires_grad=True) per sample, then stack().mean(): "
                       "cuts the graph (copies the value into new leaves)"),
    "detach": ("loss = torch.tensor(0.0, requires_grad=True); loss = loss + sample_loss.detach(); "
               "loss / n: cuts the graph (only the leaf gets a gradient)"),
    "no_grad": ("stack().mean() computed under torch.no_grad(), then .requires_grad_() so .backward() "
                "runs: cuts the graph"),
    "inplace_leaf": ("loss = torch.zeros((), requires_grad=True); loss += sample_loss: PyTorch raises "
                     "RuntimeError (a leaf Variable that requires grad is being used in an in-place "
                     "operation)"),
}
"""Accumulation variant name -> one-line description.  See :func:`accumulate`."""

#: Variants whose loss delivers the MS gradient to the model; the others deliver none or raise.
GRAPH_PRESERVING_VARIANTS: tuple[str, ...] = ("list_stack_mean", "writeup_wrong_loop", "inplace_plain")
#: Variants that run but deliver no gradient to the model.
GRAPH_CUTTING_VARIANTS: tuple[str, ...] = ("item_accumulate", "tensor_of_loss", "detach", "no_grad")
#: Variants that raise.
RAISING_VARIANTS: tuple[str, ...] = ("inplace_leaf",)


def _ms_mining_masks(sim: torch.Tensor, labels: torch.Tensor, epsilon: float | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (N, N) masks of the positive and negative pairs kept for each anchor (row).

    Same rule as pml's ``MultiSimilarityMiner`` with cosine similarity: positives are same-label pairs
    off the diagonal, negatives different-label pairs; with ``epsilon`` not None keep positives with
    ``S_ip - eps < max_n S_in`` and negatives with ``S_in + eps > min_p S_ip`` (an anchor without any
    negative keeps no positive and vice versa).
    """
    n = sim.shape[0]
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    pos_all = same & ~eye
    neg_all = ~same
    if epsilon is None:
        return pos_all, neg_all
    with torch.no_grad():
        s = sim.detach()
        max_neg = s.masked_fill(~neg_all, -math.inf).amax(dim=1, keepdim=True)
        min_pos = s.masked_fill(~pos_all, math.inf).amin(dim=1, keepdim=True)
        pos = pos_all & (s - epsilon < max_neg)
        neg = neg_all & (s + epsilon > min_pos)
    return pos, neg


def per_sample_ms_losses(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0,
                         beta: float = 50.0, base: float = 0.5, epsilon: float | None = 0.1
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-anchor MS losses, each computed in a Python loop from its row of the similarity matrix.

    Reproduction of a loop-based MS implementation.  For anchor *i* (``S = normalize(E) @ normalize(E).T``)::

        L_i = 1/alpha * log(1 + sum_{p in P_i} exp(-alpha (S_ip - base)))
            + 1/beta  * log(1 + sum_{n in N_i} exp( beta  (S_in - base)))

    with ``P_i``/``N_i`` mined exactly like pml's ``MultiSimilarityMiner(epsilon)`` (``epsilon=None``:
    no mining, all pairs).  Each ``log(1 + sum exp(.))`` is a ``logsumexp`` with an extra 0 logit, as in
    pml; an empty set gives exactly 0 (still connected to the graph, with zero gradient).

    Returns:
        ``(losses, has_pairs)``: a list of N 0-d tensors (all anchors, in batch order), each with its own
        ``grad_fn``, and a bool tensor ``(N,)`` marking anchors with at least one mined pair.

    Definition vs pml: ``torch.stack(losses).mean()`` (mean over **all** N anchors) equals pml's
    ``MultiSimilarityLoss`` + ``MultiSimilarityMiner`` loss (pml's ``MeanReducer`` also averages over
    all anchors, zeros included).  The mean over anchors with pairs only,
    ``torch.stack(losses)[has_pairs].mean()``, is pml's loss times ``N / has_pairs.sum()``: same gradient
    direction, larger magnitude.  One pml corner case is not reproduced: when the miner returns at most
    one pair of each kind, pml returns 0 without computing anything.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    labels = torch.as_tensor(labels, device=embeddings.device).reshape(-1)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
    e = F.normalize(embeddings, p=2, dim=1)
    sim = e @ e.T
    pos, neg = _ms_mining_masks(sim, labels, epsilon)
    zero = sim.new_zeros(1)
    out: list[torch.Tensor] = []
    for i in range(sim.shape[0]):
        row = sim[i]
        s_pos = row[pos[i]]
        s_neg = row[neg[i]]
        pos_term = torch.logsumexp(torch.cat([-alpha * (s_pos - base), zero]), dim=0) / alpha
        neg_term = torch.logsumexp(torch.cat([beta * (s_neg - base), zero]), dim=0) / beta
        out.append(pos_term + neg_term)
    has_pairs = pos.any(dim=1) | neg.any(dim=1)
    return out, has_pairs


def accumulate(per_sample_losses: Sequence[torch.Tensor] | torch.Tensor, variant: str) -> torch.Tensor:
    """Reduce per-sample losses to a batch loss (their mean) the way ``variant`` does it.

    Every variant divides the accumulated sum by the number of per-sample losses ``n`` (the write-up
    prints only the summing loop; dividing by the count is our assumption about the rest, and matches
    pml's mean).  Pass the losses of the anchors that should count (all of them to match pml).

    * ``list_stack_mean``, ``writeup_wrong_loop``, ``inplace_plain``: keep the graph; the loss value and
      the gradients equal the plain mean's.
    * ``item_accumulate``, ``tensor_of_loss``, ``detach``, ``no_grad``: return the same *value*, and a
      tensor on which ``.backward()`` runs without error, but no gradient reaches the model (only
      freshly made leaves get one).  An optimiser step then changes nothing but what weight decay does.
    * ``inplace_leaf``: ``loss += sample_loss`` on a leaf that requires grad; PyTorch raises
      ``RuntimeError: a leaf Variable that requires grad is being used in an in-place operation.`` at the
      first sample.  We let that error propagate: code written like this cannot train *silently* — it
      crashes.  (Working around it with ``loss.data += ...`` or ``with torch.no_grad(): loss += ...``
      would give the ``detach``/``no_grad`` behaviour.)

    Raises:
        ValueError: unknown variant or no losses.
        RuntimeError: ``inplace_leaf`` (PyTorch's own error).
    """
    if variant not in ACCUMULATION_VARIANTS:
        raise ValueError(f"unknown accumulation variant {variant!r}; known: {', '.join(ACCUMULATION_VARIANTS)}")
    if isinstance(per_sample_losses, torch.Tensor):
        per_sample_losses = list(per_sample_losses.reshape(-1).unbind(0))
    losses = list(per_sample_losses)
    n = len(losses)
    if n == 0:
        raise ValueError("no per-sample losses to accumulate")
    device, dtype = losses[0].device, losses[0].dtype

    if variant == "list_stack_mean":
        return torch.stack(losses).mean()

    if variant == "writeup_wrong_loop":
        # As printed (the leaf is put on the losses' device so the code also runs on GPU; the graph is
        # the same either way).
        loss = torch.tensor(0.0, requires_grad=True, device=device, dtype=dtype)
        for sample_loss in losses:
            loss = loss + sample_loss
        return loss / n

    if variant == "inplace_plain":
        loss = torch.zeros((), device=device, dtype=dtype)
        for sample_loss in losses:
            loss += sample_loss
        return loss / n

    if variant == "item_accumulate":
        total = 0.0
        for sample_loss in losses:
            total += sample_loss.item()
        return torch.tensor(total / n, requires_grad=True, device=device, dtype=dtype)

    if variant == "tensor_of_loss":
        with warnings.catch_warnings():
            # PyTorch warns "To copy construct from a tensor, it is recommended to use
            # sourceTensor.detach().clone() ..." here, i.e. it tells you the copy is detached.
            warnings.simplefilter("ignore", UserWarning)
            copies = [torch.tensor(sample_loss, requires_grad=True) for sample_loss in losses]
        return torch.stack(copies).mean()

    if variant == "detach":
        loss = torch.tensor(0.0, requires_grad=True, device=device, dtype=dtype)
        for sample_loss in losses:
            loss = loss + sample_loss.detach()
        return loss / n

    if variant == "no_grad":
        with torch.no_grad():
            loss = torch.stack(losses).mean()
        return loss.requires_grad_(True)

    # inplace_leaf
    loss = torch.zeros((), requires_grad=True, device=device, dtype=dtype)
    for sample_loss in losses:
        loss += sample_loss  # RuntimeError: a leaf Variable that requires grad is being used in an in-place operation.
    return loss / n  # pragma: no cover - unreachable for n >= 1


class AccumulatedMSLoss(nn.Module):
    """Per-sample MS loss (:func:`per_sample_ms_losses`) reduced with :func:`accumulate` (``variant``).

    ``mean_over="all"`` averages over all N anchors (equals pml's ``"ms"`` for graph-preserving
    variants); ``"has_pairs"`` passes only the anchors with at least one mined pair (what a loop that
    ``continue``-s past anchors without pairs and then means the list would do).  If no anchor has a pair
    with ``"has_pairs"``, the loss is 0 (connected to the embeddings, zero gradient).
    """

    needs_level_labels = False

    def __init__(self, variant: str, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 epsilon: float | None = 0.1, mean_over: str = "all"):
        super().__init__()
        if variant not in ACCUMULATION_VARIANTS:
            raise ValueError(f"unknown accumulation variant {variant!r}; known: {', '.join(ACCUMULATION_VARIANTS)}")
        if mean_over not in ("all", "has_pairs"):
            raise ValueError(f"mean_over must be 'all' or 'has_pairs', got {mean_over!r}")
        self.variant, self.mean_over = variant, mean_over
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                level_labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("AccumulatedMSLoss needs labels (N,)")
        losses, has_pairs = per_sample_ms_losses(embeddings, labels, self.alpha, self.beta, self.base,
                                                 self.epsilon)
        if self.mean_over == "has_pairs":
            losses = [l for l, keep in zip(losses, has_pairs.tolist()) if keep]
            if not losses:
                return embeddings.sum() * 0.0
        return accumulate(losses, self.variant)

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, alpha={self.alpha}, beta={self.beta}, base={self.base}, "
                f"epsilon={self.epsilon}, mean_over={self.mean_over!r}")


# ==================================================================================================
# The seed's hierarchical clamp
# ==================================================================================================

class SeedHierarchicalLoss(HierarchicalMSLoss):
    """Reproduction of the seed's hierarchical clamp, which cuts the gradient when the clamp wins.

    The seed clamps each level's loss to the previous level's loss through a Python float::

        prev_level_loss = None
        for each level (coarse to fine by default):
            level_loss = MS(embeddings, labels of the level)
            if prev_level_loss is not None:
                level_loss = torch.min(level_loss, torch.tensor(prev_level_loss.item()))
            total = total + w * level_loss
            prev_level_loss = level_loss
        loss = total / sum(w)

    ``torch.tensor(prev_level_loss.item())`` is a constant, so whenever it is the smaller value the
    level's term is a constant: that level contributes **no gradient** (the HiMS-Min-style
    :class:`HierarchicalMSLoss` would instead route the gradient into the previous level's loss).  When the
    level's own loss is smaller the clamp is inactive and its gradient flows normally.  The order of the
    seed's loop (coarse to fine, i.e. ``prev`` = the coarser level) and ``prev_level_loss`` being the
    clamped value are our assumptions; ``order="fine_to_coarse"`` runs the loop the other way.
    """

    def __init__(self, level_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), alpha: float = 2.0,
                 beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1, order: str = "coarse_to_fine"):
        super().__init__(level_weights, "min", alpha, beta, base, epsilon, order)

    def constrain(self, level_losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        losses = list(level_losses)
        idx = list(range(len(losses)))
        if self.order == "fine_to_coarse":
            idx.reverse()
        out = list(losses)
        prev = None
        for l in idx:
            level_loss = losses[l]
            if prev is not None:
                level_loss = torch.min(level_loss, torch.tensor(prev.item(), device=level_loss.device,
                                                                dtype=level_loss.dtype))
            out[l] = level_loss
            prev = level_loss
        return out


# ==================================================================================================
# Registration with vericar.losses
# ==================================================================================================

def _build_seed_clamp(alpha, beta, base, epsilon, **kw):
    return HierarchicalLossWrapper(SeedHierarchicalLoss(alpha=alpha, beta=beta, base=base, epsilon=epsilon, **kw))


def _accum_builder(variant: str):
    def build(alpha, beta, base, epsilon, **kw):
        return AccumulatedMSLoss(variant, alpha, beta, base, epsilon, **kw)
    return build


register_loss("seed_hier_clamp", _build_seed_clamp)
for _variant in ACCUMULATION_VARIANTS:
    register_loss(f"ms_accum:{_variant}", _accum_builder(_variant))
del _variant


# ==================================================================================================
# Gradient report
# ==================================================================================================

def _flat_grad(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """Concatenated gradients of ``module``'s parameters (zeros where None) and whether any was not None."""
    parts, any_grad = [], False
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device))
        else:
            any_grad = True
            parts.append(p.grad.detach().reshape(-1).to(torch.float64))
    if not parts:
        return torch.zeros(0, dtype=torch.float64), False
    return torch.cat(parts).cpu(), any_grad


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float((a @ b).item() / (na * nb))


def gradient_report(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    variants: Iterable[str] | None = None, reference: str = "ms", *,
                    alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1,
                    bn_mode: str = "train") -> pd.DataFrame:
    """What each accumulation variant's loss sends back into ``model`` on one batch.

    One forward pass gives the embeddings; for the reference loss (``reference``, a :func:`make_loss`
    name, default pml's ``"ms"``) and then each variant (an :data:`ACCUMULATION_VARIANTS` name or any
    :func:`make_loss` name), the loss is computed from those same embeddings, gradients are zeroed
    (``set_to_none``), ``loss.backward(retain_graph=True)`` runs, and the parameter gradients of
    ``model.backbone`` and ``model.head`` are recorded.

    Determinism: with ``bn_mode="train"`` (default) the model is in training mode — BatchNorm uses the
    batch statistics, as during training — but every dropout module is switched to eval, so nothing is
    random; ``"eval"`` puts the whole model in eval mode.  The model's modes, BatchNorm running stats
    (changed by the one forward pass in training mode) and gradients are restored/cleared afterwards.

    Returns:
        One row per loss (reference first) with columns ``variant``, ``role`` ("reference"/"variant"),
        ``description``, ``loss`` (value; NaN if it raised), ``requires_grad``, ``has_grad_fn``,
        ``grad_fn`` (class name or None), ``grad_norm_backbone``, ``grad_norm_head`` (L2 norm of the
        flattened gradients; 0.0 when no gradient arrives, NaN when the loss raised),
        ``reaches_backbone``, ``reaches_head`` (some gradient arrived and is non-zero),
        ``cos_backbone``, ``cos_head``, ``cos_all`` (cosine similarity with the reference's gradient;
        NaN when either is zero), ``rel_diff_all`` (``||g - g_ref|| / ||g_ref||`` over all parameters)
        and ``error`` (``"ExceptionType: message"`` when the loss or backward raised, else None).
    """
    if bn_mode not in ("train", "eval"):
        raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
    if variants is None:
        variants = list(ACCUMULATION_VARIANTS)
    variants = list(variants)
    groups = {"backbone": model.backbone, "head": model.head}

    modes = {m: m.training for m in model.modules()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    rows = []
    try:
        if bn_mode == "train":
            model.train()
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
        else:
            model.eval()
        model.zero_grad(set_to_none=True)
        embeddings = model(images)
        labels = torch.as_tensor(labels, device=embeddings.device)

        grads: dict[str, dict[str, torch.Tensor]] = {}
        for role, name in [("reference", reference)] + [("variant", v) for v in variants]:
            loss_name = name if name in LOSSES else f"ms_accum:{name}"
            if name in ACCUMULATION_VARIANTS:
                description = ACCUMULATION_VARIANTS[name]
            elif name == "ms":
                description = "pml MultiSimilarityMiner + MultiSimilarityLoss"
            else:
                description = f"make_loss({loss_name!r})"
            row = {"variant": name, "role": role, "description": description, "loss": float("nan"),
                   "requires_grad": None, "has_grad_fn": None, "grad_fn": None, "error": None}
            model.zero_grad(set_to_none=True)
            try:
                loss_fn = make_loss(loss_name, alpha=alpha, beta=beta, base=base, epsilon=epsilon)
                loss = loss_fn(embeddings, labels)
                row["loss"] = float(loss.detach().item())
                row["requires_grad"] = bool(loss.requires_grad)
                row["has_grad_fn"] = loss.grad_fn is not None
                row["grad_fn"] = type(loss.grad_fn).__name__ if loss.grad_fn is not None else None
                loss.backward(retain_graph=True)
            except Exception as err:  # record what PyTorch (or the loss) raised
                row["error"] = f"{type(err).__name__}: {err}"
            g = {}
            for part, module in groups.items():
                flat, any_grad = _flat_grad(module)
                g[part] = flat
                norm = float(flat.norm().item())
                row[f"grad_norm_{part}"] = float("nan") if row["error"] else norm
                row[f"reaches_{part}"] = bool(any_grad and norm > 0.0)
            grads[name] = g
            rows.append(row)

        ref = grads[reference]
        ref_all = torch.cat([ref["backbone"], ref["head"]])
        for row in rows:
            g = grads[row["variant"]]
            if row["error"]:
                row.update(cos_backbone=float("nan"), cos_head=float("nan"), cos_all=float("nan"),
                           rel_diff_all=float("nan"))
                continue
            g_all = torch.cat([g["backbone"], g["head"]])
            ref_norm = ref_all.norm().item()
            row["cos_backbone"] = _cosine(g["backbone"], ref["backbone"])
            row["cos_head"] = _cosine(g["head"], ref["head"])
            row["cos_all"] = _cosine(g_all, ref_all)
            row["rel_diff_all"] = float((g_all - ref_all).norm().item() / ref_norm) if ref_norm > 0 else float("nan")
    finally:
        model.zero_grad(set_to_none=True)
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            current = dict(model.named_buffers())
            for k, v in buffers.items():
                current[k].copy_(v)

    columns = ["variant", "role", "description", "loss", "requires_grad", "has_grad_fn", "grad_fn",
               "grad_norm_backbone", "grad_norm_head", "reaches_backbone", "reaches_head",
               "cos_backbone", "cos_head", "cos_all", "rel_diff_all", "error"]
    df = pd.DataFrame(rows, columns=columns)
    for col in ("grad_fn", "error"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df
