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


@pytest.mark.parametrize("mode", imaging.SINGLE_VIEWS)
@pytest.mark.parametrize("pad", imaging.PAD_COLOURS)
@pytest.mark.parametrize("size", [(64, 32), (32, 64), (300, 7), (1, 1)])
def test_resize_modes_give_square_uint8(mode, pad, size):
    out = imaging.resize(images.photo(*size), 40, imaging.Preprocessing(mode, pad, "lanczos"))
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8


def test_two_view_modes_give_both_views_in_order():
    photo = images.photo(64, 32)
    out = imaging.resize(photo, 40, imaging.Preprocessing("pad+crop", "black"))
    assert out.shape == (2, 40, 40, 3)
    assert (out[0] == imaging.resize(photo, 40, imaging.Preprocessing("pad", "black"))).all()
    assert (out[1] == imaging.resize(photo, 40, "crop")).all()


@pytest.mark.parametrize("filter_", imaging.FILTERS)
def test_a_square_image_gets_the_same_pixels_from_every_single_view_mode(filter_):
    """Why the CIFAR-10 comparison (32x32 photos) only varies the filter."""
    square = images.photo(32, 32)
    made = [
        imaging.resize(square, 224, imaging.Preprocessing(m, "black", filter_)) for m in imaging.SINGLE_VIEWS
    ]
    assert all((m == made[0]).all() for m in made)


@pytest.mark.parametrize(
    "pad, expected",
    [("grey", (127, 127, 127)), ("black", (0, 0, 0)), ("white", (255, 255, 255)), ("mean", (10, 20, 30))],
)
def test_pad_colours(pad, expected):
    wide = Image.new("RGB", (100, 50), (10, 20, 30))
    padded = imaging.resize(wide, 20, imaging.Preprocessing("pad", pad))
    assert tuple(padded[0, 10]) == expected and tuple(padded[10, 10]) == (10, 20, 30)


def test_edge_pad_repeats_the_border_rows():
    wide = np.zeros((50, 100, 3), np.uint8)
    wide[:25], wide[25:] = (200, 0, 0), (0, 0, 200)  # red above, blue below
    padded = imaging.resize(Image.fromarray(wide), 20, imaging.Preprocessing("pad", "edge", "bilinear"))
    assert (padded[:5, 10] == (200, 0, 0)).all() and (padded[-5:, 10] == (0, 0, 200)).all()


def test_fit_makes_four_by_three_square_and_pads_what_is_left_of_a_panorama():
    four_three = Image.new("RGB", (80, 60), (255, 0, 0))
    assert (imaging.resize(four_three, 20, imaging.Preprocessing("fit", "black")) == (255, 0, 0)).all()
    panorama = Image.new("RGB", (160, 40), (255, 0, 0))  # 4:1 -> 3:1 after the stretch
    fitted = imaging.resize(panorama, 30, imaging.Preprocessing("fit", "black"))
    assert tuple(fitted[15, 15]) == (255, 0, 0) and tuple(fitted[0, 15]) == (0, 0, 0)
    assert (fitted[:, 15, 0] == 255).sum() == 10  # 30 / 3 rows of image


def test_the_pixels_rule_of_grey_bilinear_is_the_one_recorded_before_pad_and_filter():
    old = "pillow-rgb/1: EXIF upright, alpha on white, JPEG draft, bilinear, pad 127"
    for mode in ("pad", "crop", "stretch"):
        assert imaging.pixels_rule(imaging.Preprocessing(mode, "grey", "bilinear")) == old
    assert imaging.pixels_rule(imaging.Preprocessing("crop", "black", "lanczos")) != old


def test_pad_keeps_whole_image_and_crop_fills_the_square():
    wide = Image.new("RGB", (100, 50), (255, 0, 0))
    padded = imaging.resize(wide, 20, "pad")
    assert tuple(padded[0, 10]) == (imaging.PAD_VALUE,) * 3  # band above the image
    assert tuple(padded[10, 10]) == (255, 0, 0)
    assert (imaging.resize(wide, 20, "crop") == (255, 0, 0)).all()


def test_unknown_resize_mode_lists_allowed():
    with pytest.raises(ValueError, match="pad"):
        imaging.resize(images.photo(), 10, "zoom")
    with pytest.raises(ValueError, match="pad.*black.*mean"):
        imaging.Preprocessing("pad", "blue")
    with pytest.raises(ValueError, match="bilinear.*lanczos"):
        imaging.Preprocessing("pad", "grey", "nearest")


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
