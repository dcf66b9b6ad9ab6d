"""One training loop for the embedding model, producing a run folder that every later notebook reads.

    python -m vericar.train --dataset stanford_cars --data-dir ../shared/data/stanford_cars_small \\
        --protocol official --image-size 224 --epochs 30 --run-dir runs/full/models/official

Three modes, one loop:

* **fine-tune** (``train_backbone=True``): backbone + head trained end to end on images decoded once and
  augmented on the device (random resized crop, flip, colour jitter), AdamW with separate learning rates,
  linear warm-up + cosine decay per step, bf16 autocast and channels_last on CUDA. The GPU path.
* **partial** (``train_backbone=False, trainable_stages=k``): the frozen trunk's outputs are computed once
  (and cached on disk); the last ``k`` backbone stages and the head train on them. Most of a fine-tune's
  gain for a fraction of its cost: the practical way to adapt the backbone on a 2-core CPU.
* **head-only** (``train_backbone=False, trainable_stages=0``): the same with pooled backbone features;
  the head trains in seconds.

In the cached modes the features of mirrored images serve as augmentation.

Batches are class-balanced (pytorch-metric-learning's ``MPerClassSampler``: ``batch_size / m`` classes,
``m`` images each): plain shuffled batches of 64 over 196 classes leave most anchors without a positive,
which starves the Multi-Similarity loss. Evaluation always uses the eval transform (no augmentation).

A run folder holds ``config.json``, ``checkpoint.pt`` (resumable, saved every epoch), ``history.csv``
(loss, learning rates, metrics per evaluation), ``embeddings.npz`` (trained and frozen-backbone
embeddings of every image, float16) and ``metrics.json`` (frozen baseline vs trained). Calling
:func:`train` on a finished run folder with the same config loads it instead of retraining, and on an
interrupted one resumes it; with another config (or other data under the same path: the config records a
fingerprint of the file list and labels) it refuses, naming the differing fields, unless ``overwrite=True``
(``--overwrite``). Every file is written atomically and checkpoints load with ``weights_only=True``
(see :mod:`vericar.runio`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_metric_learning.samplers import MPerClassSampler
from tqdm.auto import tqdm

from . import distributed
from .data import CarsDataset, Split, make_split, open_dataset
from .embed import (augment, augment_normalized, cached_features, decode_images, embed_batches, l2_normalize,
                    normalize_float, resolve_device)
from .evaluation import evaluate_embeddings
from .losses import PROXY_LOSSES, level_label_matrix, make_loss
from .models import build_model, flip_average, split_backbone
from .runio import (RunFileError, atomic_path, data_fingerprint, load_checkpoint, load_npz, read_json,
                    save_checkpoint, write_json)

SAMPLERS = ("m_per_class", "shuffle")
DEFAULT_CACHE = Path.home() / ".cache" / "vericar" / "features"


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json``; a resumed run must match it)."""

    protocol: str = "official"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int = 224
    embedding_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1
    train_backbone: bool = True
    trainable_stages: int = 0  # with train_backbone=False: last backbone stages trained on cached trunk outputs
    epochs: int = 20
    batch_size: int = 128
    m_per_class: int = 4
    sampler: str = "m_per_class"
    backbone_lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    loss: str = "ms"
    loss_kwargs: dict = field(default_factory=dict)
    proxy_lr: float = 1e-2  # the class proxies of a proxy loss (proxy_anchor, norm_softmax, arcface)
    augment: bool = True
    aug_views: int = 0  # cached modes: extra randomly augmented views of every image cached besides its mirror
    eval_augment: bool = False  # the seed's bug, reproduced on purpose: evaluate with train-time augmentation
    eval_every: int = 1
    save_pooled: bool = False  # also save the trained backbone's pooled features (KNN+ on them, notebook 06)
    eval_k: int = 1
    flip_tta: bool = False  # evaluate (and later embed) each image as the mean of it and its mirror image
    amp: bool = True
    cpu_bf16: bool = False  # bf16 autocast for the training forward on the CPU too (CUDA uses it when amp)
    seed: int = 0
    device: str = "auto"
    # split protocol parameters
    val_fraction: float = 0.2
    holdout: str = "model"
    holdout_fraction: float = 0.2
    ssb_file: str = ""  # protocol "ssb": the SSB class split; "" looks beside the dataset (splits.SSB_DEFAULT)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.sampler == "m_per_class" and self.batch_size % self.m_per_class:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of m_per_class ({self.m_per_class})")
        if self.aug_views < 0 or (self.aug_views and self.train_backbone):
            raise ValueError(f"aug_views={self.aug_views}: cached augmented views are for train_backbone=False "
                             "(a fine-tune augments every batch on the fly); use 0 or more with cached modes")

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


