"""Reading images safely: every image comes back as RGB, every failure names the file and the fix."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A problem with the input data that the user must fix; the message says what and how."""


class CorruptImageError(DataError):
    """An image file exists but cannot be decoded."""


def load_image(path: str | Path, bbox: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Open an image as RGB, optionally cropped to ``bbox = (x1, y1, x2, y2)``.

    The box uses Pillow's convention (``x2``/``y2`` exclusive); the devkit loaders convert the devkit's
    inclusive boxes when they read them. A box covering the whole image means no crop.

    Grayscale, palette, RGBA and CMYK images are converted to RGB (CMYK through Pillow's conversion, which
    is what every other Stanford Cars loader does). A missing or undecodable file raises a
    :class:`DataError` naming it; nothing is skipped silently.
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
                image = im.convert("RGB") if im.mode != "RGB" else im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
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
            image = image.crop((x1, y1, x2, y2))
    return image
