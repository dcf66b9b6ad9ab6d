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
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_metric_learning.samplers import MPerClassSampler
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .config import TrainConfig
from .data import CarsDataset, Split, open_dataset
from .embed import (augment, augment_normalized, cached_features, decode_images, embed_batches, l2_normalize,
                    normalize_float, resolve_device)
from .evaluation import evaluate_embeddings
from .losses import PROXY_LOSSES, check_loss_name, level_label_matrix, make_loss
from .models import build_model, flip_average, split_backbone
from .results import NOTEBOOK_ENV
from .runio import atomic_path, data_fingerprint, load_checkpoint, save_checkpoint, write_json
from .runs import (DAMAGED_CHECKPOINT, TrainedRun, existing_run, load_run, load_weights, model_file, model_state,
                   refuse_other_config, split_arrays, split_for)

DEFAULT_CACHE = Path.home() / ".cache" / "vericar" / "features"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                 warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers: linear warm-up over ``warmup_steps`` then cosine to 0 after ``total_steps``.

    Step ``t`` (0-based) runs at ``base * (t + 1) / W`` during the warm-up (``t < W``) and at
    ``base * (1 + cos(pi (t - W) / (T - W))) / 2`` after it; one ``scheduler.step()`` per optimiser step.
    """
    total, warmup = max(1, int(total_steps)), max(0, int(warmup_steps))
    if warmup == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0,
                                             total_iters=warmup - 1)
    if warmup >= total:
        return warm
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup])


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Load a checkpoint's scheduler state; a checkpoint of the former ``LambdaLR`` (the same schedule as a
    lambda) is replayed from step 0 to its step instead (``scheduler`` must be fresh)."""
    if "_schedulers" in state or "lr_lambdas" not in state:
        scheduler.load_state_dict(state)
        return
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):  # back to step 0
        group["lr"] = lr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": a replay, not training
        for _ in range(int(state["last_epoch"])):
            scheduler.step()


