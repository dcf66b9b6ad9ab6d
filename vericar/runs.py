"""The run-folder format, which every later step reads: a trained run's config, weights, embeddings, metrics.

A run folder (made by :func:`vericar.train.train`) holds ``config.json`` (the :class:`~vericar.config.TrainConfig`
plus the dataset's name, root and fingerprint), ``checkpoint.pt`` (weights, optimizer, history: resumable;
``model.pt`` in an exported run), ``history.csv``, ``embeddings.npz`` (trained and frozen embeddings of every
image, the split), ``metrics.json`` (written last: its presence marks the run finished) and, for proxy losses,
``proxies.npz``. Files are read safely and written atomically (:mod:`vericar.runio`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import ADDED_SINCE, NOT_AFFECTING_THE_MODEL, TrainConfig
from .data import CarsDataset, Split, make_split, validation_split
from .embed import resolve_device
from .models import build_model
from .runio import (RunFileError, atomic_path, data_fingerprint, load_checkpoint, load_npz, read_json,
                    save_checkpoint)

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


def split_for(cars: CarsDataset, config: TrainConfig) -> Split:
    split = make_split(cars, config.protocol, seed=config.seed, val_fraction=config.val_fraction,
                       holdout=config.holdout, holdout_fraction=config.holdout_fraction,
                       ssb_file=config.ssb_file or None)
    if config.validation:
        split = validation_split(cars, split, seed=config.seed, val_fraction=config.val_fraction,
                                 holdout_fraction=config.holdout_fraction)
    return split


def model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's weights (also in cached modes: a random-init backbone is not rebuildable)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()  # an exported run stores half precision: cast back to the model's dtypes
    state = {k: (v.to(own[k].dtype) if k in own and v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def split_arrays(split: Split) -> dict[str, np.ndarray]:
    return {f"split_{k}": getattr(split, k) for k in ("train", "database", "query", "ood_query", "ood_database",
                                                         "heldout_class_ids")}


#: Keys that older run folders did not record: compared only where both configs have them.
RECORDED_SINCE = ("data_fingerprint",)


#: The files of a run that ``overwrite=True`` deletes before training anew.
RUN_FILES = ("metrics.json", "embeddings.npz", "history.csv", "checkpoint.pt", "model.pt")


DAMAGED_CHECKPOINT = ("Copy the run folder again if it came from elsewhere; or delete the run and train anew "
                       "(train(..., overwrite=True) / python -m vericar.train ... --overwrite).")


_DAMAGED_RUN = ("The run was damaged (e.g. an interrupted copy): copy the run folder again, or retrain it "
                "(train(..., overwrite=True) / python -m vericar.train ... --overwrite).")


class RunConfigError(ValueError):
    """A run folder holds a run of another config or other data; nothing was changed. The message says how."""


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fields (but :data:`NOT_AFFECTING_THE_MODEL`) whose values differ: ``{field: (a's, b's)}``."""
    skip = set(NOT_AFFECTING_THE_MODEL) | {k for k in RECORDED_SINCE if k not in a or k not in b}
    unset = "<unset>"
    a, b = ADDED_SINCE | a, ADDED_SINCE | b  # an older config.json without a newer field: its old behaviour
    return {k: (a.get(k, unset), b.get(k, unset)) for k in sorted((set(a) | set(b)) - skip)
            if a.get(k, unset) != b.get(k, unset)}


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return not config_diff(a, b)


def refuse_other_config(run_dir: Path, stored: dict[str, Any], config_json: dict[str, Any], what: str) -> None:
    diff = config_diff(stored, config_json)
    if not diff:
        return
    lines = [f"  data: the file list or labels under {config_json.get('data_root')} are not those the run was "
             f"trained on (fingerprint {old} in the run, {new} now)" if k == "data_fingerprint"
             else f"  {k}: {old!r} in the run folder, {new!r} now" for k, (old, new) in diff.items()]
    raise RunConfigError(f"{run_dir} holds {what} with another config; nothing was changed:\n" + "\n".join(lines)
                         + "\nUse the run's config to reuse it, choose another run folder, or pass overwrite=True "
                         "(python -m vericar.train ... --overwrite) to delete this run and train anew.")


def existing_run(run_dir: Path, config_json: dict[str, Any], *, resume: bool, overwrite: bool,
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
    refuse_other_config(run_dir, stored, config_json, "a finished run" if finished else "an interrupted run")
    if finished and not resume:
        raise RunConfigError(f"{run_dir} holds a finished run; resume=False would train it again and replace it. "
                             "Pass overwrite=True (--overwrite) to do so, or choose another run folder.")
    return "finished" if finished else "resume"


def check_data(run_dir: Path, config_json: dict[str, Any], labels: np.ndarray, cars: CarsDataset) -> None:
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
        check_data(run_dir, config_json, data["labels"], cars)
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
              **split_arrays(run.split)}
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
    load_weights(model, ckpt["model"])
    return model.to(resolve_device(device)).eval()


def model_file(run: TrainedRun) -> Path:
    """The file holding a run's weights (checkpoint.pt, or model.pt in an exported run); raises if neither is."""
    if not run.model_path.is_file():
        raise RunFileError(f"{run.path} has no checkpoint.pt (a training run) nor model.pt (an exported run), so "
                           "no model weights; copy the run folder again with its checkpoint.pt, or retrain it")
    return run.model_path


def _load_run_checkpoint(run: TrainedRun) -> dict[str, Any]:
    """The weights of a finished run, loaded safely (tensors and plain data only)."""
    return load_checkpoint(model_file(run), "cpu", fix=DAMAGED_CHECKPOINT)

