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
# The decode rules above and below, as recorded in an embedder's spec (`EmbedderSpec.pixels`,
# through `pixels_rule`): change it whenever a change here changes the pixels an embedder sees,
# so that vectors made under the old rules are never reused or mixed with new ones.
PIXELS = "pillow-rgb/1: EXIF upright, alpha on white, JPEG draft"
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


SINGLE_VIEWS = ("pad", "crop", "stretch", "fit")
# Two views of each image, embedded apart and averaged (`retrieval.embedders.embed_batch`):
# twice the model's work.
RESIZE_MODES = (*SINGLE_VIEWS, "pad+crop", "fit+crop", "stretch+crop")
PAD_COLOURS = ("grey", "black", "white", "mean", "edge")
FILTERS = ("bilinear", "bicubic", "lanczos")
_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_PAD_RGB = {"grey": (PAD_VALUE,) * 3, "black": (0, 0, 0), "white": (255, 255, 255)}
# `fit` stretches an image towards square by at most this factor, then pads what is left.
FIT_MAX_STRETCH = 4 / 3


@dataclasses.dataclass(frozen=True, order=True)
class Preprocessing:
    """How a decoded image becomes the model's square input (see `resize`)."""

    resize: str = "pad"
    pad: str = "grey"
    filter: str = "bilinear"

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.resize, RESIZE_MODES, "resize"),
            (self.pad, PAD_COLOURS, "pad"),
            (self.filter, FILTERS, "filter"),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} {value!r} is not one of {list(allowed)}")

    def views(self) -> tuple[Preprocessing, ...]:
        """The single views this preprocessing embeds (two for "pad+crop" and the like)."""
        return tuple(dataclasses.replace(self, resize=mode) for mode in self.resize.split("+"))


def pixels_rule(prep: Preprocessing) -> str:
    """The rules that made an embedder's pixels, as its spec records them.  A grey pad reads
    "pad 127", as every spec did before pad colours and filters existed."""
    pad = str(PAD_VALUE) if prep.pad == "grey" else prep.pad
    return f"{PIXELS}, {prep.filter}, pad {pad}"


def resize(image: Image.Image, size: int, prep: Preprocessing | str = "pad") -> np.ndarray:
    """Resizes RGB to (size, size, 3) uint8 following `prep` (a bare string is a resize mode
    with a grey pad and bilinear filter: the rules before pad colours and filters existed);
    a two-view mode ("pad+crop") gives (2, size, size, 3), the views in its order.

    pad:     longer side to `size`, centred on a square filled with the pad colour (keeps the
             whole image and its shape).  grey/black/white: that colour; mean: the image's mean
             colour; edge: the border pixels repeated outwards.
    crop:    shorter side to `size`, centre crop (loses the ends of the longer side).
    stretch: both sides to `size` (keeps the whole image, not its shape).
    fit:     stretched towards square by at most FIT_MAX_STRETCH (4:3 becomes square), then
             padded like `pad` (keeps the whole image; panoramas keep some of their shape).
    pad+crop, fit+crop, stretch+crop: both views; the embedder averages their vectors.
    """
    if isinstance(prep, str):
        prep = Preprocessing(resize=prep)
    if "+" in prep.resize:
        return np.stack([_resize_view(image, size, view) for view in prep.views()])
    return _resize_view(image, size, prep)


def _resize_view(image: Image.Image, size: int, prep: Preprocessing) -> np.ndarray:
    resample = _FILTERS[prep.filter]
    width, height = image.size
    if prep.resize == "stretch":
        return np.asarray(image.resize((size, size), resample), dtype=np.uint8)
    if prep.resize == "crop":
        scale = size / min(width, height)
        w, h = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (w - size) // 2, (h - size) // 2
        cropped = image.resize((w, h), resample).crop((left, top, left + size, top + size))
        return np.asarray(cropped, dtype=np.uint8)
    if prep.resize == "fit":
        aspect = width / height
        target = max(aspect / FIT_MAX_STRETCH, 1.0) if aspect >= 1 else min(aspect * FIT_MAX_STRETCH, 1.0)
        width, height = (round(height * target), height) if aspect >= 1 else (width, round(width / target))
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(image.resize((w, h), resample), dtype=np.uint8)
    left, top = (size - w) // 2, (size - h) // 2
    if prep.pad == "edge":
        return np.pad(resized, ((top, size - h - top), (left, size - w - left), (0, 0)), mode="edge")
    colour = resized.reshape(-1, 3).mean(axis=0).round() if prep.pad == "mean" else _PAD_RGB[prep.pad]
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[...] = np.asarray(colour, np.uint8)
    canvas[top : top + h, left : left + w] = resized
    return canvas
