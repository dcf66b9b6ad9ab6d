"""Reading images safely: every image comes back as RGB, every failure names the file and the fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


_ORIENTATION = 0x0112  # the EXIF orientation tag


class DataError(ValueError):
    """A problem with the input data that the user must fix; the message says what and how."""


class CorruptImageError(DataError):
    """An image file exists but cannot be decoded."""


def load_image(path: str | Path, bbox: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Open an image as RGB, optionally cropped to ``bbox = (x1, y1, x2, y2)``.

    The box uses Pillow's convention (``x2``/``y2`` exclusive); the devkit loaders convert the devkit's
    inclusive boxes when they read them. A box covering the whole image means no crop.

    The image is turned upright by its EXIF orientation (phone photos), after the crop: boxes are in the
    stored pixels' coordinates. Every mode becomes RGB as :func:`to_rgb` says. A missing, undecodable or
    too large (decompression bomb) file raises a :class:`DataError` naming it; nothing is skipped silently.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}. The labels list it but the file is missing; "
                        "check the data folder is complete (see README, 'Real data').")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                image = im.copy()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"refused image {path}: {err} Shrink or remove the file; if you trust it, raise "
                                "PIL.Image.MAX_IMAGE_PIXELS.") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}. Replace the file or remove its row "
                                "from the labels (vericar.data.check_images lists every such file).") from err
    if bbox is not None:
        x1, y1, x2, y2 = (int(v) for v in bbox)
        w, h = image.size
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(w, x2), min(h, y2)
        if x2 <= x1 or y2 <= y1:
            raise DataError(f"empty bounding box {bbox} for {path} of size {w}x{h}")
        if (x1, y1, x2, y2) != (0, 0, w, h):
            image = image.crop((x1, y1, x2, y2))  # keeps the EXIF orientation for to_rgb
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation applied) and in RGB, with the pixel values it is meant to show.

    Transparency (RGBA, LA, palette with transparency) is composited on white, not dropped (dropped, the
    hidden colours of transparent pixels show); 16-bit and 32-bit integer images are scaled from their range
    to 8 bits (Pillow's plain conversion clips them: white), float images from [0, 1] (or their own maximum
    when above 1; plainly converted they come out black); CMYK goes through Pillow's conversion, as in
    every other Stanford Cars loader. Every place that decodes an image goes through here.
    """
    if image.getexif().get(_ORIENTATION, 1) != 1:  # checked first: exif_transpose copies every image
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Integer or float pixel values scaled to 0..255: 16-bit range for I;16 (and I beyond 255), [0, 1] for F."""
    x = values.astype(np.float64)
    if mode == "F":
        finite = x[np.isfinite(x)]
        top = max(1.0, float(finite.max())) if finite.size else 1.0
        x = np.nan_to_num(x, nan=0.0, posinf=top, neginf=0.0) / top * 255.0
    elif mode.startswith("I;16") or x.max(initial=0) > 255:
        x = x / (65535.0 if x.max(initial=0) <= 65535 else x.max()) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
