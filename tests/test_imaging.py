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


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PPM", "PCX", "SGI", "DDS"])
def test_formats_outside_the_accepted_list_are_refused_by_name(fmt):
    data = images.encode(images.photo(), fmt)
    with pytest.raises(ImageDecodeError, match=rf"look like {fmt}, not an accepted image format.*JPEG, PNG"):
        imaging.decode(data)


def test_eps_never_reaches_ghostscript(monkeypatch):
    """A real EPS file is refused before any plugin parses it: Pillow's EPS plugin (which
    hands the file to Ghostscript) is never asked to open it."""
    from PIL import EpsImagePlugin

    def refuse(*args, **kwargs):
        raise AssertionError("the EPS plugin was asked to open the file")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)
    with pytest.raises(ImageDecodeError, match="EPS"):
        imaging.decode(images.encode(images.photo(), "EPS"))


def test_psd_header_is_named():
    with pytest.raises(ImageDecodeError, match="look like PSD"):
        imaging.decode(b"8BPS\x00\x01" + bytes(40))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format_decodes(fmt):
    assert imaging.decode(images.encode(images.photo(), fmt)).image.size == (64, 48)


def test_unrecognised_bytes_name_their_start_and_nothing_random():
    with pytest.raises(ImageDecodeError) as first:
        imaging.decode(b"<html>not found</html>")
    with pytest.raises(ImageDecodeError) as second:
        imaging.decode(b"<html>not found</html>")
    assert str(first.value) == str(second.value) and "b'<html>no'" in str(first.value)


def test_bomb_guard_is_deterministic_across_threads_and_warning_filters():
    """Many bombs and good images decoded by 8 threads at once, while another thread keeps
    turning every warning into an error (process-wide state): every bomb is refused, every good
    image accepted, in every trial.  The limit sits just between them."""
    import concurrent.futures
    import threading
    import warnings

    limit = 48 * 48
    bombs = [images.huge_png(100_000, 100_000), images.huge_png(49, 48)] * 40
    good = [
        images.encode(images.photo(48, 48, seed=i), fmt)
        for i, fmt in enumerate(["PNG", "JPEG", "GIF", "TIFF"] * 10)
    ]
    items = [(data, True) for data in bombs] + [(data, False) for data in good]
    stop = threading.Event()

    def meddle():
        while not stop.is_set():
            with warnings.catch_warnings():
                warnings.simplefilter("error")

    def outcome(item):
        data, _ = item
        try:
            imaging.decode(data, max_pixels=limit)
            return False
        except ImageDecodeError as exc:
            assert "decompression-bomb" in str(exc), exc
            return True

    meddler = threading.Thread(target=meddle)
    meddler.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in range(5):
                assert list(pool.map(outcome, items)) == [bomb for _, bomb in items]
    finally:
        stop.set()
        meddler.join()


def test_images_above_pillows_own_limit_follow_max_pixels_only():
    """Pillow's process-wide guard (a warning above 89 MP, an error above 179 MP) is off: the
    declared size against max_pixels is the one rule, whatever the warning filters say."""
    import warnings

    from PIL import Image

    assert Image.MAX_IMAGE_PIXELS is None
    bomb = images.huge_png(10_000, 9_000)  # 90 MP: above Pillow's warning limit, below ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError, match="cannot decode"):  # past the guard; its pixels are bogus
            imaging.decode(bomb)
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        imaging.decode(bomb, max_pixels=89_999_999)


def test_pillows_warnings_about_damaged_files_stay_off_the_terminal(tmp_path):
    """A TIFF cut inside its directory makes Pillow warn ("Corrupt EXIF data", "Truncated File
    Read") before it gives up: the refusal is the failure's reason, the warning is not printed.
    In a subprocess: pytest resets warning filters around collection and each test."""
    import os
    import struct
    import subprocess
    import sys

    data = images.encode(images.photo(), "TIFF")
    (ifd,) = struct.unpack("<I", data[4:8])
    (tmp_path / "cut.tif").write_bytes(data[: ifd + 20])
    code = (
        "import sys\n"
        "from retrieval import imaging\n"
        "try:\n"
        "    imaging.decode(open(sys.argv[1], 'rb').read())\n"
        "except imaging.ImageDecodeError as exc:\n"
        "    print(exc)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cut.tif")],
        env={**os.environ, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() and done.stderr == ""
