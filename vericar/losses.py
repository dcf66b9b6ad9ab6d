"""Metric-learning losses of the core pipeline: Multi-Similarity (MS), proxy losses, hierarchical MS, by name.

1. **Multi-Similarity loss + miner** (:func:`make_loss` ``"ms"``, ``"ms_nominer"``), straight from
   pytorch-metric-learning (pml), and pml's **proxy losses** (``"proxy_anchor"``, ``"norm_softmax"``,
   ``"arcface"``, :class:`ProxyLoss`).

2. **Hierarchical MS losses** over make > type > model > year (:class:`HierarchicalMSLoss`, names
   ``"hims_min"``, ``"hims_max"``, ``"hims_none"``); :func:`level_label_matrix` builds their labels.

3. **The registry** (:data:`LOSSES`, :func:`make_loss`): loss name -> builder.  Modules outside the core add
   their own losses with :func:`register_loss` when they are imported; the reproductions of a seed
   re-implementation's "gradient bug" (names ``"ms_accum:<variant>"`` and ``"seed_hier_clamp"``) live in
   :mod:`vericar.analyses.seed_losses` that way, so the core never imports the analyses.  A name that is
   not registered (e.g. a run folder of notebook 02 resumed in a fresh process that has not imported that
   module) raises a ``ValueError`` naming the module to import (:data:`LOSS_PROVIDERS`).

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
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import nn

from vericar.data.hierarchy import LEVELS, level_keys

__all__ = [
    "DEFAULT_MS_PARAMS",
    "LOSSES",
    "LOSS_PROVIDERS",
    "PROXY_LOSSES",
    "ZHANG_LEVEL_WEIGHTS",
    "HierarchicalLossWrapper",
    "HierarchicalMSLoss",
    "LossBuilder",
    "MSLoss",
    "ProxyLoss",
    "check_loss_name",
    "level_label_matrix",
    "loss_names",
    "make_loss",
    "register_loss",
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
# 2. Hierarchical MS losses
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
# 3. Registry
# ==================================================================================================

LossBuilder = Callable[..., nn.Module]
"""A loss builder: ``(alpha, beta, base, epsilon, **kw) -> module`` with the call convention above."""


def _build_ms(alpha, beta, base, epsilon, **kw):
    return MSLoss(alpha, beta, base, epsilon, mine=True, **kw)


def _build_ms_nominer(alpha, beta, base, epsilon, **kw):
    return MSLoss(alpha, beta, base, epsilon, mine=False, **kw)


def _hier_builder(constraint: str):
    def build(alpha, beta, base, epsilon, **kw):
        return HierarchicalLossWrapper(HierarchicalMSLoss(constraint=constraint, alpha=alpha, beta=beta,
                                                          base=base, epsilon=epsilon, **kw))
    return build


LOSSES: dict[str, LossBuilder] = {
    "ms": _build_ms,
    "ms_nominer": _build_ms_nominer,
    "hims_min": _hier_builder("min"),
    "hims_max": _hier_builder("max"),
    "hims_none": _hier_builder("none"),
}
"""Loss name -> builder ``(alpha, beta, base, epsilon, **kw) -> module``.  Use :func:`make_loss`.

The core's losses, then those other modules added with :func:`register_loss` (once imported).  ``kw``:
``ms``/``ms_nominer`` none; ``hims_*`` ``level_weights``, ``order``.
"""

_CORE_LOSSES = frozenset(LOSSES) | frozenset(PROXY_LOSSES)

LOSS_PROVIDERS: dict[str, str] = {
    "ms_accum:": "vericar.analyses.seed_losses",
    "seed_hier_clamp": "vericar.analyses.seed_losses",
}
"""Loss name prefix -> the module that registers the losses so named when it is imported.

Only read to say what to import when a name is not registered (a run folder's ``config.json`` keeps the
loss by name; resuming it in a fresh process needs its module imported first): the core never imports
these modules itself.
"""


def register_loss(name: str, builder: LossBuilder) -> None:
    """Make ``make_loss(name)`` call ``builder(alpha, beta, base, epsilon, **kw)``; for modules outside the core.

    Registering the same name again from the same module (a re-import or reload) replaces the builder.

    Raises:
        ValueError: ``name`` is one of the core's losses, or is registered already by another module.
    """
    if name in _CORE_LOSSES:
        raise ValueError(f"{name!r} is one of vericar.losses' own losses; register another name")
    old = LOSSES.get(name)
    if old is not None and getattr(old, "__module__", None) != getattr(builder, "__module__", None):
        raise ValueError(f"loss {name!r} is registered already, by {getattr(old, '__module__', '?')}")
    LOSSES[name] = builder


def loss_names() -> list[str]:
    """All loss names :func:`make_loss` knows now (the core's and those registered so far)."""
    return list(LOSSES) + list(PROXY_LOSSES)


def check_loss_name(name: str) -> None:
    """Raise ``ValueError`` unless :func:`make_loss` knows ``name``; the message says which module to import
    when a known provider (:data:`LOSS_PROVIDERS`) registers it, and lists the known names."""
    if name in LOSSES or name in PROXY_LOSSES:
        return
    providers = [module for prefix, module in LOSS_PROVIDERS.items() if name.startswith(prefix)]
    hint = (f"; it is registered by {providers[0]}: import that module first (e.g. `import {providers[0]}`)"
            if providers else "")
    raise ValueError(f"unknown loss {name!r}{hint}; known losses: {', '.join(loss_names())}")


def make_loss(name: str = "ms", *, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
              epsilon: float = 0.1, **kw) -> nn.Module:
    """Build a loss by name; call it as ``loss(embeddings, labels, level_labels=None)``.

    Names (:data:`LOSSES`, :data:`PROXY_LOSSES`):

    * ``"ms"``: pml ``MultiSimilarityMiner(epsilon)`` then ``MultiSimilarityLoss(alpha, beta, base)``.
    * ``"ms_nominer"``: the MS loss on all pairs.
    * ``"hims_min"``, ``"hims_max"``, ``"hims_none"``: :class:`HierarchicalMSLoss` with constraint
      min / max / none (plain weighted mean); need ``level_labels``.
    * ``"proxy_anchor"``, ``"norm_softmax"``, ``"arcface"``: :class:`ProxyLoss` (pml); need ``classes`` and
      ``embedding_size`` keywords; the MS parameters do not apply.
    * whatever other modules registered (:func:`register_loss`), e.g. once
      :mod:`vericar.analyses.seed_losses` is imported ``"ms_accum:<variant>"`` and ``"seed_hier_clamp"``.

    Parameters (see the module docstring): ``alpha`` positive-pair scale, ``beta`` negative-pair scale,
    ``base`` the similarity threshold lambda, ``epsilon`` the MS miner's margin.  Defaults 2, 50, 0.5,
    0.1 (Wang et al. 2019 / their released code / pml defaults).  Extra keywords go to the loss (e.g.
    ``level_weights=...``, ``order=...``).

    Raises:
        ValueError: unknown name (see :func:`check_loss_name`).
    """
    check_loss_name(name)
    if name in PROXY_LOSSES:
        if "classes" not in kw or "embedding_size" not in kw:
            raise ValueError(f"{name} is a proxy loss: pass classes=<training class labels> and embedding_size")
        return ProxyLoss(name, **kw)
    return LOSSES[name](alpha, beta, base, epsilon, **kw)