@dataclass
class TrainedRun:
    """A finished run folder, loaded: what notebooks 03-07 read."""

    path: Path
    config: TrainConfig
    history: pd.DataFrame
    embeddings: np.ndarray          # trained embeddings of every image of the dataset (L2-normalised)
    frozen_features: np.ndarray | None  # frozen-backbone features (L2-normalised); None in an exported run
    metrics: dict[str, Any]
    split: Split
    pooled: np.ndarray | None = None    # the trained backbone's pooled features (config.save_pooled), else None

    @property
    def frozen(self) -> np.ndarray:
        """Frozen-backbone features of every image (L2-normalised): the before-training baseline."""
        if self.frozen_features is None:
            raise FileNotFoundError(
                f"{self.path} is an exported run without frozen-backbone features (export_run(..., frozen=False)); "
                "its frozen baseline metrics are in metrics.json. Retrain with vericar.train to get them")
        return self.frozen_features

    @property
    def model_path(self) -> Path:
        """checkpoint.pt (weights + optimizer, resumable) or, in an exported run, model.pt (weights only)."""
        ckpt, exported = self.path / "checkpoint.pt", self.path / "model.pt"
        return exported if exported.is_file() and not ckpt.is_file() else ckpt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_for(cars: CarsDataset, config: TrainConfig) -> Split:
    return make_split(cars, config.protocol, seed=config.seed, val_fraction=config.val_fraction,
                      holdout=config.holdout, holdout_fraction=config.holdout_fraction,
                      ssb_file=config.ssb_file or None)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))
    return f


