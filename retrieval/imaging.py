"""Robust image decoding and resizing for embedders (Pillow).

Only the formats of `ACCEPTED_FORMATS` (JPEG, PNG, WebP, GIF, BMP, TIFF) are opened, for
queries and the pipeline alike: Pillow knows dozens more, some of them handed to external
programs (EPS to Ghostscript) or rarely exercised parsers; any other format is refused with
its name.

The decompression-bomb guard is ours and deterministic: the size an image declares in its
header is checked against `max_pixels` after the header is parsed and before any pixel is
decoded.  Pillow's own guard (`Image.MAX_IMAGE_PIXELS`, a process-wide limit that warns
above 89 MP and raises above 179 MP) is switched off when this module is imported: its
warning became an error or not depending on the `warnings` filters of whatever thread ran at
the same moment, so the same image was accepted alone and refused next to another decode.

Every decoded image becomes 8-bit RGB the same documented way:
- EXIF orientation is applied; width/height reported are those of the upright original.
- Multi-frame files (GIF, TIFF, WebP animations): the first frame.
- Transparency (RGBA, LA, PA, P with a transparency key) is composited onto white.
- 16-bit and 32-bit integer greyscale (I;16*, I) is scaled linearly from its full range
  (0..65535) to 0..255; float greyscale (F) is clipped to 0..255.
- CMYK, YCbCr, LAB, HSV, 1, L, P are converted with Pillow's `convert("RGB")`.
JPEGs are decoded at a reduced scale with `Image.draft` when the target is much smaller
(at least `min_size` on both sides is kept): decoding is then much cheaper, and embeddings
barely change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from retrieval.errors import ConfigError

DEFAULT_MAX_PIXELS = 100_000_000
# Pillow format names opened by `decode`; anything else is refused.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"
PAD_VALUE = 127  # mid-grey: ~0 after the usual [0,1] -> [-1,1] input scaling
# The rules above and below, as recorded in an embedder's spec (`EmbedderSpec.pixels`):
# change it whenever a change here changes the pixels an embedder sees, so that vectors
# made under the old rules are never reused or mixed with new ones.
PIXELS = "pillow-rgb/1: EXIF upright, alpha on white, JPEG draft, bilinear, pad 127"
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image, or the image is not acceptable."""


# See the module docstring: `decode` checks every image's declared size itself.
Image.MAX_IMAGE_PIXELS = None
# Pillow warns (UserWarning) about what it meets in damaged files: truncated TIFF directories,
# corrupt EXIF, invalid APNG chunks.  The image then decodes or fails with a reason of its
# own; the warnings are noise on the user's terminal.  Ignored for good, once (never toggled:
# a filter set once cannot make one decode's outcome depend on another's).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


@dataclasses.dataclass
class DecodedImage:
    image: Image.Image  # RGB, possibly reduced by draft
    width: int  # upright original size
    height: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, *, min_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decodes encoded image bytes to upright RGB.  Raises ImageDecodeError with a reason.

    Only ACCEPTED_FORMATS are opened; an image declaring more than `max_pixels` pixels is
    refused before any of its pixels is decoded.  Thread-safe, and the outcome depends only
    on the bytes and the arguments."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Exception as exc:
        raise ImageDecodeError(_unrecognised(data)) from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image declares {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (decompression-bomb guard; raise --max_pixels to accept it)"
        )
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a corrupt EXIF block should not lose an otherwise good image
        orientation = 1
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    if min_size and image.format == "JPEG":
        image.draft("RGB", (min_size, min_size))
    try:
        image.load()
        image = _upright(image, orientation)
        rgb = to_rgb(image)
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return DecodedImage(rgb, width, height)


def identify_format(data: bytes) -> str | None:
    """The Pillow format whose signature the bytes start with (whether accepted or not), or
    None.  Only the header's first bytes are looked at: no plugin parses the file."""
    Image.init()
    prefix = data[:16]
    for name in ACCEPTED_FORMATS + tuple(f for f in Image.ID if f not in ACCEPTED_FORMATS):
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # a plugin's signature check failing on odd bytes: not that format
            continue
    return None


def _unrecognised(data: bytes) -> str:
    """Why Pillow could not open `data` with the accepted formats (no object addresses, so
    the same bytes always get the same message)."""
    name = identify_format(data)
    if name is None:
        return (
            f"not a recognised image (accepted formats: {_FORMAT_NAMES}); the bytes start with {data[:8]!r}"
        )
    if name in ACCEPTED_FORMATS:
        return f"{name} header cannot be read (a damaged or truncated file)"
    return f"the bytes look like {name}, not an accepted image format (accepted formats: {_FORMAT_NAMES})"


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    if orientation == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB as documented in the module docstring.

    A multi-frame image is used at the frame it is on: `decode` loads the first.  (Asking for
    `n_frames` would parse every frame of an animation first.)"""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image, dtype=np.float64)
        array = np.clip(array / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    return image.convert("RGB")


RESIZE_MODES = ("pad", "crop", "stretch")


def resize(image: Image.Image, size: int, mode: str = "pad") -> np.ndarray:
    """Resizes RGB to (size, size, 3) uint8.

    pad:     longer side to `size`, centred on a mid-grey square (keeps the whole image).
    crop:    shorter side to `size`, centre crop.
    stretch: both sides to `size`, aspect ratio not kept.
    """
    width, height = image.size
    if mode == "stretch":
        out = image.resize((size, size), Image.Resampling.BILINEAR)
    elif mode == "pad":
        scale = size / max(width, height)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        out = Image.new("RGB", (size, size), (PAD_VALUE,) * 3)
        out.paste(image.resize((w, h), Image.Resampling.BILINEAR), ((size - w) // 2, (size - h) // 2))
    elif mode == "crop":
        scale = size / min(width, height)
        w, h = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (w - size) // 2, (h - size) // 2
        out = image.resize((w, h), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))
    else:
        raise ConfigError(f"resize mode {mode!r} is not one of {list(RESIZE_MODES)}")
    return np.asarray(out, dtype=np.uint8)
