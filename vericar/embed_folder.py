"""Embed every image of a folder with a trained run's model: resumable, and unreadable images reported.

    python -m vericar.embed_folder photos/ --checkpoint runs/full/models/official   # or: python -m vericar.embed ...
    python -m vericar.embed_folder photos/ --checkpoint RUN_DIR --out photos.npz --batch-size 128 --device cuda

``RUN_DIR`` is a run folder made by :func:`vericar.train.train`: its model (:func:`vericar.runs.load_model`)
embeds the images exactly as training evaluated them (RGB, square resize to the run's ``image_size`` with
the backbone's interpolation, normalisation, L2-normalised output).

Images are found recursively (``.jpg .jpeg .png .bmp .gif .webp .tif .tiff``, any case) and named by their
path relative to the folder (``/``-separated, sorted). The output ``OUT.npz`` (default: ``<FOLDER>.embeddings.npz``
beside the folder) holds ``files``, ``embeddings`` (float32, one row per file), ``size`` and ``mtime_ns`` of
each file when embedded, ``failed_files`` / ``failed_errors`` and ``meta`` (JSON: checkpoint, model
fingerprint, image size, ...). Unreadable images are never dropped silently: they are listed in the output,
in ``OUT.failed.csv`` (``file,error``; written, possibly empty, on every run) and in the printed summary,
and the command then exits with status 1. Images too large to decode safely (Pillow's decompression-bomb
limit) count as unreadable. File names are kept as the filesystem gives them (non-UTF-8 bytes included).

Resumable: finished work is written in shards (every ``--shard-size`` images) to ``OUT.parts/``; a rerun
(after an interruption, or after images were added to the folder) reuses the embeddings in ``OUT.npz`` and in
the shards of files that did not change (same size and modification time) and embeds only the rest.
Unreadable files are retried on every run. A rerun with another model refuses to mix embeddings (use another
``--out`` or ``--overwrite``). Every file is written to a temporary name and renamed; a damaged shard or
output (e.g. a full disk) is reported and its images embedded again, the valid shards kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .data.images import DataError, load_image
from .embed import embed_batches, resolve_device, square_tensor
from .runio import RunFileError, atomic_path, fs_text, load_npz

__all__ = ["IMAGE_EXTENSIONS", "FolderEmbeddings", "embed_folder", "list_images", "load_folder_embeddings", "main"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FORMAT_VERSION = 1


@dataclass
class FolderEmbeddings:
    """The embeddings of a folder: ``files[i]`` (relative path) has ``embeddings[i]``."""

    path: Path                       # the OUT.npz file
    files: np.ndarray                # str (N,)
    embeddings: np.ndarray           # float32 (N, D), L2-normalised
    failed: pd.DataFrame             # columns file, error: the unreadable images (not in `files`)
    meta: dict = field(default_factory=dict)
    embedded: int = 0                # images embedded by this call
    reused: int = 0                  # images whose earlier embeddings were kept

    @property
    def report_path(self) -> Path:
        return _failed_csv(self.path)

    def summary(self) -> str:
        line = (f"{len(self.files)} images embedded in {self.path} ({self.embedded} now, {self.reused} reused "
                f"from an earlier run); {len(self.failed)} unreadable")
        if len(self.failed):
            shown = "\n".join(f"  {fs_text(r.file)}: {fs_text(r.error)}" for r in self.failed.head(10).itertuples())
            more = f"\n  ... and {len(self.failed) - 10} more" if len(self.failed) > 10 else ""
            line += f", skipped and listed in {self.report_path}:\n{shown}{more}"
        return line


def list_images(folder: str | Path) -> list[str]:
    """Relative (``/``-separated) paths of the image files under ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: pass a folder of images")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _failed_csv(out: Path) -> Path:
    return out.with_name(out.name[:-len(".npz")] + ".failed.csv" if out.name.endswith(".npz") else out.name + ".failed.csv")


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _fingerprint(checkpoint: Path) -> str:
    h = hashlib.sha1()
    with open(checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _stat(folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    stats = [os.stat(folder / f) for f in files]
    return (np.array([s.st_size for s in stats], dtype=np.int64), np.array([s.st_mtime_ns for s in stats], dtype=np.int64))


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: an interruption never leaves half a file


_REEMBED = ("Run the folder embedder again (python -m vericar.embed FOLDER --checkpoint RUN --out OUT): "
            "it embeds it anew.")


def load_folder_embeddings(path: str | Path) -> FolderEmbeddings:
    """Read an ``OUT.npz`` written by :func:`embed_folder`."""
    path = Path(path)
    d = load_npz(path, _REEMBED)
    failed = pd.DataFrame({"file": d["failed_files"].astype(str), "error": d["failed_errors"].astype(str)})
    return FolderEmbeddings(path, d["files"].astype(str), d["embeddings"], failed, json.loads(str(d["meta"])))


def embed_folder(folder: str | Path, checkpoint: str | Path, out: str | Path | None = None, *, batch_size: int = 64,
                 device: str = "auto", shard_size: int = 1024, workers: int = 2, progress: bool = True,
                 overwrite: bool = False) -> FolderEmbeddings:
    """Embed the images under ``folder`` with the model of the run folder ``checkpoint``; see the module doc.

    Returns the :class:`FolderEmbeddings` written to ``out``; warns (and lists them in ``out.failed.csv``)
    when images could not be read.
    """
    from .runs import load_model, load_run, model_file

    folder = Path(folder)
    files = list_images(folder)
    out = Path(out) if out is not None else folder.parent / f"{folder.resolve().name}.embeddings.npz"
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    run = load_run(checkpoint)
    dev = resolve_device(device)
    meta = {"format": "vericar.embed_folder", "version": FORMAT_VERSION, "folder": str(folder.resolve()),
            "checkpoint": str(Path(checkpoint).resolve()), "model_fingerprint": _fingerprint(model_file(run)),
            "backbone": run.config.backbone, "image_size": run.config.image_size,
            "embedding_dim": run.config.embedding_dim}
    parts = _parts_dir(out)
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        out.unlink(missing_ok=True)

    # ---- what earlier runs (the finished output and interrupted shards) already embedded -------------
    done: dict[str, tuple[np.ndarray, int, int]] = {}  # file -> (embedding, size, mtime_ns)
    sources = ([out] if out.is_file() else []) + sorted(parts.glob("shard-*.npz"))
    for src in sources:
        try:
            d = load_npz(src)
        except RunFileError as err:  # e.g. a full disk: its images are embedded again, the rest is kept
            warnings.warn(f"{err} Its images are embedded again.", stacklevel=2)
            continue
        prev = json.loads(str(d["meta"]))
        if prev.get("model_fingerprint") != meta["model_fingerprint"] or prev.get("image_size") != meta["image_size"]:
            raise ValueError(f"{src} holds embeddings of another model ({prev.get('checkpoint')}, fingerprint "
                             f"{prev.get('model_fingerprint')}); use another --out, or --overwrite to start over")
        for f, e, s, m in zip(d["files"].astype(str), d["embeddings"], d["size"], d["mtime_ns"]):
            done[f] = (e, int(s), int(m))
    size, mtime = _stat(folder, files)
    reuse = [i for i, f in enumerate(files) if f in done and done[f][1:] == (size[i], mtime[i])]
    todo = sorted(set(range(len(files))) - set(reuse))

    # ---- embed the rest, a shard at a time -------------------------------------------------------------
    model = None
    failed: dict[str, str] = {}
    shard_no = 1 + max((int(p.stem.split("-")[1]) for p in parts.glob("shard-*.npz")), default=-1)
    bar = tqdm(total=len(todo), desc="embedding images", unit="img", disable=not progress)
    for start in range(0, len(todo), shard_size):
        if model is None:
            model = load_model(run, device=str(dev))
            image_size = run.config.image_size
        chunk = todo[start:start + shard_size]
        emb_rows, emb_list = [], []
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b:b + batch_size]

            def decode(i: int):
                try:
                    return square_tensor(load_image(folder / files[i]), image_size, model.spec.interpolation)
                except (DataError, OSError, ValueError) as err:  # unreadable: report, never drop silently
                    return f"{type(err).__name__}: {err}"

            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                decoded = list(pool.map(decode, batch))
            ok = [(i, t) for i, t in zip(batch, decoded) if isinstance(t, torch.Tensor)]
            for i, t in zip(batch, decoded):
                if not isinstance(t, torch.Tensor):
                    failed[files[i]] = t
            if ok:
                images = torch.stack([t for _, t in ok])
                emb_list.append(embed_batches(model, images, model.spec, batch_size=batch_size, device=dev,
                                              progress=False))
                emb_rows.extend(i for i, _ in ok)
            bar.update(len(batch))
        if emb_rows:
            parts.mkdir(parents=True, exist_ok=True)
            rows = np.array(emb_rows)
            _save_npz(parts / f"shard-{shard_no:05d}.npz", files=np.array([files[i] for i in rows]),
                      embeddings=np.concatenate(emb_list).astype(np.float32), size=size[rows], mtime_ns=mtime[rows],
                      meta=np.array(json.dumps(meta)))
            for i, e in zip(rows, np.concatenate(emb_list)):
                done[files[i]] = (e, int(size[i]), int(mtime[i]))
            shard_no += 1
    bar.close()

    # ---- merge into OUT.npz, then drop the shards ----------------------------------------------------------
    keep = [i for i, f in enumerate(files) if f in done and f not in failed]
    dim = run.config.embedding_dim
    emb = np.stack([done[files[i]][0] for i in keep]).astype(np.float32) if keep else np.zeros((0, dim), np.float32)
    failed_df = pd.DataFrame(sorted(failed.items()), columns=["file", "error"])
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(out, files=np.array([files[i] for i in keep], dtype=str), embeddings=emb,
              size=size[keep] if keep else np.zeros(0, np.int64), mtime_ns=mtime[keep] if keep else np.zeros(0, np.int64),
              failed_files=failed_df["file"].to_numpy(dtype=str), failed_errors=failed_df["error"].to_numpy(dtype=str),
              meta=np.array(json.dumps(meta)))
    with atomic_path(_failed_csv(out)) as tmp:
        failed_df.to_csv(tmp, index=False, encoding="utf-8", errors="surrogateescape")
    shutil.rmtree(parts, ignore_errors=True)
    result = FolderEmbeddings(out, np.array([files[i] for i in keep], dtype=str), emb, failed_df, meta,
                              embedded=len(todo) - len(failed), reused=len(reuse))
    if len(failed_df):
        warnings.warn(f"{len(failed_df)} of {len(files)} images under {folder} could not be read and were skipped; "
                      f"they are listed in {_failed_csv(out)}", stacklevel=2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vericar.embed_folder (or vericar.embed)", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--checkpoint", required=True, help="a run folder made by vericar.train (RUN_DIR)")
    parser.add_argument("--out", default=None, help="output .npz (default: <FOLDER>.embeddings.npz beside the folder)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per resumable shard")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier output and shards")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*could not be read and were skipped")  # the summary says it
        result = embed_folder(args.folder, args.checkpoint, args.out, batch_size=args.batch_size, device=args.device,
                              shard_size=args.shard_size, workers=args.workers, progress=not args.no_progress,
                              overwrite=args.overwrite)
    print(result.summary(), file=sys.stderr if len(result.failed) else sys.stdout)
    if len(result.failed):
        print(f"{len(result.failed)} images could not be read (listed in {result.report_path}); exit status 1",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
