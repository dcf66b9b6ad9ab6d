"""Run-folder I/O that survives crashes and hostile files: atomic writes, safe loading, data fingerprints.

* Every file of a run folder (and of the folder embedder) is written to a temporary file beside it and
  renamed over the target (:func:`atomic_path`), so an interruption leaves the old file or the new one, never
  half of one.
* Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`): a run folder is
  meant to travel between machines, and an ordinary pickle in it could run any code when loaded. Only
  tensors and plain data (dicts, lists, str, int, float, bool, None; numpy scalars of older checkpoints) load.
* Unreadable files raise :class:`RunFileError`, which names the file and the fix.
* :func:`data_fingerprint` identifies a dataset's content (file list, splits, labels, boxes, class names),
  not its location, so a run folder can tell that the data under the same path changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["RunFileError", "UnsafeCheckpointError", "atomic_path", "write_json", "save_checkpoint",
           "load_checkpoint", "load_npz", "read_json", "to_plain", "data_fingerprint", "fs_text"]


class RunFileError(ValueError):
    """A file of a run folder (or of the folder embedder) is missing, damaged or not what it should be."""


class UnsafeCheckpointError(RunFileError):
    """A checkpoint holds pickled objects other than tensors and plain data (e.g. a callable): refused."""


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without error.

    ``suffix`` keeps the extension writers insist on (``np.savez`` appends ``.npz`` to other names).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: its files are private (0600); the writer creates this one with the usual permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_plain(data), indent=2))


def read_json(path: str | Path, what: str = "file", fix: str = "") -> Any:
    """Parse a JSON file; a damaged one raises :class:`RunFileError` naming it and ``fix``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} ({what}) is damaged and cannot be read ({err}). {fix}".strip()) from err


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays turned into Python numbers and lists (tensors are kept)."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` atomically, with numpy values made plain so that a ``weights_only`` load accepts it."""
    with atomic_path(path) as tmp:
        torch.save(to_plain(obj), tmp)


def _numpy_scalar_globals() -> list:
    """The globals numpy scalars pickle with (checkpoints written before histories were made plain)."""
    out = [np.dtype]
    core = getattr(np, "_core", None) or np.core
    out.append(core.multiarray.scalar)
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def load_checkpoint(path: str | Path, map_location="cpu", fix: str = "") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data only, never code.

    A checkpoint carrying any other pickled object raises :class:`UnsafeCheckpointError`; a truncated or
    damaged one :class:`RunFileError`. Both name the file; ``fix`` says what to do about a damaged one.
    """
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"no checkpoint at {path}. {fix}".strip())
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds pickled objects other than tensors and plain data, which could "
            f"run code on this machine (it asks for {found.group(1) if found else 'a forbidden object'}). A run "
            "folder written by vericar never does; use a run folder from a source you trust, or retrain.") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise RunFileError(f"{path} is damaged or not a checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}). {fix}".strip()) from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RunFileError(f"{path} is not a vericar checkpoint (no 'model' weights). {fix}".strip())
    return ckpt


def load_npz(path: str | Path, fix: str = "") -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (no pickles); a damaged file raises :class:`RunFileError` naming it and ``fix``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise RunFileError(f"{path} is damaged or not an .npz archive ({type(err).__name__}: {err}). "
                           f"{fix}".strip()) from err


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # file names as the filesystem gives them


def fs_text(name: str) -> str:
    """A file name printable anywhere: undecodable bytes (non-UTF-8 names) shown as ``\\xNN``."""
    return _encode(name).decode("utf-8", "backslashreplace")


def data_fingerprint(cars) -> str:
    """A short hash of what a dataset holds: file list, splits, class ids, boxes and class names.

    Its location is left out on purpose (a run trained elsewhere on a copy of the same data matches), and
    so are the files' bytes (hashing 16k images would cost minutes; replaced images under unchanged
    names are not detected). Non-UTF-8 file names are hashed as the filesystem gives them.
    """
    table = cars.table
    cols = [c for c in ("filename", "split", "class_id", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
            if c in table.columns]
    h = hashlib.sha1()
    h.update(_encode("\n".join(cars.class_names)))
    h.update(str(bool(getattr(cars, "crop_to_bbox", True))).encode())
    h.update(_encode(table[cols].to_csv(index=False)))
    return h.hexdigest()[:16]
