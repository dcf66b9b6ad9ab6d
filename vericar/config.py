"""What defines a training run: :class:`TrainConfig`, saved as a run folder's ``config.json``.

Its defaults are the study's reference recipe (the ``full`` profile of :mod:`vericar.study` reads them); the
notebooks' parameter cells hold the ``quick`` profile. :mod:`vericar.train` trains a config and
:mod:`vericar.runs` reads and checks run folders against one; neither imports the other for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

SAMPLERS = ("m_per_class", "shuffle")
#: The recipe's cached augmented views (val P@1 0.829 with 4 against 0.794 with none, results/recipe_search.md);
#: ``aug_views=RECIPE_VIEWS`` (the default) means this for the cached modes and 0 for a fine-tune.
CACHED_AUG_VIEWS = 4
RECIPE_VIEWS = -1


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``; a resumed run must match it).

    The defaults are the reference recipe, chosen on protocol ``val`` (results/recipe_search.md): the last 2
    EfficientNet-Lite0 stages + head on the cached trunk at 192 px, Proxy-Anchor loss, flip TTA, 4 cached
    augmented views (random resized crop, flip, colour jitter; one drawn per image and step), 20 epochs: val
    P@1 0.842 (``pa-k2-aug4-e20-192px``), against 0.829 at 160 px, 0.794 at 160 px without the augmented views.
    """

    protocol: str = "official"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 192  # the 128 px crops upsampled: val P@1 0.619 / 0.715 / 0.771 at 128 / 160 / 192 px (10 epochs)
    embedding_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1
    train_backbone: bool = False  # True: fine-tune everything on images (the GPU path)
    trainable_stages: int = 2  # with train_backbone=False: last backbone stages trained on cached trunk outputs
    epochs: int = 20
    batch_size: int = 128
    m_per_class: int = 4
    sampler: str = "m_per_class"
    backbone_lr: float = 1e-3
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    loss: str = "proxy_anchor"
    loss_kwargs: dict = field(default_factory=dict)
    proxy_lr: float = 1e-2  # the class proxies of a proxy loss (proxy_anchor, norm_softmax, arcface)
    augment: bool = True
    # cached modes: extra randomly augmented views of every image cached besides its mirror. The default
    # (RECIPE_VIEWS) resolves to 4 for the cached modes and to 0 for a fine-tune, which augments on the fly.
    aug_views: int = RECIPE_VIEWS
    eval_augment: bool = False  # the seed's bug, reproduced on purpose: evaluate with train-time augmentation
    eval_every: int = 5
    save_pooled: bool = False  # also save the trained backbone's pooled features (KNN+ on them, notebook 06)
    eval_k: int = 1
    flip_tta: bool = True  # evaluate (and later embed) each image as the mean of it and its mirror image
    amp: bool = True
    cpu_bf16: bool = False  # bf16 autocast for the training forward on the CPU too (CUDA uses it when amp)
    seed: int = 0
    device: str = "auto"
    # split protocol parameters
    val_fraction: float = 0.2
    holdout: str = "model"
    holdout_fraction: float = 0.2
    ssb_file: str = ""  # protocol "ssb": the SSB class split; "" looks beside the dataset (splits.SSB_DEFAULT)
    # open-set protocols (ssb, open-world): train on splits.validation_split of the protocol's training images
    # instead (some known models play the unknowns), to choose OOD scores, k and thresholds without test images
    validation: bool = False
    # a finished run folder whose trained weights (and class proxies, for a proxy loss) start this run instead of
    # the ImageNet weights, e.g. a full fine-tune from the best partial model; it must have trained on no image
    # this run evaluates on (checked). The run's "frozen" baseline (metrics.json) is then that starting model's.
    init_from: str = ""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.sampler == "m_per_class" and self.batch_size % self.m_per_class:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of m_per_class ({self.m_per_class})")
        if self.aug_views == RECIPE_VIEWS:
            self.aug_views = 0 if self.train_backbone else CACHED_AUG_VIEWS
        if self.aug_views < 0 or (self.aug_views and self.train_backbone):
            raise ValueError(f"aug_views={self.aug_views}: cached augmented views are for train_backbone=False "
                             "(a fine-tune augments every batch on the fly): pass aug_views=0 with train_backbone=True, "
                             "0 or more with the cached modes")

    def describe(self) -> str:
        """The training mode in words, for tables and results files."""
        if self.train_backbone:
            mode = "fine-tune (backbone + head)"
        elif self.trainable_stages:
            k = self.trainable_stages
            mode = f"last {k} backbone stage{'s' if k > 1 else ''} + head on cached trunk"
        else:
            mode = "head only on frozen, cached backbone features"
        if self.aug_views:
            mode += f", {self.aug_views} augmented views"
        return mode + (", flip TTA" if self.flip_tta else "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


#: Settings that do not change the trained model: evaluation only reads it, and each epoch's randomness is
#: seeded from (seed, epoch). A finished or interrupted run is reused whatever they are.
NOT_AFFECTING_THE_MODEL = ("eval_every", "save_pooled")

#: Fields added after run folders existed -> the value their absence from an older ``config.json`` means
#: (what every run did before the field), so that older runs are still reused and resumed.
ADDED_SINCE: dict[str, Any] = {"init_from": "", "validation": False}

