"""A portable embedding model: ONNX export, and the inference backends the app chooses from.

    python -m vericar.export RUN_DIR --onnx OUT.onnx       # write the run's embedding model as ONNX, check it

The exported graph takes float32 images ``(N, 3, S, S)`` with values 0-255 (a photo stretched to the run's
input size ``S``, RGB, as :func:`vericar.embed.square_tensor` makes it) and returns L2-normalised embeddings
``(N, D)``: the backbone's mean/std normalisation and the run's flip TTA are inside the graph, and the input
size and resize filter are stored in the model's metadata (``image_size``, ``interpolation``). Any ONNX
runtime then embeds a photo like training's evaluation did.

Backends (:func:`make_embedder`): ``torch`` (float32, what :class:`vericar.predict.CarIdentifier` does),
``torch-bf16`` (bf16 autocast) and ``onnx`` (onnxruntime). :func:`select_backend` times them on a few
images and keeps the fastest whose embeddings match torch float32 within ``tolerance`` (1 - cosine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .embed import embed_batches, normalize

BACKENDS = ("torch", "torch-bf16", "onnx")
#: Largest accepted 1 - cosine between a backend's embeddings and torch float32's (the issue's bar).
TOLERANCE = 1e-4

Embedder = Callable[[torch.Tensor], np.ndarray]  # uint8 (N, 3, S, S) -> float32 (N, D), L2-normalised


class _FromPixels(torch.nn.Module):
    """The embedding model with its input normalisation inside: float 0-255 pixels in, unit vectors out."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model.eval()
        spec = model.spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model((pixels - self.mean) / self.std), dim=-1)


def export_onnx(model, image_size: int, path: str | Path, *, opset: int = 17) -> Path:
    """Write ``model`` (an :class:`~vericar.models.EmbeddingModel`, eval mode) as ONNX with a dynamic batch axis."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _FromPixels(model.cpu()).eval()
    example = torch.full((2, 3, image_size, image_size), 128.0)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter: torch's newer dynamo exporter needs onnxscript and minutes on 2 cores
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=["pixels"], output_names=["embedding"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    proto = onnx.load(str(tmp))
    meta = {"image_size": str(image_size), "interpolation": model.spec.interpolation, "backbone": model.spec.name,
            "input": "float32 RGB pixels 0-255, (N, 3, S, S), the photo stretched to S x S",
            "output": "L2-normalised embedding (N, D)"}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp))
    tmp.replace(path)  # atomic: a crash never leaves a half-written model under the final name
    return path


class OnnxEmbedder:
    """onnxruntime inference of an exported model (:func:`export_onnx`); ``threads`` intra-op threads."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.image_size = int(self.metadata["image_size"])

    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = [self.session.run(None, {"pixels": images[i:i + batch_size].numpy().astype(np.float32)})[0]
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def torch_embedder(model, *, bf16: bool = False) -> Embedder:
    """Torch inference on the CPU: float32 exactly as :meth:`CarIdentifier.embed`, or under bf16 autocast."""
    model = model.cpu().eval()
    if not bf16:
        return lambda images: embed_batches(model, images, model.spec, device="cpu", progress=False)

    @torch.no_grad()
    def embed(images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = normalize(images[i:i + batch_size], model.spec).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out.append(F.normalize(model(x).float(), dim=-1))
        return torch.cat(out).numpy()
    return embed


def make_embedder(model, image_size: int, backend: str, onnx_path: str | Path | None = None) -> Embedder:
    """An embedder of the named backend; ``onnx`` reads ``onnx_path``, exporting the model there first when it is
    missing (a temporary file if None)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend != "onnx":
        return torch_embedder(model, bf16=backend == "torch-bf16")
    if onnx_path is None or not Path(onnx_path).is_file():
        onnx_path = onnx_path or Path(tempfile.mkdtemp(prefix="vericar-onnx-")) / "model.onnx"
        export_onnx(model, image_size, onnx_path)
    return OnnxEmbedder(onnx_path)


def cosine_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Largest 1 - cosine similarity between matching rows of ``a`` and ``b``."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.max(1.0 - np.sum(a * b, axis=1)))


def throughput(embedder: Embedder, images: torch.Tensor, repeats: int = 3) -> float:
    """Images per second, best of ``repeats`` passes over ``images`` (after one warm-up pass)."""
    embedder(images[: min(len(images), 8)])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        embedder(images)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def select_backend(model, image_size: int, images: torch.Tensor, *, candidates=BACKENDS,
                   tolerance: float = TOLERANCE, repeats: int = 2,
                   onnx_path: str | Path | None = None) -> tuple[str, Embedder, list[dict]]:
    """The fastest backend whose embeddings of ``images`` match torch float32 within ``tolerance``.

    Returns ``(name, embedder, report)``; ``report`` has one row per candidate (img/s, cosine gap, matches,
    or the error that ruled it out, e.g. onnxruntime not installed).
    """
    reference = make_embedder(model, image_size, "torch")
    expected = reference(images)
    report, usable = [], {}
    for name in candidates:
        try:
            embedder = reference if name == "torch" else make_embedder(model, image_size, name, onnx_path)
            gap = cosine_gap(expected, embedder(images))
            row = {"backend": name, "cosine_gap": gap, "matches": gap <= tolerance}
            if row["matches"]:  # only a backend that may be used is worth timing
                row["images_per_second"] = throughput(embedder, images, repeats)
        except Exception as err:  # a backend that cannot run is reported, not fatal: torch float32 always can
            row, embedder = {"backend": name, "error": f"{type(err).__name__}: {err}", "matches": False}, None
        report.append(row)
        if row["matches"]:
            usable[name] = (row["images_per_second"], embedder)
    best = max(usable, key=lambda n: usable[n][0])
    return best, usable[best][1], report


def run_onnx_path(run) -> Path | None:
    """Where a run's exported model is kept: ``<run>/model.onnx`` (stale copies removed), None if read-only."""
    path = Path(run.path) / "model.onnx"
    if path.is_file() and path.stat().st_mtime >= run.model_path.stat().st_mtime:
        return path
    if not os.access(run.path, os.W_OK):
        return None
    path.unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vericar.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished training run folder (vericar.train / notebook 03)")
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX model")
    parser.add_argument("--check-images", type=int, default=16,
                        help="random images embedded by torch and onnxruntime to check they agree (0: skip)")
    args = parser.parse_args(argv)
    from .runs import load_model, load_run

    run = load_run(args.run_dir)
    model = load_model(run)
    path = export_onnx(model, run.config.image_size, args.onnx)
    summary = {"onnx": str(path), "bytes": path.stat().st_size, "image_size": run.config.image_size,
               "backbone": run.config.backbone, "flip_tta": run.config.flip_tta}
    if args.check_images:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.check_images, 3, run.config.image_size, run.config.image_size),
                               dtype=torch.uint8, generator=gen)
        gap = cosine_gap(make_embedder(model, run.config.image_size, "torch")(images), OnnxEmbedder(path)(images))
        summary.update(max_cosine_gap=gap, matches_torch=gap <= TOLERANCE)
        if gap > TOLERANCE:
            print(json.dumps(summary, indent=2))
            raise SystemExit(f"onnxruntime's embeddings differ from torch's by 1 - cosine {gap:.2e} > {TOLERANCE}")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
