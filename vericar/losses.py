"""Metric-learning losses: Multi-Similarity (MS), reproductions of a seed's "gradient bug", hierarchical MS.

Three parts.

1. **Multi-Similarity loss + miner** (:func:`make_loss` ``"ms"``, ``"ms_nominer"``), straight from
   pytorch-metric-learning (pml).

2. **"Gradient bug" reproductions.**  A public re-implementation (the *seed*) reported being stuck at
   0.20% accuracy "while the loss decreased", blamed ``loss = loss + sample_loss`` for "severing the
   computational graph" and "fixed" it with ``torch.stack(losses).mean()``.  Out-of-place addition does
   not cut the graph.  :func:`per_sample_ms_losses` computes the MS loss of every anchor separately (as
   such a loop-based implementation does) and :func:`accumulate` reduces the per-sample losses to a batch
   loss in the ways listed in :data:`ACCUMULATION_VARIANTS`: the write-up's "wrong" loop, its "fix", and
   the accumulations that really do cut the graph.  :func:`gradient_report` measures, on one batch, which
   of them deliver gradients to the model and how those gradients compare with pml's.

3. **Hierarchical MS losses** over make > type > model > year (:class:`HierarchicalMSLoss`, names
   ``"hims_min"``, ``"hims_max"``, ``"hims_none"``) and the seed's gradient-cutting clamp
   (:class:`SeedHierarchicalLoss`, ``"seed_hier_clamp"``); :func:`level_label_matrix` builds their labels.

Call convention of everything :func:`make_loss` returns::

    loss = loss_fn(embeddings, labels, level_labels=None)

``embeddings`` ``(N, D)`` float (L2-normalised inside, so raw model outputs are fine), ``labels`` ``(N,)``
integer class ids, ``level_labels`` ``(N, L)`` integer ids of each level's label prefix (see
:func:`level_label_matrix`).  Flat losses ignore ``level_labels``; hierarchical losses need it and ignore
``labels``.  ``loss_fn.needs_level_labels`` tells which is which.

The MS loss and pml's parametrisation
-------------------------------------
For anchor *i* with cosine similarities :math:`S_{ik}` to the other samples of the batch, positive set
:math:`P_i` and negative set :math:`N_i`::

    L_i = 1/alpha * log(1 + sum_{k in P_i} exp(-alpha * (S_ik - base)))
        + 1/beta  * log(1 + sum_{k in N_i} exp( beta  * (S_ik - base)))

and the batch loss is the mean of :math:`L_i` over **all** N anchors (pml's default ``MeanReducer``;
anchors with no mined pair contribute exactly 0 and still count in the denominator — read in pml 2.9's
source and measured, see ``tests/test_losses.py``; a version of pml's documentation page says the
default reducer averages over anchors that have pairs, which is not what 2.9 does).

* ``alpha`` (positive scale): how sharply positive pairs are weighted by their hardness.  Small (2)
  means positives are weighted nearly equally — the pull on every positive below ``base`` is soft.
* ``beta`` (negative scale): the same for negatives.  Large (50) makes the negative term close to a
  smooth max: nearly all the push goes to the hardest negatives.
* ``base`` (the paper's lambda): the similarity threshold/margin.  Positives are pulled hard while
  :math:`S_{ik} < \\lambda` and negatives pushed hard while :math:`S_{ik} > \\lambda`.  pml's ``base`` *is*
  lambda — same sign, same place in the exponent (pml computes ``margin(mat, base) = base - S`` for the
  positive term and ``S - base`` for the negative term with its cosine similarity), no
  re-parametrisation.
* ``epsilon`` (miner margin, pml ``MultiSimilarityMiner``): for each anchor keep the negatives with
  :math:`S_{in} + \\epsilon > \\min_{p} S_{ip}` (harder than the hardest positive minus epsilon) and the
  positives with :math:`S_{ip} - \\epsilon < \\max_{n} S_{in}` (harder than the hardest negative plus
  epsilon); everything else is dropped before weighting.

Defaults alpha=2, beta=50, base=0.5, epsilon=0.1.  Wang et al. (CVPR 2019) report alpha=2, beta=50,
epsilon=0.1; for lambda, secondary sources that quote the paper's text (pml's documentation page and a
TensorFlow port citing it) give lambda=1, while the authors' released code
(``MalongTech/research-ms-loss``, ``ret_benchmark/losses/multi_similarity_loss.py``) hard-codes
``thresh = 0.5`` (alpha and beta come from its config files as ``SCALE_POS``/``SCALE_NEG``, not seen
here).  pml's default ``base=0.5`` follows the code.  With cosine similarity (<= 1), lambda=1 makes every
positive "below threshold", so all positives are always pulled; with lambda=0.5 the pull on a positive
fades once its similarity is well above 0.5.  We keep
0.5 (the released code, pml's default); pass ``base=1.0`` for the text's value.  (The paper text itself
could not be consulted offline.)

Differences between the released MS code and pml that matter for the reproductions: the released code
(a) keeps an anchor only when it has at least one mined positive *and* one mined negative (pml keeps the
positive or negative part alone), (b) drops "positives" with similarity >= 1 - 1e-5 (duplicates), pml only
the diagonal, and (c) divides the sum by the batch size (like pml's mean over all anchors).  The
per-sample reproduction here follows pml exactly, so that its mean equals pml's loss.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import nn

from vericar.data.hierarchy import LEVELS, level_keys

__all__ = [
    "ACCUMULATION_VARIANTS",
    "DEFAULT_MS_PARAMS",
    "GRAPH_CUTTING_VARIANTS",
    "GRAPH_PRESERVING_VARIANTS",
    "LOSSES",
    "RAISING_VARIANTS",
    "ZHANG_LEVEL_WEIGHTS",
    "AccumulatedMSLoss",
    "HierarchicalLossWrapper",
    "HierarchicalMSLoss",
    "MSLoss",
    "PROXY_LOSSES",
    "ProxyLoss",
    "SeedHierarchicalLoss",
    "accumulate",
    "gradient_report",
    "level_label_matrix",
    "loss_names",
    "make_loss",
    "per_sample_ms_losses",
]

DEFAULT_MS_PARAMS: dict[str, float] = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1}

#: Zhang et al.'s released ``hmce`` penalty ``2 ** (1 / l)`` with ``l = 1`` the finest level, written in
#: our coarse-to-fine level order (make, type, model, year): finer levels weigh more.
ZHANG_LEVEL_WEIGHTS: tuple[float, ...] = tuple(2.0 ** (1.0 / l) for l in (4, 3, 2, 1))


# ==================================================================================================
# 1. Flat Multi-Similarity loss (pml)
# ==================================================================================================

class MSLoss(nn.Module):
    """pml ``MultiSimilarityLoss(alpha, beta, base)``, after ``MultiSimilarityMiner(epsilon)`` if ``mine``.

    ``forward(embeddings, labels, level_labels=None)``; ``level_labels`` is ignored.  See the module
    docstring for what the parameters do.
    """

    needs_level_labels = False

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1,
                 mine: bool = True):
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon, self.mine = alpha, beta, base, epsilon, mine
        self.loss_fn = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
        self.miner = pml_miners.MultiSimilarityMiner(epsilon=epsilon) if mine else None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                level_labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("MSLoss needs labels (N,)")
        labels = torch.as_tensor(labels, device=embeddings.device)
        if self.miner is None:
            return self.loss_fn(embeddings, labels)
        return self.loss_fn(embeddings, labels, self.miner(embeddings, labels))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}, "
                f"mine={self.mine}")


class ProxyLoss(nn.Module):
    """A pytorch-metric-learning proxy / classification loss with one learned vector per training class.

    ``kind``: ``"proxy_anchor"`` (Kim et al. 2020, pml defaults margin 0.1, alpha 32), ``"norm_softmax"``
    (Zhai & Wu 2019, temperature 0.05) or ``"arcface"`` (Deng et al. 2019, pml defaults margin 28.6 degrees,
    scale 64). The proxies are parameters of this module: they need their own optimizer group at a much larger
    learning rate than the network (``TrainConfig.proxy_lr``; the Proxy-Anchor paper uses 100x), and they are
    saved with the run so that the class scores (:meth:`logits`) can serve as open-set scores (MSP, max logit,
    energy). ``classes`` are the label values trained on; labels are mapped to proxy rows internally.
    """

    needs_level_labels = False

    def __init__(self, kind: str, classes: Sequence[int], embedding_size: int, **kw):
        super().__init__()
        if kind not in PROXY_LOSSES:
            raise ValueError(f"unknown proxy loss {kind!r}; choose one of {sorted(PROXY_LOSSES)}")
        classes = np.asarray(classes, dtype=np.int64)
        if len(classes) < 2 or len(np.unique(classes)) != len(classes):
            raise ValueError(f"a proxy loss needs at least 2 distinct training classes, got {len(classes)}")
        self.kind = kind
        self.register_buffer("classes", torch.from_numpy(classes))
        self.loss_fn = PROXY_LOSSES[kind](num_classes=len(classes), embedding_size=embedding_size, **kw)

    def _rows(self, labels: torch.Tensor) -> torch.Tensor:
        rows = torch.searchsorted(self.classes, labels)
        bad = (rows >= len(self.classes)) | (self.classes[rows.clamp(max=len(self.classes) - 1)] != labels)
        if bad.any():
            raise ValueError(f"labels {labels[bad][:5].tolist()} are not among the proxy loss's training classes")
        return rows

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                level_labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError(f"{self.kind} needs labels (N,)")
        labels = torch.as_tensor(labels, device=embeddings.device)
        return self.loss_fn(embeddings, self._rows(labels))

    def proxies(self) -> torch.Tensor:
        """The class vectors, L2-normalised, one row per entry of ``classes``."""
        w = self.loss_fn.proxies if hasattr(self.loss_fn, "proxies") else self.loss_fn.W.t()
        return F.normalize(w.detach().float(), dim=-1)

    @property
    def scale(self) -> float:
        """The factor the loss multiplies cosine similarities by (its softmax temperature's inverse)."""
        if self.kind == "proxy_anchor":
            return float(self.loss_fn.alpha)
        if self.kind == "norm_softmax":
            return 1.0 / self.loss_fn.temperature
        return float(self.loss_fn.scale)

    @torch.no_grad()
    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding to each class proxy ``(N, classes)``, times :attr:`scale`."""
        return self.scale * F.normalize(embeddings.float(), dim=-1) @ self.proxies().to(embeddings.device).t()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, classes={len(self.classes)}"


#: Proxy loss name -> pml class. Built by :func:`make_loss` with ``classes`` and ``embedding_size``.
PROXY_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "proxy_anchor": pml_losses.ProxyAnchorLoss,
    "norm_softmax": pml_losses.NormalizedSoftmaxLoss,
    "arcface": pml_losses.ArcFaceLoss,
}


# ==================================================================================================
# 2. Reproductions of the seed's "gradient bug"
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
# 3. Hierarchical MS losses
# ==================================================================================================

_CONSTRAINTS = ("min", "max", "none")
_ORDERS = ("fine_to_coarse", "coarse_to_fine")


def _check_level_labels(level_labels: torch.Tensor, n: int, n_levels: int, device) -> torch.Tensor:
    level_labels = torch.as_tensor(level_labels, device=device)
    if level_labels.ndim != 2 or level_labels.shape != (n, n_levels):
        raise ValueError(f"level_labels must have shape (N, L) = ({n}, {n_levels}), "
                         f"got {tuple(level_labels.shape)}")
    return level_labels


class HierarchicalMSLoss(nn.Module):
    """Hierarchical Multi-Similarity loss over label levels (make > type > model > year by default).

    Formula (``L`` levels, column ``l`` of ``level_labels`` = id of the label prefix down to level ``l``,
    level 0 the coarsest)::

        M_l  = MS_l(embeddings)            pml MultiSimilarityLoss + MultiSimilarityMiner with labels[:, l]
        C    = constrained losses:
                 order "fine_to_coarse" (default):  C_{L-1} = M_{L-1};  C_l = op(M_l, C_{l+1}), l = L-2..0
                 order "coarse_to_fine":            C_0 = M_0;          C_l = op(M_l, C_{l-1}), l = 1..L-1
               op = torch.maximum ("max"), torch.minimum ("min"); "none": C_l = M_l
        loss = sum_l w_l C_l / sum_l w_l                     (w = level_weights)

    The recursion is against the already-constrained neighbour, so ``C_l`` is the running max/min of the
    raw losses from the starting level to ``l``.  ``torch.maximum``/``torch.minimum`` are differentiable:
    the gradient of ``C_l`` flows into whichever level's loss wins (shared equally on exact ties).

    Where this is an interpretation (the Veri-Car paper's HiMS-Min formula is not available):

    * "max" follows Zhang et al. (CVPR 2022) *as released* (salesforce/hierarchicalContrastiveLearning,
      ``HMLC`` with ``loss_type='hce'``/``'hmce'``): the loop runs from the finest level up and each level's
      loss is ``max(own loss, running max of the finer levels' losses)`` — a coarser level's loss is never
      smaller than a finer level's ("lower layer" in that code is the *finer* one).  That is
      ``order="fine_to_coarse"``.  ``order="coarse_to_fine"`` is the reverse reading (a finer level's loss
      is never smaller than the coarser one's), offered for comparison.
    * "min" (HiMS-Min) is the same recursion with ``torch.minimum`` — our reading of the name.
    * Zhang et al. use SupCon per level; here each level is an MS loss with MS mining.  Their code also
      keeps only one sample per distinct label prefix when moving to a coarser level, and divides the sum
      by the number of label columns; we keep all samples at every level and use the weighted mean above.
    * Weights: default equal (1, 1, 1, 1).  Zhang et al.'s released ``hmce`` penalty is ``2 ** (1 / l)``
      with ``l = 1`` the finest level, i.e. finer levels weigh more: :data:`ZHANG_LEVEL_WEIGHTS`.

    A level whose batch has no positive (or no negative) pair contributes 0 (pml's behaviour).

    What the constraint does depends on which levels' losses are larger.  With random (untrained)
    embeddings the raw losses fall from coarse to fine (measured on a 32-sample BMW/Audi batch of
    Stanford Cars classes: make 1.92, type 1.20, model 1.10, year 1.10), so there "max" with the default
    order is inactive (= "none"), while "min" with the default order replaces every level by the finest
    level's loss (the whole loss, and its gradient, is the year level's); with ``order="coarse_to_fine"``
    it is the other way round ("min" inactive, "max" makes every level the make loss).

    After each forward, ``last_level_losses`` and ``last_constrained_losses`` hold the detached ``M`` and
    ``C`` (shape ``(L,)``) for logging.
    """

    needs_level_labels = True

    def __init__(self, level_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), constraint: str = "min",
                 alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1,
                 order: str = "fine_to_coarse"):
        super().__init__()
        if constraint not in _CONSTRAINTS:
            raise ValueError(f"constraint must be one of {_CONSTRAINTS}, got {constraint!r}")
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        weights = [float(w) for w in level_weights]
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"level_weights must be non-negative with a positive sum, got {level_weights}")
        self.level_weights = tuple(weights)
        self.constraint, self.order = constraint, order
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.ms = MSLoss(alpha, beta, base, epsilon, mine=True)
        self.last_level_losses: torch.Tensor | None = None
        self.last_constrained_losses: torch.Tensor | None = None

    @property
    def n_levels(self) -> int:
        return len(self.level_weights)

    def level_losses(self, embeddings: torch.Tensor, level_labels: torch.Tensor) -> list[torch.Tensor]:
        """Unconstrained per-level MS losses ``[M_0, ..., M_{L-1}]`` (coarsest first)."""
        level_labels = _check_level_labels(level_labels, embeddings.shape[0], self.n_levels, embeddings.device)
        return [self.ms(embeddings, level_labels[:, l]) for l in range(self.n_levels)]

    def constrain(self, level_losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Apply the hierarchical constraint to per-level losses (see the class docstring)."""
        losses = list(level_losses)
        if self.constraint == "none":
            return losses
        op = torch.minimum if self.constraint == "min" else torch.maximum
        out = list(losses)
        idx = range(len(losses) - 2, -1, -1) if self.order == "fine_to_coarse" else range(1, len(losses))
        step = 1 if self.order == "fine_to_coarse" else -1
        for l in idx:
            out[l] = op(losses[l], out[l + step])
        return out

    def forward(self, embeddings: torch.Tensor, level_labels: torch.Tensor) -> torch.Tensor:
        raw = self.level_losses(embeddings, level_labels)
        constrained = self.constrain(raw)
        total = sum(w * c for w, c in zip(self.level_weights, constrained)) / sum(self.level_weights)
        self.last_level_losses = torch.stack([r.detach() for r in raw])
        self.last_constrained_losses = torch.stack([c.detach() for c in constrained])
        return total

    def extra_repr(self) -> str:
        return (f"level_weights={self.level_weights}, constraint={self.constraint!r}, order={self.order!r}, "
                f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}")


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


class HierarchicalLossWrapper(nn.Module):
    """Gives a hierarchical loss the common signature ``(embeddings, labels, level_labels=None)``.

    ``labels`` is ignored (the finest level column of ``level_labels`` plays its role); ``level_labels``
    is required.  The wrapped loss is ``.hierarchical``.
    """

    needs_level_labels = True

    def __init__(self, hierarchical: HierarchicalMSLoss):
        super().__init__()
        self.hierarchical = hierarchical

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                level_labels: torch.Tensor | None = None) -> torch.Tensor:
        if level_labels is None:
            raise ValueError("hierarchical losses need level_labels (N, L); see vericar.losses.level_label_matrix")
        return self.hierarchical(embeddings, level_labels)


def level_label_matrix(class_index: np.ndarray, class_table: pd.DataFrame,
                       levels: Sequence[str] = LEVELS) -> np.ndarray:
    """Integer id of each level's label prefix for each sample: ``(N, len(levels))`` int64.

    ``class_index`` holds 0-based class indices, i.e. positions of rows of ``class_table`` (a table with
    columns make, type, model, year, e.g. :func:`vericar.data.hierarchy.hierarchy_table`).  Column ``l``
    is the id of :func:`vericar.data.hierarchy.level_keys` at ``levels[l]``: make; make+type;
    make+type+model; make+type+model+year.  Ids are numbered by first appearance in ``class_table`` (so
    they depend only on the table, not on the batch); two samples share column ``l`` iff their classes
    agree on every level down to ``levels[l]``.
    """
    class_index = np.asarray(class_index)
    if class_index.ndim != 1:
        raise ValueError(f"class_index must be 1-D, got shape {class_index.shape}")
    if class_index.size and not np.issubdtype(class_index.dtype, np.integer):
        raise ValueError(f"class_index must hold integers, got dtype {class_index.dtype}")
    n_classes = len(class_table)
    if class_index.size and (class_index.min() < 0 or class_index.max() >= n_classes):
        raise ValueError(f"class_index out of range [0, {n_classes}): min {class_index.min()}, "
                         f"max {class_index.max()}")
    columns = []
    for level in levels:
        codes, _ = pd.factorize(level_keys(class_table, level), sort=False)
        columns.append(codes.astype(np.int64)[class_index])
    return np.stack(columns, axis=1) if columns else np.zeros((len(class_index), 0), dtype=np.int64)


# ==================================================================================================
# Registry
# ==================================================================================================

def _build_ms(alpha, beta, base, epsilon, **kw):
    return MSLoss(alpha, beta, base, epsilon, mine=True, **kw)


def _build_ms_nominer(alpha, beta, base, epsilon, **kw):
    return MSLoss(alpha, beta, base, epsilon, mine=False, **kw)


def _hier_builder(constraint: str):
    def build(alpha, beta, base, epsilon, **kw):
        return HierarchicalLossWrapper(HierarchicalMSLoss(constraint=constraint, alpha=alpha, beta=beta,
                                                          base=base, epsilon=epsilon, **kw))
    return build


def _build_seed_clamp(alpha, beta, base, epsilon, **kw):
    return HierarchicalLossWrapper(SeedHierarchicalLoss(alpha=alpha, beta=beta, base=base, epsilon=epsilon, **kw))


def _accum_builder(variant: str):
    def build(alpha, beta, base, epsilon, **kw):
        return AccumulatedMSLoss(variant, alpha, beta, base, epsilon, **kw)
    return build


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ms": _build_ms,
    "ms_nominer": _build_ms_nominer,
    "hims_min": _hier_builder("min"),
    "hims_max": _hier_builder("max"),
    "hims_none": _hier_builder("none"),
    "seed_hier_clamp": _build_seed_clamp,
    **{f"ms_accum:{v}": _accum_builder(v) for v in ACCUMULATION_VARIANTS},
}
"""Loss name -> builder ``(alpha, beta, base, epsilon, **kw) -> module``.  Use :func:`make_loss`.

``kw``: ``ms``/``ms_nominer`` none; ``hims_*`` ``level_weights``, ``order``; ``seed_hier_clamp``
``level_weights``, ``order``; ``ms_accum:*`` ``mean_over``.
"""


def loss_names() -> list[str]:
    """All registered loss names."""
    return list(LOSSES) + list(PROXY_LOSSES)


def make_loss(name: str = "ms", *, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
              epsilon: float = 0.1, **kw) -> nn.Module:
    """Build a loss by name; call it as ``loss(embeddings, labels, level_labels=None)``.

    Names (:data:`LOSSES`):

    * ``"ms"``: pml ``MultiSimilarityMiner(epsilon)`` then ``MultiSimilarityLoss(alpha, beta, base)``.
    * ``"ms_nominer"``: the MS loss on all pairs.
    * ``"ms_accum:<variant>"``: per-sample MS loss reduced with an accumulation variant
      (:data:`ACCUMULATION_VARIANTS`); the graph-cutting ones cannot train.
    * ``"hims_min"``, ``"hims_max"``, ``"hims_none"``: :class:`HierarchicalMSLoss` with constraint
      min / max / none (plain weighted mean); need ``level_labels``.
    * ``"seed_hier_clamp"``: :class:`SeedHierarchicalLoss`; needs ``level_labels``.
    * ``"proxy_anchor"``, ``"norm_softmax"``, ``"arcface"``: :class:`ProxyLoss` (pml); need ``classes`` and
      ``embedding_size`` keywords; the MS parameters do not apply.

    Parameters (see the module docstring): ``alpha`` positive-pair scale, ``beta`` negative-pair scale,
    ``base`` the similarity threshold lambda, ``epsilon`` the MS miner's margin.  Defaults 2, 50, 0.5,
    0.1 (Wang et al. 2019 / their released code / pml defaults).  Extra keywords go to the loss (e.g.
    ``level_weights=...``, ``order=...``, ``mean_over=...``).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name in PROXY_LOSSES:
        if "classes" not in kw or "embedding_size" not in kw:
            raise ValueError(f"{name} is a proxy loss: pass classes=<training class labels> and embedding_size")
        return ProxyLoss(name, **kw)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(loss_names())}")
    return LOSSES[name](alpha, beta, base, epsilon, **kw)


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
