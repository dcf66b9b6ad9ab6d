"""Where a notebook's outputs go: figures and one results JSON per notebook, labelled with what produced them.

Results format (what the README's results table is rendered from): one JSON object per notebook,
``results/NN_name.json``, with ``dataset``, ``protocol``, ``backbone``, ``image_size``, ``device``,
``command``, ``created`` and ``metrics`` (a flat mapping
from metric name to number, fractions in [0, 1]); a notebook comparing several variants writes ``entries``, a
list of such objects.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

#: Set by ``python -m vericar.study`` so that every results file records the command that made it.
COMMAND_ENV = "VERICAR_STUDY_COMMAND"
NOTEBOOK_ENV = "VERICAR_NOTEBOOK"  # set by the study runner while a notebook runs (models record it: run_cost)


def run_paths(run_dir: str | Path) -> tuple[Path, Path]:
    """``(figures_dir, results_dir)`` of a run folder, created if missing."""
    run_dir = Path(run_dir)
    figures, results = run_dir / "figures", run_dir / "results"
    figures.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    return figures, results


def save_figure(fig, run_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``<run_dir>/figures/<name>.png`` (stable name, no timestamp) and return the path."""
    path = run_paths(run_dir)[0] / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def results_entry(*, dataset: str, protocol: str | None, backbone: str | None, image_size: int | None,
                  device: str | None, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One labelled results object: what was measured, on what, with what, where."""
    return _clean({"dataset": dataset, "protocol": protocol, "backbone": backbone, "image_size": image_size,
                   "device": device, "metrics": metrics, **extra})


def write_results(run_dir: str | Path, name: str, entry: dict[str, Any] | None = None, *,
                  entries: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
    """Write ``<run_dir>/results/<name>.json``: one entry (merged at the top level) or a list of ``entries``.

    ``command`` and ``created`` are filled in here: the study runner's command line when run through it,
    otherwise the notebook name (run by hand).
    """
    if (entry is None) == (entries is None):
        raise ValueError("pass exactly one of entry= or entries=")
    payload: dict[str, Any] = dict(entry or {})
    if entries is not None:
        payload["entries"] = entries
    payload.update(_clean(extra))
    payload.setdefault("command", os.environ.get(COMMAND_ENV) or f"notebook run by hand ({name})")
    payload["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    payload["git_commit"] = git_commit()
    path = run_paths(run_dir)[1] / f"{name}.json"
    path.write_text(json.dumps(_clean(payload), indent=2) + "\n", encoding="utf-8")
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
