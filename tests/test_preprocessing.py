import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import image_bytes
from wbc_ml.preprocessing import ImageRejected, Normalization, decode_image, load_pixels, open_image, resize


def test_scale01_maps_0_255_to_unit_interval():
    pixels = np.array([[[0, 51, 255]]], dtype=np.uint8)
    out = Normalization.from_dict({"method": "scale01"}).apply(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[0.0, 0.2, 1.0]]], atol=1e-7)


def test_zscore_uses_per_channel_mean_and_std():
    norm = Normalization.from_dict({"method": "zscore", "mean": [100, 50, 0], "std": [10, 25, 127.5]})
    out = norm.apply(np.array([[[120, 0, 255]]], dtype=np.uint8))
    np.testing.assert_allclose(out, [[[2.0, -2.0, 2.0]]], atol=1e-6)


def test_imagenet_zscore_is_minus_one_to_one():
    norm = Normalization.from_dict({"method": "zscore", "mean": [127.5] * 3, "std": [127.5] * 3})
    np.testing.assert_allclose(norm.apply(np.array([[[0, 255, 127.5]]])), [[[-1.0, 1.0, 0.0]]])


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "minmax"},
        {"method": "zscore", "mean": [1, 2], "std": [1, 1, 1]},
        {"method": "zscore", "mean": [0, 0, 0], "std": [1, 0, 1]},
    ],
)
def test_bad_normalisation_specs_are_refused(spec):
    with pytest.raises(ValueError):
        Normalization.from_dict(spec)


def test_exif_orientation_is_applied():
    # 40 wide x 20 high, left half red; EXIF orientation 6 means "rotate 90 degrees clockwise to view".
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    decoded = decode_image(buffer.getvalue())
    assert decoded.size == (20, 40)  # now portrait
    top = np.asarray(decoded)[:10].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the red half is on top after rotating clockwise


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_any_mode_becomes_rgb(mode):
    image = decode_image(image_bytes(mode=mode))
    assert image.mode == "RGB"


def test_transparent_png_is_flattened_on_white():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert np.asarray(decode_image(buffer.getvalue())).min() == 255


def test_resize_gives_height_width_uint8():
    out = load_pixels(image_bytes(size=(90, 50)), (24, 32))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8


def test_resize_keeps_exact_size_untouched():
    image = decode_image(image_bytes(size=(32, 32)))
    np.testing.assert_array_equal(resize(image, (32, 32)), np.asarray(image))


def test_type_is_decided_by_content_not_name():
    with pytest.raises(ImageRejected, match="not a readable image"):
        decode_image(b"this is plain text pretending to be a jpeg", name="cell.jpg")


def test_gif_is_refused_as_unsupported_type():
    with pytest.raises(ImageRejected, match=r"unsupported image type \(GIF\)"):
        decode_image(image_bytes(fmt="GIF"), name="cell.gif")


@pytest.mark.parametrize("reduced", [False, True], ids=["full decode", "reduced-scale check"])
def test_truncated_jpeg_is_refused(reduced):
    data = image_bytes(size=(200, 200), fmt="JPEG")
    with pytest.raises(ImageRejected, match="damaged or truncated"):
        decode_image(data[: len(data) // 2], name="half.jpg", reduced=reduced)


def test_reduced_scale_check_decodes_a_good_jpeg_small_and_keeps_the_size_checks():
    data = image_bytes(size=(360, 363), fmt="JPEG")
    assert max(decode_image(data, reduced=True).size) < 100
    with pytest.raises(ImageRejected, match="too large"):
        decode_image(data, reduced=True, max_pixels=360 * 363 - 1)
    with pytest.raises(ImageRejected, match="too small"):
        decode_image(image_bytes(size=(12, 40), fmt="JPEG"), reduced=True)


def test_too_many_bytes_is_refused():
    with pytest.raises(ImageRejected, match="larger than"):
        decode_image(image_bytes(size=(64, 64)), max_bytes=100)


def test_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(ImageRejected, match="too large"):
        decode_image(image_bytes(size=(300, 300)), max_pixels=10_000)


def test_decompression_bomb_is_refused():
    # A 20000x20000 PNG compresses to a few hundred KB but would need 1.2 GB decoded.
    bomb = io.BytesIO()
    Image.new("L", (20000, 20000)).save(bomb, format="PNG")
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_image(bomb.getvalue(), name="bomb.png")


def test_empty_file_is_refused():
    with pytest.raises(ImageRejected, match="empty"):
        decode_image(b"", name="nothing.png")


def test_opening_an_upload_refuses_without_decoding_and_leaves_a_damaged_stream_to_the_decoder():
    data = image_bytes(size=(360, 363), fmt="JPEG")
    assert open_image(data[: len(data) // 2], name="half.jpg").size == (360, 363)  # only decoding finds this
    for source, limits, reason in (
        (b"", {}, "empty"),
        (b"not an image", {}, "not a readable image"),
        (image_bytes(fmt="GIF"), {}, "unsupported image type"),
        (data, {"max_pixels": 360 * 363 - 1}, "too large"),
        (data, {"max_bytes": 100}, "larger than"),
        (image_bytes(size=(12, 40), fmt="JPEG"), {}, "too small"),
    ):
        with pytest.raises(ImageRejected, match=reason):
            open_image(source, name="cell.jpg", **limits)
