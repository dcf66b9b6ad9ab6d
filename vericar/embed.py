"""From images to embeddings: decode once, augment on the device, embed in batches without gradients.

Images are decoded once into a uint8 tensor of square, stretched images (the seed's resize; the Stanford
copies are box crops) at the model's input size. Training then draws batches from that tensor and augments
them on the device, so neither a GPU nor the two CPU cores here wait for JPEG decoding in every epoch.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .data.dataset import CarsDataset
from .data.images import to_rgb
from .models import BackboneSpec
from .neighbours import l2_normalize  # noqa: F401  (re-exported: one implementation)

_PIL_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def square_tensor(image: Image.Image, image_size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """One PIL image stretched to ``image_size`` squared, as uint8 (3, S, S): the model's input geometry.

    The one place images are prepared for a model: training, evaluation, :class:`vericar.predict.CarIdentifier`
    and folder embedding all go through it, so a photo is seen the same way everywhere.
    """
    image = to_rgb(image).resize((image_size, image_size), _PIL_INTERPOLATION[interpolation])
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def decode_images(cars: CarsDataset, rows, image_size: int, interpolation: str = "bicubic", *,
                  progress: bool = True, workers: int = 2) -> torch.Tensor:
    """Decode ``rows`` of ``cars`` into a uint8 tensor (N, 3, S, S), each image stretched to S x S.

    Pillow decodes and resizes with the GIL released, so a small thread pool uses both cores. Any unreadable
    image raises with its file name (see :func:`vericar.data.check_images`).
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = torch.empty((len(rows), 3, image_size, image_size), dtype=torch.uint8)

    def load(i: int) -> None:
        out[i] = square_tensor(cars.image(int(rows[i])), image_size, interpolation)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in tqdm(pool.map(load, range(len(rows))), total=len(rows), desc=f"decoding {image_size}px",
                      disable=not progress, leave=False):
            pass
    return out


def normalize(batch: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float, scaled to [0,1] and normalised with the backbone's mean and std."""
    return normalize_float(batch.float().div_(255.0), spec)


def normalize_float(x: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """Float images in [0,1] normalised with the backbone's mean and std."""
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(batch: torch.Tensor, generator: torch.Generator | None = None, *, scale=(0.6, 1.0),
            ratio=(4 / 5, 5 / 4), flip: bool = True, jitter: float = 0.2) -> torch.Tensor:
    """Random resized crop, horizontal flip and colour jitter for a whole batch at once, on its device.

    Input: float images in [0, 1], (N,3,S,S); output the same shape. Each image gets its own crop (area in
    ``scale``, aspect in ``ratio``), flip and brightness/contrast/saturation factors in ``1 +- jitter``. The
    crop is one ``affine_grid``/``grid_sample`` call for the batch. Written here because torchvision's v2
    transforms draw one set of parameters per call (a Python loop per image would starve a GPU), and this
    is all the augmentation the study needs (kornia would add a dependency for these few lines).
    """
    n, device = batch.shape[0], batch.device

    def uniform(low, high, size=(n,)):
        return torch.empty(size, device="cpu").uniform_(low, high, generator=generator).to(device)

    area = uniform(*scale)
    log_ratio = uniform(float(np.log(ratio[0])), float(np.log(ratio[1])))
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (uniform(0, 1) * 2 - 1) * (1 - w)
    cy = (uniform(0, 1) * 2 - 1) * (1 - h)
    sign = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=device)
    theta = torch.zeros((n, 2, 3), device=device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if jitter > 0:
        b = uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1)
        c = uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1)
        s = uniform(1 - jitter, 1 + jitter).view(n, 1, 1, 1)
        out = out * b
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * c + mean
        gray = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
        out = (out - gray) * s + gray
    return out.clamp_(0, 1)


def augment_normalized(x: torch.Tensor, spec: BackboneSpec, generator: torch.Generator) -> torch.Tensor:
    """:func:`augment` on backbone-normalised images: undo the normalisation, augment, normalise again."""
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return normalize_float(augment((x * std + mean).clamp(0, 1), generator), spec)