def epoch_batches(labels: np.ndarray, config: TrainConfig, epoch: int) -> list[np.ndarray]:
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

    ``config.loss`` must be a name :func:`vericar.losses.make_loss` knows in this process: a loss registered
    by another module (e.g. the seed's, by :mod:`vericar.analyses.seed_losses`) needs that module imported
    first, also to load or resume a run trained with it; otherwise ``ValueError`` (naming the module) before
    the run folder is touched.

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
    _check_config(config)
    # the starting run is read and checked only to train from epoch 0 (a finished run is loaded, an interrupted
    # one resumes from its own checkpoint, even where the starting run's folder is gone), before any file is
    # deleted (overwrite) or written
    init = _init_source(config, split, cars) if overwrite else None
    state = existing_run(run_dir, config_json, resume=resume, overwrite=overwrite, is_main=ddp.is_main)
    if state == "finished":
        return load_run(run_dir, cars)
    if state == "fresh" and init is None:
        init = _init_source(config, split, cars)

    run = _setup(cars, config, split, train_labels, run_dir, config_json, cache_dir, progress, init)
    ckpt_path = run_dir / "checkpoint.pt"
    history, start_epoch = _resume(run, ckpt_path) if state == "resume" else ([], 0)

    forward = distributed.wrap_model(distributed.TrainForward(run.model, run.inputs.tail), run.device)
    bar = tqdm(range(start_epoch, config.epochs), desc="training", disable=not progress,
               initial=start_epoch, total=config.epochs)
    last_eval: tuple[int, np.ndarray | None] = (-1, None)  # (epoch, embeddings) of the latest evaluation
    for epoch in bar:
        record = _train_epoch(run, forward, epoch)
        if ddp.is_main and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            last_eval = (epoch + 1, run.inputs.embed_all())
            record.update(run.evaluate(last_eval[1]))
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", p1=f"{record.get('precision_at_1', float('nan')):.3f}")
        if not ddp.is_main:
            continue  # rank 0 alone checkpoints and calls back
        _save_checkpoint(run, epoch + 1, history, ckpt_path)
        if callback is not None:
            callback(epoch + 1, record)

    if not ddp.is_main:
        distributed.barrier()  # wait for rank 0 to write the run folder
        return load_run(run_dir, cars)
    # the last epoch's evaluation already embedded every image with the final weights: reuse it
    _write_run_folder(run, run_dir, history, last_eval[1] if last_eval[0] == config.epochs else None)
    distributed.barrier()
    return load_run(run_dir, cars)


# ==================================================================================================
# The helpers of train(): setup, resume, one epoch, the run folder
# ==================================================================================================

@dataclasses.dataclass
class _Inputs:
    """What training draws from and evaluation embeds, per mode (see the module docstring).

    Fine-tune: ``images``, every image decoded once (uint8). Head-only / partial: ``cached``, the frozen trunk's
    outputs (``flipped``: of the mirrored images, for augmentation and/or flip TTA), ``train_views`` the arrays a
    training step draws each image's input from, and ``tail`` the trainable last stages (``Identity`` head-only).
    """

    model: nn.Module
    config: TrainConfig
    device: torch.device
    progress: bool
    images: torch.Tensor | None = None
    cached: np.ndarray | None = None
    flipped: np.ndarray | None = None
    train_views: list[np.ndarray] = dataclasses.field(default_factory=list)
    tail: nn.Module | None = None

    def pooled_features(self) -> np.ndarray:
        """The backbone's pooled features of every image (flip-averaged with TTA), L2-normalised."""
        if self.cached is not None:
            return l2_normalize(_apply_cached(lambda *x: _tta(self.tail, self.config, *x), self.device,
                                              self.cached, self.flipped))
        model = self.model
        features = (lambda x: flip_average(model.features, x)) if self.config.flip_tta else model.features
        return l2_normalize(embed_batches(features, self.images, model.spec, device=self.device,
                                          amp=self.config.amp, progress=self.progress, desc="pooled features"))

    def embed_all(self) -> np.ndarray:
        """Embeddings of every image in eval mode (with train-time augmentation only if eval_augment)."""
        model, config, spec = self.model, self.config, self.model.spec
        model.eval()
        if self.cached is not None:
            return _apply_cached(lambda *x: _tta(lambda v: model.head(self.tail(v)), config, *x), self.device,
                                 self.cached, self.flipped)
        if config.eval_augment:
            gen = torch.Generator().manual_seed(config.seed + 99)
            return embed_batches(lambda x: model(augment_normalized(x, spec, gen)), self.images, spec,
                                 device=self.device, amp=config.amp, progress=False, desc="embedding")
        return embed_batches(model, self.images, spec, device=self.device, amp=config.amp, progress=False,
                             desc="embedding")

    def batch(self, rows: torch.Tensor, mine: slice, gen: torch.Generator) -> torch.Tensor:
        """A training step's input for the images ``rows`` (this rank's share ``mine``), on the device."""
        if self.cached is not None:
            return _draw_views(self.train_views, rows.numpy(), gen)[mine].to(self.device)
        xb = self.images[rows].to(self.device, non_blocking=True).float().div_(255)
        if self.config.augment:
            xb = augment(xb, gen)
        return normalize_float(xb[mine], self.model.spec).contiguous(memory_format=torch.channels_last)


@dataclasses.dataclass
class _Run:
    """One training run's working set, built by :func:`_setup`: what the epochs update and the run folder keeps."""

    cars: CarsDataset
    config: TrainConfig
    config_json: dict[str, Any]
    split: Split
    device: torch.device
    model: nn.Module
    inputs: _Inputs
    loss_fn: nn.Module
    proxy_loss: bool
    y_train: np.ndarray
    level_labels: torch.Tensor | None
    frozen: np.ndarray | None
    frozen_metrics: dict[str, float]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int

    def evaluate(self, emb: np.ndarray) -> dict[str, float]:
        return _evaluate(emb, self.cars, self.split, self.config, self.device)


def _evaluate(emb: np.ndarray, cars: CarsDataset, split: Split, config: TrainConfig,
              device: torch.device) -> dict[str, float]:
    """Retrieval metrics of embeddings of every image on ``split`` (:func:`vericar.evaluation.evaluate_embeddings`)."""
    return evaluate_embeddings(emb, cars, split, k=config.eval_k, device=str(device))


def _setup(cars: CarsDataset, config: TrainConfig, split: Split, train_labels: np.ndarray | None, run_dir: Path,
           config_json: dict[str, Any], cache_dir: str | Path | None, progress: bool,
           init: TrainedRun | None = None) -> _Run:
    """Model, loss, inputs, the frozen baseline, optimiser and schedule of a run about to train (from epoch 0 or
    before :func:`_resume`); writes ``config.json``. The order is fixed: each step draws from the seeded RNG."""
    ddp = distributed.context()
    device = distributed.device_for(resolve_device(config.device))
    model = _setup_model(config, device)
    if ddp.is_main:
        # a finished run with another config is being replaced: its results must not outlive it (a crash
        # before the end would otherwise leave the new config.json beside the old run's metrics)
        (run_dir / "metrics.json").unlink(missing_ok=True)
        write_json(run_dir / "config.json", config_json)
    y_train = cars.labels[split.train] if train_labels is None else np.asarray(train_labels, dtype=np.int64)
    if len(y_train) != len(split.train):
        raise ValueError(f"train_labels has {len(y_train)} entries for {len(split.train)} training images")
    proxy_loss = config.loss in PROXY_LOSSES
    loss_kwargs = ({"classes": np.unique(y_train), "embedding_size": config.embedding_dim, **config.loss_kwargs}
                   if proxy_loss else config.loss_kwargs)
    loss_fn = distributed.wrap_loss(make_loss(config.loss, **loss_kwargs)).to(device)
    if init is not None:
        _load_init(init, model, loss_fn)
    level_labels = (torch.from_numpy(level_label_matrix(y_train, cars.hierarchy))
                    if getattr(loss_fn, "needs_level_labels", False) else None)
    inputs = _setup_inputs(cars, config, model, device, cache_dir, progress)
    frozen = inputs.pooled_features() if ddp.is_main else None
    frozen_metrics = _evaluate(frozen, cars, split, config, device) if ddp.is_main else {}
    optimizer, scheduler, steps_per_epoch = _setup_optimiser(model, loss_fn, config, y_train)
    return _Run(cars, config, config_json, split, device, model, inputs, loss_fn, proxy_loss, y_train, level_labels,
                frozen, frozen_metrics, optimizer, scheduler, steps_per_epoch)


def _setup_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """The seeded, freshly built embedding model (synchronised batch norm under DDP if asked), on the CPU."""
    ddp = distributed.context()
    seed_everything(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(config.backbone, config.embedding_dim, pretrained=config.pretrained,
                        dropout=config.dropout, hidden_dim=config.hidden_dim, flip_tta=config.flip_tta)
    if ddp.distributed and ddp.sync_batchnorm:  # before split_backbone takes references to submodules
        model = distributed.convert_sync_batchnorm(model, device)
    return model


def _setup_inputs(cars: CarsDataset, config: TrainConfig, model: nn.Module, device: torch.device,
                  cache_dir: str | Path | None, progress: bool) -> _Inputs:
    """Decoded images (fine-tune) or the frozen trunk's cached outputs (head-only / partial); moves ``model`` to
    ``device`` and freezes its trunk in the cached modes."""
    spec = model.spec
    if config.train_backbone:
        images = decode_images(cars, np.arange(len(cars)), config.image_size, spec.interpolation, progress=progress)
        model.to(device).to(memory_format=torch.channels_last).eval()
        return _Inputs(model, config, device, progress, images=images)
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
    model.to(device).eval()
    if config.trainable_stages == 0 and cache_stages > 0:  # head only: pool through the frozen tail once
        cached = _apply_cached(tail, device, cached)
        flipped = _apply_cached(tail, device, flipped) if flipped is not None else None
        extra_views = [_apply_cached(tail, device, v) for v in extra_views]
        tail = torch.nn.Identity()
    # what a training step draws from, per image: plain, mirrored (augment) and the augmented views
    train_views = [cached] + ([flipped] if flipped is not None and config.augment else []) + extra_views
    for p in tail.parameters():
        p.requires_grad_(True)
    return _Inputs(model, config, device, progress, cached=cached, flipped=flipped, train_views=train_views,
                   tail=tail)


def _setup_optimiser(model: nn.Module, loss_fn: nn.Module, config: TrainConfig, y_train: np.ndarray
                     ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, int]:
    """AdamW over the model's parameter groups (and a proxy loss's class vectors at ``proxy_lr``), its warm-up +
    cosine schedule over all the run's steps, and the number of steps per epoch."""
    params = model.param_groups(config.backbone_lr, config.head_lr, config.weight_decay)
    if config.loss in PROXY_LOSSES:
        params.append({"name": "proxies", "params": list(loss_fn.parameters()), "lr": config.proxy_lr,
                       "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(params)
    steps_per_epoch = len(epoch_batches(y_train, config, 0))
    total = steps_per_epoch * config.epochs
    scheduler = lr_scheduler(optimizer, total, int(round(config.warmup_epochs * steps_per_epoch)))
    return optimizer, scheduler, steps_per_epoch


def _resume(run: _Run, ckpt_path: Path) -> tuple[list[dict[str, Any]], int]:
    """Load an interrupted run's checkpoint into ``run`` (weights, proxies, optimiser, schedule); its history
    and the number of epochs done. Refuses a checkpoint of another config."""
    ckpt = load_checkpoint(ckpt_path, run.device, fix=DAMAGED_CHECKPOINT)
    refuse_other_config(ckpt_path.parent, ckpt.get("config") or {}, run.config_json, "an interrupted run")
    load_weights(run.model, ckpt["model"])
    if run.proxy_loss:
        run.loss_fn.load_state_dict(ckpt["loss"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    restore_scheduler(run.scheduler, ckpt["scheduler"])
    return ckpt["history"], ckpt["epoch"]


def _train_epoch(run: _Run, forward: nn.Module, epoch: int) -> dict[str, Any]:
    """One epoch of optimiser steps (0-based ``epoch``); its history record: mean loss, time, images, learning
    rates. Seeded from the config's seed and the epoch, so a resumed run equals an uninterrupted one."""
    config, model, device = run.config, run.model, run.device
    torch.manual_seed(config.seed * 7919 + epoch)  # dropout; makes resumed runs equal uninterrupted ones
    gen = torch.Generator().manual_seed(config.seed * 104_729 + epoch)
    model.train()
    if not config.train_backbone:
        model.backbone.eval()  # frozen trunk; the trainable tail (if any) trains its norms
        run.inputs.tail.train()
    train_rows, y_train = torch.from_numpy(run.split.train), torch.from_numpy(run.y_train)
    world_size = distributed.context().world_size
    losses = []
    t0 = time.perf_counter()
    n_images = 0
    for positions in epoch_batches(run.y_train, config, epoch):
        pos = torch.from_numpy(positions)
        rows = train_rows[pos]
        mine = distributed.rank_slice(len(rows))  # this rank's share of the global batch (all of it alone)
        y = y_train[pos][mine].to(device)
        x = run.inputs.batch(rows, mine, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=_autocast(config, device)):
            emb = forward(x)
        emb = emb.float()
        level = run.level_labels[pos][mine].to(device) if run.level_labels is not None else None
        loss = run.loss_fn(emb, y, level_labels=level)
        run.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        losses.append(float(loss.detach()) / world_size)  # DistributedLoss returns world_size x
        n_images += len(rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": seconds, "images": n_images,
            "images_per_second": n_images / max(seconds, 1e-9),
            **{f"lr_{g['name']}": g["lr"] for g in run.optimizer.param_groups}}


def _save_checkpoint(run: _Run, epochs_done: int, history: list[dict[str, Any]], ckpt_path: Path) -> None:
    save_checkpoint({"model": model_state(run.model), "optimizer": run.optimizer.state_dict(),
                     "scheduler": run.scheduler.state_dict(), "epoch": epochs_done, "history": history,
                     "config": run.config_json, "model_config": run.model.config,
                     **({"loss": run.loss_fn.state_dict()} if run.proxy_loss else {})}, ckpt_path)


def _write_run_folder(run: _Run, run_dir: Path, history: list[dict[str, Any]], trained: np.ndarray | None) -> None:
    """The final evaluation and the run folder's results: ``history.csv``, ``embeddings.npz``, ``proxies.npz``
    (proxy losses), then ``metrics.json``. ``trained``: the final weights' embeddings if already computed."""
    config, device = run.config, run.device
    trained = trained if trained is not None else run.inputs.embed_all()
    final = run.evaluate(trained)
    train_seconds = sum(h.get("seconds", 0.0) for h in history)
    images_seen = sum(h.get("images", 0) for h in history)
    import resource  # ru_maxrss is in KiB on Linux: the process's peak resident memory so far
    metrics = {"frozen": run.frozen_metrics, "trained": final, "train_seconds": train_seconds,
               "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "images_per_second": images_seen / max(train_seconds, 1e-9), "device": _device_name(device),
               "steps_per_epoch": run.steps_per_epoch, "train_images": len(run.split.train),
               "trained_in_notebook": os.environ.get(NOTEBOOK_ENV)}  # the study's cost accounting (run_cost)
    with atomic_path(run_dir / "history.csv") as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    run.model.eval()
    pooled = {"pooled": run.inputs.pooled_features().astype(np.float16)} if config.save_pooled else {}
    with atomic_path(run_dir / "embeddings.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, trained=trained.astype(np.float16), frozen=run.frozen.astype(np.float16),
                            labels=run.cars.labels, **pooled, **split_arrays(run.split))
    if run.proxy_loss:  # the class vectors: class scores (MSP, max logit, energy) for open-set recognition
        with atomic_path(run_dir / "proxies.npz", suffix=".npz") as tmp:
            np.savez(tmp, classes=run.loss_fn.classes.cpu().numpy(), proxies=run.loss_fn.proxies().cpu().numpy(),
                     scale=run.loss_fn.scale, kind=config.loss)
    write_json(run_dir / "metrics.json", metrics)  # last: its presence marks the run finished


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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import os
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _init_source(config: TrainConfig, split: Split, cars: CarsDataset) -> TrainedRun | None:
    """The finished run ``config.init_from`` names, checked: the same model shape, no image this run evaluates
    on among its training images (it would leak them), and in the cached modes a trunk it did not train (the
    trunk cache holds the ImageNet trunk's outputs)."""
    if not config.init_from:
        return None
    init = load_run(config.init_from, cars)
    shape = ("backbone", "embedding_dim", "hidden_dim", "flip_tta")
    other = {k: (getattr(init.config, k), getattr(config, k)) for k in shape if getattr(init.config, k) != getattr(config, k)}
    if other:
        raise ValueError(f"init_from {config.init_from}: its model is not this run's ({other}, theirs then ours); "
                         "start from a run with the same backbone, embedding_dim, hidden_dim and flip_tta")
    leaked = np.setdiff1d(init.split.train, split.train)
    if len(leaked):
        raise ValueError(f"init_from {config.init_from}: it trained on {len(leaked)} images this run does not train "
                         f"on (its protocol {init.config.protocol!r}, this run's {config.protocol!r}), so this run's "
                         "evaluation would see images its starting weights learnt; start from a run of the same "
                         "protocol (e.g. val from val, official from official)")
    if not config.train_backbone and (init.config.train_backbone or init.config.trainable_stages > config.trainable_stages
                                      or init.config.pretrained != config.pretrained):
        raise ValueError(f"init_from {config.init_from}: it trained deeper into the backbone than this run's "
                         f"{config.trainable_stages} stages on the cached trunk, or from other starting weights "
                         f"(pretrained {init.config.pretrained}), and the trunk cache holds the "
                         f"{'ImageNet' if config.pretrained else 'random'} trunk's outputs; train at least as deep "
                         "(or train_backbone=True)")
    return init


def _load_init(init: TrainedRun, model: nn.Module, loss_fn: nn.Module) -> None:
    """``init``'s weights into ``model``, and its class proxies into a proxy loss over the same classes (a
    warning says when a proxy loss has to start from fresh proxies instead)."""
    ckpt = load_checkpoint(model_file(init), "cpu", fix=DAMAGED_CHECKPOINT)
    load_weights(model, ckpt["model"])
    own = loss_fn.loss if isinstance(loss_fn, distributed.DistributedLoss) else loss_fn
    if not hasattr(own, "classes"):
        return  # no proxies to start from
    # a run trained under DDP saved its wrapped loss's state under "loss."
    theirs = {k.removeprefix("loss."): v for k, v in (ckpt.get("loss") or {}).items()}
    if "classes" in theirs and torch.equal(theirs["classes"].cpu(), own.classes.cpu()):
        own.load_state_dict(theirs)
    else:
        warnings.warn(f"init_from {init.path}: no class proxies for this run's {len(own.classes)} classes there "
                      f"(its loss {init.config.loss!r}, protocol {init.config.protocol!r}); the proxies start "
                      "afresh against the trained embedding", stacklevel=3)


def _check_config(config: TrainConfig) -> None:
    """Refuse, before the run folder is touched, a config that cannot train: sizes, eval_augment without
    fine-tuning, a loss name :func:`vericar.losses.make_loss` does not know (yet) in this process."""
    _check_sizes(config)
    if config.eval_augment and not config.train_backbone:
        raise ValueError("eval_augment reproduces evaluating with train-time image augmentation; it needs "
                         "train_backbone=True (head-only and partial runs evaluate cached features)")
    check_loss_name(config.loss)


def _check_sizes(config: TrainConfig) -> None:
    """Refuse sizes that cannot train (epochs=0 used to leave a run folder that no load_run could read)."""
    for name, low, hint in (("epochs", 1, "the untrained model's metrics are every run's metrics['frozen']"),
                            ("image_size", 8, "e.g. 224, the backbones' pretraining size"),
                            ("batch_size", 2, "e.g. 128")):
        value = getattr(config, name)
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r} ({hint})")


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
