import numpy as np
import pytest
from PIL import Image

from retrieval import imaging
from retrieval.imaging import ImageDecodeError
from tests.helpers import images


@pytest.mark.parametrize(
    "make",
    [
        images.jpeg,
        images.cmyk_jpeg,
        images.png16,
        images.palette_with_transparency,
        images.rgba_png,
        images.la_png,
        images.multiframe_gif,
    ],
)
def test_every_mode_decodes_to_rgb(make):
    decoded = imaging.decode(make())
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48)
    array = np.asarray(decoded.image)
    assert array.shape == (48, 64, 3) and array.dtype == np.uint8


def test_exif_orientation_is_applied_and_reported_upright():
    decoded = imaging.decode(images.exif_rotated_jpeg(64, 48))
    assert (decoded.width, decoded.height) == (48, 64)
    assert decoded.image.size == (48, 64)
    # Orientation 6 rotates clockwise: the original top-left (dark red/green) ends up top-right.
    plain = np.asarray(imaging.decode(images.jpeg(64, 48)).image).astype(int)
    rotated = np.asarray(decoded.image).astype(int)
    assert np.abs(rotated - np.rot90(plain, k=-1)).mean() < 6


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    decoded = imaging.decode(images.encode(image, "PNG"))
    assert np.asarray(decoded.image).min() == 255


def test_sixteen_bit_is_scaled_from_full_range():
    array = np.full((4, 4), 65535, np.uint16)
    decoded = imaging.decode(images.encode(Image.fromarray(array), "PNG"))
    assert np.asarray(decoded.image).min() == 255


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (images.random_bytes(), "not a recognised image"),
        (images.truncated_jpeg(), "cannot decode"),
        (images.huge_png(), "decompression-bomb"),
    ],
)
def test_bad_bytes_raise_decode_error_with_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        imaging.decode(data)


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageDecodeError, match="above the limit"):
        imaging.decode(images.jpeg(64, 48), max_pixels=1000)


def test_draft_reduces_large_jpeg_but_keeps_min_size_and_original_dims():
    decoded = imaging.decode(images.jpeg(640, 480), min_size=100)
    assert (decoded.width, decoded.height) == (640, 480)
    assert min(decoded.image.size) >= 100 and decoded.image.size[0] < 640


@pytest.mark.parametrize("mode", ["pad", "crop", "stretch"])
def test_resize_modes_give_square_uint8(mode):
    out = imaging.resize(images.photo(64, 32), 40, mode)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8


def test_pad_keeps_whole_image_and_crop_fills_the_square():
    wide = Image.new("RGB", (100, 50), (255, 0, 0))
    padded = imaging.resize(wide, 20, "pad")
    assert tuple(padded[0, 10]) == (imaging.PAD_VALUE,) * 3  # band above the image
    assert tuple(padded[10, 10]) == (255, 0, 0)
    assert (imaging.resize(wide, 20, "crop") == (255, 0, 0)).all()


def test_unknown_resize_mode_lists_allowed():
    with pytest.raises(ValueError, match="pad"):
        imaging.resize(images.photo(), 10, "zoom")