@torch.no_grad()
def embed_batches(fn, images: torch.Tensor, spec: BackboneSpec, *, batch_size: int = 128,
                  device: torch.device | str = "cpu", amp: bool = True, progress: bool = True,
                  desc: str = "embedding") -> np.ndarray:
    """Apply ``fn`` (a model or its ``features``) to uint8 ``images`` in batches; float32 numpy out.

    On CUDA the batches run in bf16 autocast and channels_last; on the CPU in float32 (bf16 is slower on
    CPUs without bf16 units, such as these).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    outputs = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = normalize(images[start:start + batch_size].to(device, non_blocking=True), spec)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and amp):
            outputs.append(fn(x).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)


def dataset_fingerprint(cars: CarsDataset) -> str:
    """A short hash of a dataset's identity (root, files, labels, crop): keys caches of its features."""
    h = hashlib.sha1()
    h.update(str(Path(cars.root).resolve()).encode("utf-8", "surrogateescape"))
    h.update(str(cars.crop_to_bbox).encode())
    h.update(cars.table[["filename", "class_id"]].to_csv(index=False).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:12]


def cached_features(cars: CarsDataset, module, spec: BackboneSpec, image_size: int, cache_dir, *,
                    tag: str = "pooled", flips: tuple[bool, ...] = (False,), augment_views: int = 0,
                    device="cpu", batch_size: int = 128, progress: bool = True) -> list[np.ndarray]:
    """``module``'s output for every image of ``cars`` (N, ...) float16, computed once and cached on disk.

    ``module`` is a frozen pretrained backbone or its trunk (:func:`vericar.models.split_backbone`); ``tag``
    names which. One array is returned per entry of ``flips`` (``True``: features of the mirrored images),
    then one per augmented view (``augment_views``: random resized crop, flip and colour jitter of
    :func:`augment`, view ``v`` drawn from seed ``v``, so that every run sees the same views). This is how the
    cached training modes get augmentation: each epoch draws one view per image. Each array is cached under
    the dataset fingerprint, backbone, tag, input size and view; the images are decoded at most once per
    call, however many arrays are missing. Stored and returned in float16 (half the memory; training casts
    each batch). Notebooks and head-only / partial trainings share the cache.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = dataset_fingerprint(cars)
    views = [("flip" if flip else "plain", flip, None) for flip in flips]
    views += [(f"aug{v}", False, v) for v in range(augment_views)]
    images = None
    out = []
    for name, flip, aug_seed in views:
        path = cache_dir / f"features-{spec.name}-{tag}-{image_size}px-{name}-{fingerprint}.npy"
        if path.is_file():
            out.append(np.load(path))
            continue
        if images is None:
            images = decode_images(cars, np.arange(len(cars)), image_size, spec.interpolation, progress=progress)
            module = module.to(device).eval().to(memory_format=torch.channels_last)
        fn = module
        if aug_seed is not None:
            gen = torch.Generator().manual_seed(10_000 + aug_seed)
            fn = lambda x, gen=gen: module(augment_normalized(x, spec, gen).contiguous(  # noqa: E731
                memory_format=torch.channels_last))
        feats = embed_batches(fn, images.flip(-1) if flip else images, spec, batch_size=batch_size,
                              device=device, progress=progress,
                              desc=f"{spec.name} {tag} ({name})").astype(np.float16)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache
        path.with_suffix(".json").write_text(json.dumps(
            {"dataset": cars.name, "root": str(cars.root), "images": len(cars), "backbone": spec.name, "tag": tag,
             "image_size": image_size, "view": name, "shape": list(feats.shape)}, indent=1))
        out.append(feats)
    return out


if __name__ == "__main__":  # ``python -m vericar.embed FOLDER --checkpoint RUN``: the folder embedder
    import runpy  # run, not imported: the embedder imports this module, and modules must not import in a circle

    runpy.run_module("vericar.embed_folder", run_name="__main__")
