"""Builders of small real encoded images, good and bad, shared by the tests."""

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(width=64, height=48, seed=0) -> Image.Image:
    """A smooth gradient with noise, so JPEG artefacts stay small."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def jpeg(width=64, height=48, seed=0, **kwargs) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=90, **kwargs)


def exif_rotated_jpeg(width=64, height=48) -> bytes:
    """A landscape JPEG whose EXIF orientation (6) says: rotate 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(width, height), "JPEG", exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return encode(photo().convert("CMYK"), "JPEG")


def png16() -> bytes:
    array = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    return encode(Image.fromarray(array), "PNG")


def palette_with_transparency() -> bytes:
    image = photo().convert("P", palette=Image.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def rgba_png() -> bytes:
    image = photo().convert("RGBA")
    image.putalpha(128)
    return encode(image, "PNG")


def la_png() -> bytes:
    return encode(photo().convert("LA"), "PNG")


def multiframe_gif() -> bytes:
    frames = [photo(seed=i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = jpeg(256, 192)
    return data[: len(data) // 3]


def random_bytes(n=2048, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def huge_png(width=200_000, height=200_000) -> bytes:
    """A tiny PNG file whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def write_folder(folder, n, bad=0, seed=0) -> str:
    """n distinct small JPEGs img000.jpg, img001.jpg, ... (sizes 48-54 x 40) and `bad` files
    bad<i>.jpg of random bytes in `folder` (created); returns the folder."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        with open(os.path.join(folder, f"img{i:03d}.jpg"), "wb") as f:
            f.write(jpeg(48 + i % 7, 40, seed=seed + i))
    for i in range(bad):
        with open(os.path.join(folder, f"bad{i}.jpg"), "wb") as f:
            f.write(random_bytes(seed=i))
    return str(folder)


def sample_photos(size: int) -> np.ndarray:
    """skimage's coffee and chelsea photos as a [2, size, size, 3] batch in [0, 1], each resized
    as a whole (no crop) with tf.image.resize bilinear (no antialiasing)."""
    import tensorflow as tf
    from skimage import data

    return np.stack(
        [
            tf.image.resize(photo.astype(np.float32) / 255.0, (size, size), method="bilinear").numpy()
            for photo in (data.coffee(), data.chelsea())
        ]
    )