def _batches(labels: np.ndarray, config: TrainConfig, epoch: int) -> list[np.ndarray]:
    """Positions (into the training set) of each batch of one epoch, deterministic from seed and epoch."""
    n = len(labels)
    np.random.seed(config.seed * 10_007 + epoch)  # MPerClassSampler draws from numpy's global RNG
    if config.sampler == "shuffle":
        order = np.random.permutation(n)
    else:
        classes = len(np.unique(labels))
        if classes * config.m_per_class < config.batch_size:
            raise ValueError(f"{classes} training classes x m_per_class {config.m_per_class} < batch size "
                             f"{config.batch_size}; lower the batch size")
        sampler = MPerClassSampler(labels, m=config.m_per_class, batch_size=config.batch_size,
                                   length_before_new_iter=n)
        order = np.fromiter(iter(sampler), dtype=np.int64)
    steps = max(1, len(order) // config.batch_size)
    return [order[i * config.batch_size:(i + 1) * config.batch_size] for i in range(steps)]


def train(cars: CarsDataset, config: TrainConfig, run_dir: str | Path, *, split: Split | None = None,
          train_labels: np.ndarray | None = None, cache_dir: str | Path | None = DEFAULT_CACHE,
          progress: bool = True, resume: bool = True, overwrite: bool = False, callback=None) -> TrainedRun:
    """Train an embedding model on ``split`` (default: ``config.protocol``'s) and write the run folder.

    ``train_labels`` replaces the labels of the training images (0-based class indices, aligned with
    ``split.train``), e.g. to reproduce corrupted labels; evaluation always uses the true labels.
    ``cache_dir`` keeps backbone features between cached-mode runs (``None``: a temporary folder).
    ``callback(epoch, record)`` is called after each epoch's checkpoint is written (e.g. to plot live, or
    to stop: an exception raised there leaves a resumable run folder).

    A finished run folder with the same config (and data) is loaded, an interrupted one resumed
    (``resume=False``: restarted from epoch 0). A run folder holding a finished or interrupted run with another
    config, or trained on other data, raises :class:`RunConfigError` listing the differences; ``overwrite=True``
    deletes that run and trains anew. A finished run is never deleted otherwise.

    Under DDP (a process group started by :func:`vericar.distributed.init_from_env`, e.g. under torchrun)
    ``config.batch_size`` is the global batch, each rank trains on its slice, and rank 0 alone evaluates,
    writes the run folder and calls ``callback``; see :mod:`vericar.distributed`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ddp = distributed.context()
    progress = progress and ddp.is_main
    split = split if split is not None else split_for(cars, config)
    config_json = {**config.to_json(), "dataset": cars.name, "data_root": str(cars.root),
                   "data_fingerprint": data_fingerprint(cars)}
    if ddp.distributed:  # a single-process run's config.json stays as it was
        config_json["world_size"] = ddp.world_size
        distributed.check_batch_size(config.batch_size, config.m_per_class if config.sampler == "m_per_class" else None)
    _check_sizes(config)
    state = _existing_run(run_dir, config_json, resume=resume, overwrite=overwrite, is_main=ddp.is_main)
    if state == "finished":
        return load_run(run_dir, cars)

    device = distributed.device_for(resolve_device(config.device))
    seed_everything(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(config.backbone, config.embedding_dim, pretrained=config.pretrained,
                        dropout=config.dropout, hidden_dim=config.hidden_dim, flip_tta=config.flip_tta)
    if ddp.distributed and ddp.sync_batchnorm:  # before split_backbone takes references to submodules
        model = distributed.convert_sync_batchnorm(model, device)
    spec = model.spec
    if ddp.is_main:
        # a finished run with another config is being replaced: its results must not outlive it (a crash
        # before the end would otherwise leave the new config.json beside the old run's metrics)
        (run_dir / "metrics.json").unlink(missing_ok=True)
        write_json(run_dir / "config.json", config_json)

    labels_all = cars.labels
    y_train = labels_all[split.train] if train_labels is None else np.asarray(train_labels, dtype=np.int64)
    if len(y_train) != len(split.train):
        raise ValueError(f"train_labels has {len(y_train)} entries for {len(split.train)} training images")
    proxy_loss = config.loss in PROXY_LOSSES
    loss_kwargs = ({"classes": np.unique(y_train), "embedding_size": config.embedding_dim, **config.loss_kwargs}
                   if proxy_loss else config.loss_kwargs)
    loss_fn = distributed.wrap_loss(make_loss(config.loss, **loss_kwargs)).to(device)
    level_labels = (torch.from_numpy(level_label_matrix(y_train, cars.hierarchy))
                    if getattr(loss_fn, "needs_level_labels", False) else None)

    # ---- inputs: decoded images (fine-tune) or cached frozen-trunk outputs (head-only / partial) ----------
    if config.eval_augment and not config.train_backbone:
        raise ValueError("eval_augment reproduces evaluating with train-time image augmentation; it needs "
                         "train_backbone=True (head-only and partial runs evaluate cached features)")
    tail = None
    if config.train_backbone:
        images = decode_images(cars, np.arange(len(cars)), config.image_size, spec.interpolation,
                               progress=progress)
        model = model.to(device).to(memory_format=torch.channels_last).eval()
        features = (lambda x: flip_average(model.features, x)) if config.flip_tta else model.features
        def pooled_features() -> np.ndarray:
            """The backbone's pooled features of every image (flip-averaged with TTA), L2-normalised."""
            return l2_normalize(embed_batches(features, images, spec, device=device, amp=config.amp,
                                              progress=progress, desc="pooled features"))

        frozen = pooled_features() if ddp.is_main else None
        cached = flipped = None
    else:
        # Cache the trunk before the last stage even for head-only runs: head-only then applies the frozen
        # tail once, and head-only and last-stage runs share one pass over the images.
        cache_stages = config.trainable_stages or _default_cache_stages(model.backbone)
        trunk, tail = split_backbone(model.backbone, cache_stages)
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        if cache_dir is None:
            import tempfile
            cache_dir = tempfile.mkdtemp(prefix="vericar-features-")
        kw = dict(tag=f"trunk-{cache_stages}", device=device, progress=progress)
        mirrored = config.augment or config.flip_tta  # mirrored images' features: augmentation and/or TTA
        with distributed.main_first():  # rank 0 writes the feature cache, the others then read it
            features = cached_features(cars, trunk, spec, config.image_size, cache_dir,
                                       flips=(False, True) if mirrored else (False,),
                                       augment_views=config.aug_views if config.augment else 0, **kw)
            cached, flipped = features[0], (features[1] if mirrored else None)
            extra_views = features[2 if mirrored else 1:]
        images = None
        model = model.to(device).eval()
        if config.trainable_stages == 0 and cache_stages > 0:  # head only: pool through the frozen tail once
            cached = _apply_cached(tail, device, cached)
            flipped = _apply_cached(tail, device, flipped) if flipped is not None else None
            extra_views = [_apply_cached(tail, device, v) for v in extra_views]
            tail = torch.nn.Identity()
        # what a training step draws from, per image: plain, mirrored (augment) and the augmented views
        train_views = [cached] + ([flipped] if flipped is not None and config.augment else []) + extra_views
        for p in tail.parameters():
            p.requires_grad_(True)
        def pooled_features() -> np.ndarray:
            """The backbone's pooled features of every image (flip-averaged with TTA), L2-normalised."""
            return l2_normalize(_apply_cached(lambda *x: _tta(tail, config, *x), device, cached, flipped))

        frozen = pooled_features() if ddp.is_main else None

    def embed_all() -> np.ndarray:
        """Embeddings of every image in eval mode (with train-time augmentation only if eval_augment)."""
        model.eval()
        if cached is not None:
            return _apply_cached(lambda *x: _tta(lambda v: model.head(tail(v)), config, *x), device, cached, flipped)
        if config.eval_augment:
            gen = torch.Generator().manual_seed(config.seed + 99)
            return embed_batches(lambda x: model(augment_normalized(x, spec, gen)), images, spec,
                                 device=device, amp=config.amp, progress=False, desc="embedding")
        return embed_batches(model, images, spec, device=device, amp=config.amp, progress=False, desc="embedding")

    def evaluate(emb: np.ndarray) -> dict[str, float]:
        return evaluate_embeddings(emb, cars, split, k=config.eval_k, device=str(device))

    frozen_metrics = evaluate(frozen) if ddp.is_main else {}
    params = model.param_groups(config.backbone_lr, config.head_lr, config.weight_decay)
    if proxy_loss:
        params.append({"name": "proxies", "params": list(loss_fn.parameters()), "lr": config.proxy_lr,
                       "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(params)
    steps_per_epoch = len(_batches(y_train, config, 0))
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, int(round(config.warmup_epochs * steps_per_epoch))))

    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt_path = run_dir / "checkpoint.pt"
    if state == "resume":
        ckpt = load_checkpoint(ckpt_path, device, fix=_DAMAGED_CHECKPOINT)
        _refuse_other_config(run_dir, ckpt.get("config") or {}, config_json, "an interrupted run")
        _load_weights(model, ckpt["model"])
        if proxy_loss:
            loss_fn.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, start_epoch = ckpt["history"], ckpt["epoch"]

    forward = distributed.wrap_model(distributed.TrainForward(model, tail if cached is not None else None), device)
    train_rows = torch.from_numpy(split.train)
    y_train_t = torch.from_numpy(y_train)
    train_seconds = sum(h.get("seconds", 0.0) for h in history)
    images_seen = sum(h.get("images", 0) for h in history)
    bar = tqdm(range(start_epoch, config.epochs), desc="training", disable=not progress,
               initial=start_epoch, total=config.epochs)
    for epoch in bar:
        torch.manual_seed(config.seed * 7919 + epoch)  # dropout; makes resumed runs equal uninterrupted ones
        gen = torch.Generator().manual_seed(config.seed * 104_729 + epoch)
        model.train()
        if not config.train_backbone:
            model.backbone.eval()  # frozen trunk; the trainable tail (if any) trains its norms
            tail.train()
        losses = []
        t0 = time.perf_counter()
        n_images = 0
        for positions in _batches(y_train, config, epoch):
            pos = torch.from_numpy(positions)
            rows = train_rows[pos]
            mine = distributed.rank_slice(len(rows))  # this rank's share of the global batch (all of it alone)
            y = y_train_t[pos][mine].to(device)
            if cached is not None:
                x = _draw_views(train_views, rows.numpy(), gen)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_autocast(config, device)):
                    emb = forward(x[mine].to(device))
                emb = emb.float()
            else:
                xb = images[rows].to(device, non_blocking=True).float().div_(255)
                if config.augment:
                    xb = augment(xb, gen)
                xb = normalize_float(xb[mine], spec).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_autocast(config, device)):
                    emb = forward(xb)
                emb = emb.float()
            level = level_labels[pos][mine].to(device) if level_labels is not None else None
            loss = loss_fn(emb, y, level_labels=level)
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()) / ddp.world_size)  # DistributedLoss returns world_size x
            n_images += len(rows)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        images_seen += n_images
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": seconds, "images": n_images,
                  "images_per_second": n_images / max(seconds, 1e-9),
                  **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}}
        if ddp.is_main and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            record.update(evaluate(embed_all()))
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", p1=f"{record.get('precision_at_1', float('nan')):.3f}")
        if not ddp.is_main:
            continue  # rank 0 alone checkpoints and calls back
        save_checkpoint({"model": _model_state(model), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                         "config": config_json, "model_config": model.config,
                         **({"loss": loss_fn.state_dict()} if proxy_loss else {})}, ckpt_path)
        if callback is not None:
            callback(epoch + 1, record)

    if not ddp.is_main:
        distributed.barrier()  # wait for rank 0 to write the run folder
        return load_run(run_dir, cars)
    trained = embed_all()
    final = evaluate(trained)
    import resource  # ru_maxrss is in KiB on Linux: the process's peak resident memory so far
    metrics = {"frozen": frozen_metrics, "trained": final, "train_seconds": train_seconds,
               "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "images_per_second": images_seen / max(train_seconds, 1e-9), "device": _device_name(device),
               "steps_per_epoch": steps_per_epoch, "train_images": len(split.train)}
    with atomic_path(run_dir / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    model.eval()
    pooled = {"pooled": pooled_features().astype(np.float16)} if config.save_pooled else {}
    with atomic_path(run_dir / "embeddings.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, trained=trained.astype(np.float16), frozen=frozen.astype(np.float16),
                            labels=labels_all, **pooled, **_split_arrays(split))
    if proxy_loss:  # the class vectors: class scores (MSP, max logit, energy) for open-set recognition
        with atomic_path(run_dir / "proxies.npz", suffix=".npz") as tmp:
            np.savez(tmp, classes=loss_fn.classes.cpu().numpy(), proxies=loss_fn.proxies().cpu().numpy(),
                     scale=loss_fn.scale, kind=config.loss)
    write_json(run_dir / "metrics.json", metrics)  # last: its presence marks the run finished
    distributed.barrier()
    return load_run(run_dir, cars)


def _autocast(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast for the training forward: on CUDA with ``amp``, on the CPU with ``cpu_bf16``."""
    return config.amp if device.type == "cuda" else config.cpu_bf16


def _draw_views(views: list[np.ndarray], rows: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """One cached view per image of a batch, drawn uniformly from ``views`` (float32 tensor)."""
    if len(views) == 1:
        return torch.from_numpy(views[0][rows]).float()
    pick = torch.randint(len(views), (len(rows),), generator=gen).numpy()
    out = np.empty((len(rows), *views[0].shape[1:]), dtype=np.float32)
    for v, arr in enumerate(views):
        sel = pick == v
        if sel.any():
            out[sel] = arr[rows[sel]]
    return torch.from_numpy(out)


def _default_cache_stages(backbone) -> int:
    """1 where the backbone splits into trunk + last stage (EfficientNet, ResNet, tiny CNN), else 0."""
    try:
        split_backbone(backbone, 1)
        return 1
    except ValueError:
        return 0


@torch.no_grad()
def _apply_cached(fn, device, *arrays: np.ndarray | None, batch_size: int = 1024) -> np.ndarray:
    """``fn(*batches)`` over aligned cached arrays in batches (no gradients), float32 numpy out.

    ``None`` arrays are passed on as ``None``.
    """
    n = len(arrays[0])
    out = [fn(*(torch.from_numpy(a[i:i + batch_size]).to(device).float() if a is not None else None for a in arrays))
           .float().cpu() for i in range(0, n, batch_size)]
    return torch.cat(out).numpy()


def _tta(fn, config: TrainConfig, x: torch.Tensor, mirrored: torch.Tensor | None = None) -> torch.Tensor:
    """``fn(x)`` L2-normalised, or with ``config.flip_tta`` the normalised mean over ``x`` and its mirror."""
    if config.flip_tta:
        return flip_average(fn, x, mirrored)
    return F.normalize(fn(x), dim=-1)


def _model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's weights (also in cached modes: a random-init backbone is not rebuildable)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _load_weights(model, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()  # an exported run stores half precision: cast back to the model's dtypes
    state = {k: (v.to(own[k].dtype) if k in own and v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import os
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _split_arrays(split: Split) -> dict[str, np.ndarray]:
    return {f"split_{k}": getattr(split, k) for k in ("train", "database", "query", "ood_query", "ood_database",
                                                         "heldout_class_ids")}


#: Settings that do not change the trained model: evaluation only reads it, and each epoch's randomness is
#: seeded from (seed, epoch). A finished or interrupted run is reused whatever they are.
NOT_AFFECTING_THE_MODEL = ("eval_every", "save_pooled")


#: Keys that older run folders did not record: compared only where both configs have them.
RECORDED_SINCE = ("data_fingerprint",)
#: The files of a run that ``overwrite=True`` deletes before training anew.
RUN_FILES = ("metrics.json", "embeddings.npz", "history.csv", "checkpoint.pt", "model.pt")
_DAMAGED_CHECKPOINT = ("Copy the run folder again if it came from elsewhere; or delete the run and train anew "
                       "(train(..., overwrite=True) / python -m vericar.train ... --overwrite).")
_DAMAGED_RUN = ("The run was damaged (e.g. an interrupted copy): copy the run folder again, or retrain it "
                "(train(..., overwrite=True) / python -m vericar.train ... --overwrite).")


class RunConfigError(ValueError):
    """A run folder holds a run of another config or other data; nothing was changed. The message says how."""


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields (but :data:`NOT_AFFECTING_THE_MODEL`) whose values differ: ``{field: (a's, b's)}``."""
    skip = set(NOT_AFFECTING_THE_MODEL) | {k for k in RECORDED_SINCE if k not in a or k not in b}
    unset = "<unset>"
    return {k: (a.get(k, unset), b.get(k, unset)) for k in sorted((set(a) | set(b)) - skip)
            if a.get(k, unset) != b.get(k, unset)}


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return not _config_diff(a, b)


def _refuse_other_config(run_dir: Path, stored: dict[str, Any], config_json: dict[str, Any], what: str) -> None:
    diff = _config_diff(stored, config_json)
    if not diff:
        return
    lines = [f"  data: the file list or labels under {config_json.get('data_root')} are not those the run was "
             f"trained on (fingerprint {old} in the run, {new} now)" if k == "data_fingerprint"
             else f"  {k}: {old!r} in the run folder, {new!r} now" for k, (old, new) in diff.items()]
    raise RunConfigError(f"{run_dir} holds {what} with another config; nothing was changed:\n" + "\n".join(lines)
                         + "\nUse the run's config to reuse it, choose another run folder, or pass overwrite=True "
                         "(python -m vericar.train ... --overwrite) to delete this run and train anew.")


def _check_sizes(config: TrainConfig) -> None:
    """Refuse sizes that cannot train (epochs=0 used to leave a run folder that no load_run could read)."""
    for name, low, hint in (("epochs", 1, "the untrained model's metrics are every run's metrics['frozen']"),
                            ("image_size", 8, "e.g. 224, the backbones' pretraining size"),
                            ("batch_size", 2, "e.g. 128")):
        value = getattr(config, name)
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r} ({hint})")


def _existing_run(run_dir: Path, config_json: dict[str, Any], *, resume: bool, overwrite: bool,
                  is_main: bool) -> str:
    """What :func:`train` does with ``run_dir``: ``"finished"`` (load it), ``"resume"`` or ``"fresh"``.

    Raises :class:`RunConfigError` rather than delete or restart a run of another config; with ``overwrite``
    the old run's files are deleted (by the main process).
    """
    if overwrite:
        if is_main:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
        return "fresh"
    finished = (run_dir / "metrics.json").is_file()
    interrupted = (run_dir / "checkpoint.pt").is_file() and resume
    if not (finished or interrupted):
        return "fresh"
    config_path = run_dir / "config.json"
    stored = read_json(config_path, "the run's config", _DAMAGED_RUN) if config_path.is_file() else {}
    _refuse_other_config(run_dir, stored, config_json, "a finished run" if finished else "an interrupted run")
    if finished and not resume:
        raise RunConfigError(f"{run_dir} holds a finished run; resume=False would train it again and replace it. "
                             "Pass overwrite=True (--overwrite) to do so, or choose another run folder.")
    return "finished" if finished else "resume"


def _check_data(run_dir: Path, config_json: dict[str, Any], labels: np.ndarray, cars: CarsDataset) -> None:
    """Refuse pairing a run's embeddings and metrics with a dataset other than the one it was trained on."""
    if len(cars) != len(labels):
        raise RunConfigError(f"{run_dir} was trained on a dataset of {len(labels)} images, not this one "
                             f"({len(cars)} under {cars.root}): pass the same data_dir")
    recorded = config_json.get("data_fingerprint")
    if recorded is None:  # run folders written before fingerprints: the image count is all there is
        return
    now = data_fingerprint(cars)
    if recorded != now:
        changed = int((np.asarray(labels) != cars.labels).sum())
        raise RunConfigError(
            f"{run_dir} was trained on other data than {cars.root} holds now: the file list or labels changed "
            f"({changed} of {len(labels)} labels differ; fingerprint {recorded} in the run, {now} now). Its "
            "embeddings and metrics belong to the old data. Restore that data, or retrain on the new data in "
            "another run folder or with train(..., overwrite=True) / --overwrite.")


def load_run(run_dir: str | Path, cars: CarsDataset | None = None) -> TrainedRun:
    """Load a finished run folder (made by :func:`train`, here or on another machine)."""
    run_dir = Path(run_dir)
    needed = [run_dir / f for f in ("config.json", "embeddings.npz", "metrics.json")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished training run (missing {missing}); run notebook "
                                "03_training or `python -m vericar.train` to make it")
    config_json = read_json(run_dir / "config.json", "the run's config", _DAMAGED_RUN)
    config = TrainConfig.from_json(config_json)
    data = load_npz(run_dir / "embeddings.npz", _DAMAGED_RUN)
    if cars is not None:
        _check_data(run_dir, config_json, data["labels"], cars)
    split = Split(config.protocol, train=data["split_train"], database=data["split_database"],
                  query=data["split_query"], ood_query=data["split_ood_query"],
                  ood_database=data["split_ood_database"], heldout_class_ids=data["split_heldout_class_ids"])
    history_path = run_dir / "history.csv"
    has_history = history_path.is_file() and history_path.stat().st_size > 1  # not the empty file of 0 epochs
    history = pd.read_csv(history_path) if has_history else pd.DataFrame()
    frozen = data["frozen"].astype(np.float32) if "frozen" in data else None
    pooled = data["pooled"].astype(np.float32) if "pooled" in data else None
    return TrainedRun(path=run_dir, config=config, history=history,
                      embeddings=data["trained"].astype(np.float32), frozen_features=frozen,
                      metrics=read_json(run_dir / "metrics.json", "the run's metrics", _DAMAGED_RUN), split=split,
                      pooled=pooled)


def export_run(run_dir: str | Path, out_dir: str | Path, *, frozen: bool = False) -> list[Path]:
    """A small, portable copy of a finished run, e.g. to bring a GPU run home through a size-limited channel.

    Writes ``config.json``, ``metrics.json``, ``history.csv``, ``model.pt`` (the model's weights in half
    precision: no optimizer state, so not resumable) and ``embeddings.npz`` (trained embeddings in float16,
    labels, split). The frozen-backbone features (1280-d for EfficientNet-Lite: the largest array) are left out
    unless ``frozen=True``; the frozen baseline's metrics stay in ``metrics.json``. :func:`load_run` and
    :func:`load_model` read the copy like the original.
    """
    src, out = Path(run_dir), Path(out_dir)
    run = load_run(src)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "metrics.json", "history.csv"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    ckpt = _load_run_checkpoint(run)
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["model"].items()}
    save_checkpoint({"model": weights, "config": ckpt.get("config"), "model_config": ckpt.get("model_config"),
                     "epoch": ckpt.get("epoch")}, out / "model.pt")
    arrays = {"trained": run.embeddings.astype(np.float16), "labels": load_npz(src / "embeddings.npz")["labels"],
              **_split_arrays(run.split)}
    if frozen:
        arrays["frozen"] = run.frozen.astype(np.float16)
    with atomic_path(out / "embeddings.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return sorted(out.iterdir())


def load_model(run: TrainedRun | str | Path, device: str = "cpu"):
    """The trained :class:`~vericar.models.EmbeddingModel` of a run folder, in eval mode."""
    run = run if isinstance(run, TrainedRun) else load_run(run)
    ckpt = _load_run_checkpoint(run)
    cfg = run.config
    model = build_model(cfg.backbone, cfg.embedding_dim, pretrained=False, dropout=cfg.dropout,
                        hidden_dim=cfg.hidden_dim, flip_tta=cfg.flip_tta)  # every weight comes from the checkpoint
    _load_weights(model, ckpt["model"])
    return model.to(resolve_device(device)).eval()


def model_file(run: TrainedRun) -> Path:
    """The file holding a run's weights (checkpoint.pt, or model.pt in an exported run); raises if neither is."""
    if not run.model_path.is_file():
        raise RunFileError(f"{run.path} has no checkpoint.pt (a training run) nor model.pt (an exported run), so "
                           "no model weights; copy the run folder again with its checkpoint.pt, or retrain it")
    return run.model_path


def _load_run_checkpoint(run: TrainedRun) -> dict[str, Any]:
    """The weights of a finished run, loaded safely (tensors and plain data only)."""
    return load_checkpoint(model_file(run), "cpu", fix=_DAMAGED_CHECKPOINT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vericar.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "stanford_cars"])
    parser.add_argument("--data-dir", default="data/synthcars")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a finished or interrupted run of another config in --run-dir and train anew")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "loss_kwargs":
            continue
        default = f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default,
                                metavar="BOOL")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    # under torchrun: one process per rank (see vericar.distributed); gloo for CPU training, else the default
    ddp = distributed.init_from_env(backend="gloo" if args["device"] == "cpu" else None)
    try:
        with distributed.main_first():  # rank 0 generates SynthCars on first use, the others then open it
            cars = open_dataset(args.pop("dataset"), args.pop("data_dir"), progress=ddp.is_main)
        run_dir, cache_dir, overwrite = args.pop("run_dir"), args.pop("cache_dir"), args.pop("overwrite")
        config = TrainConfig(**args)
        run = train(cars, config, run_dir, cache_dir=cache_dir, overwrite=overwrite)
        if ddp.is_main:
            print(json.dumps({"frozen": run.metrics["frozen"], "trained": run.metrics["trained"],
                              "train_seconds": run.metrics["train_seconds"]}, indent=2))
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
