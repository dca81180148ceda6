"""detector/images.py, what clients' images become: every input kind, every pixel mode converted to exact 8-bit RGB
(checked against arithmetic done here, not against the code's own calls), the EXIF orientations as the headers
predict them, an upload cut short told from its last bytes, and each refusal's code and message."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from detector.images import (ALLOWED_FORMATS, DECODE_BYTES_PER_PIXEL, MAX_FRAMES, ROTATED_EXTRA_BYTES_PER_PIXEL,
                             ImageDecodeError, bytes_per_pixel, load_image, probe_image)

ACCEPTED = ", ".join(ALLOWED_FORMATS)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def refusal(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(ImageDecodeError) as refused:
        call(*args, **kwargs)
    assert str(refused.value) == refused.value.message
    return refused.value.code, refused.value.message


def grey3(values) -> np.ndarray:
    """The RGB image a grey one becomes: the same value in all three channels."""
    values = np.asarray(values, np.uint8)
    return np.stack([values] * 3, axis=-1)


def assert_rgb(decoded: np.ndarray, expected) -> None:
    """What load_image promises: a C-contiguous HxWx3 uint8 array, here equal to `expected`."""
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, expected)


def nearest_8_bit(values) -> np.ndarray:
    """round(v * 255 / 65535), clipped to 0..255, by floor(x + 0.5): no value of these images lies half-way."""
    return np.clip(np.floor(np.asarray(values, np.float64) * 255 / 65535 + 0.5), 0, 255)


# ----------------------------------------------------------------------------------------------- pixel modes


def test_sixteen_bit_images_are_scaled_to_the_nearest_8_bit_value():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value
    for source in (Image.fromarray(values), encode(Image.fromarray(values), "PNG")):
        assert_rgb(load_image(source), grey3(nearest_8_bit(values)))


def test_sixteen_bit_scaling_stays_in_integers():
    """The scaling runs in one uint32 buffer: about 10 bytes a pixel of numpy arrays at the peak (16-bit values,
    the buffer, the 8-bit grey and RGB results); float64 would need 14. DECODE_BYTES_PER_PIXEL counts on it."""
    image = Image.fromarray(np.full((1000, 1000), 4000, np.uint16))
    tracemalloc.start()
    try:
        load_image(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 11 * 1_000_000


def test_sixteen_bit_images_that_use_only_8_bits_keep_their_values():
    values = np.array([[0, 7, 200, 255]], np.uint16)  # a converted 8-bit scan: scaling would blacken it
    assert_rgb(load_image(encode(Image.fromarray(values), "PNG")), grey3(values))
    just_over = np.array([[0, 128, 256]], np.uint16)  # 256 needs 9 bits: scaled
    assert_rgb(load_image(Image.fromarray(just_over)), grey3([[0, 0, 1]]))


def test_32_bit_integer_images_are_scaled_from_16_bits_or_kept_when_8_bit():
    wide = np.arange(-300, 70_000, 3, dtype=np.int32).reshape(1, -1)
    assert_rgb(load_image(Image.fromarray(wide)), grey3(nearest_8_bit(wide)))
    assert_rgb(load_image(Image.fromarray(np.array([[0, 256]], np.int32))), grey3([[0, 1]]))
    narrow = np.array([[-5, 0, 100, 255]], np.int32)
    assert_rgb(load_image(encode(Image.fromarray(narrow), "TIFF")), grey3([[0, 0, 100, 255]]))


def test_float_images_are_clipped_to_0_255_and_truncated():
    values = np.array([[-2.5, 0.0, 3.7, 254.9, 300.0]], np.float32)
    assert_rgb(load_image(encode(Image.fromarray(values), "TIFF")), grey3([[0, 0, 3, 254, 255]]))


def test_an_empty_image_is_refused():
    assert refusal(load_image, Image.new("RGB", (0, 5))) == ("invalid_image", "image has 0x5 pixels")
    assert refusal(load_image, Image.new("I;16", (4, 0))) == ("invalid_image", "image has 4x0 pixels")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_black_and_opaque_ones_keep_their_colour(mode):
    rgba = np.array([[[200, 120, 40, 255], [200, 120, 40, 0], [10, 250, 90, 255]]], np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "PA":
        image = image.convert("PA")
    opaque = np.asarray(image.convert("RGBA").convert("RGB"))
    decoded = load_image(image)
    assert decoded.dtype == np.uint8 and decoded.shape == (1, 3, 3)
    np.testing.assert_array_equal(decoded[0, [0, 2]], opaque[0, [0, 2]])
    np.testing.assert_array_equal(decoded[0, 1], [0, 0, 0])


def test_half_transparent_pixels_are_darkened_as_over_black():
    rgba = np.array([[[200, 120, 40, 128], [255, 255, 255, 64]]], np.uint8)
    expected = rgba[..., :3] * (rgba[..., 3:] / 255)
    decoded = load_image(Image.fromarray(rgba, "RGBA"))
    assert decoded.dtype == np.uint8 and np.abs(decoded - expected).max() <= 1


def test_a_palette_images_transparent_colour_becomes_black():
    palette = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)).convert("P")
    red = palette.getpixel((0, 0))
    with_transparency = encode(palette, "PNG", transparency=red)
    assert_rgb(load_image(with_transparency), [[[0, 0, 0], [0, 0, 255]]])
    assert probe_image(with_transparency).mode == "RGBA"  # priced as an image with alpha
    np.testing.assert_array_equal(load_image(encode(palette, "PNG")), [[[255, 0, 0], [0, 0, 255]]])
    assert probe_image(encode(palette, "PNG")).mode == "P"


def test_an_rgb_png_with_a_transparent_colour_is_read_as_rgb():
    image = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))
    data = encode(image, "PNG", transparency=(255, 0, 0))
    assert "transparency" in Image.open(io.BytesIO(data)).info
    assert probe_image(data).mode == "RGB"
    np.testing.assert_array_equal(load_image(data), [[[255, 0, 0], [0, 0, 255]]])


def test_grey_bilevel_and_cmyk_images_are_converted_by_pillow():
    grey = np.array([[0, 90, 255]], np.uint8)
    np.testing.assert_array_equal(load_image(encode(Image.fromarray(grey), "PNG")), grey3(grey))
    np.testing.assert_array_equal(load_image(Image.fromarray(grey).convert("1")), grey3([[0, 0, 255]]))
    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))  # red
    np.testing.assert_array_equal(load_image(cmyk), [[[255, 0, 0], [255, 0, 0]]])


# ------------------------------------------------------------------------------------------------------ arrays


def test_a_decoded_rgb_array_is_passed_on_and_others_are_converted():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert load_image(rgb) is rgb
    strided = np.asfortranarray(rgb)
    converted = load_image(strided)
    assert converted is not strided and converted.flags.c_contiguous
    np.testing.assert_array_equal(converted, rgb)
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(rgba), rgb)  # alpha dropped
    np.testing.assert_array_equal(load_image(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2))
    deep = np.arange(65536, dtype=np.uint16).reshape(128, 512)[:, :, None].repeat(3, axis=2)
    assert_rgb(load_image(deep), nearest_8_bit(deep))
    assert_rgb(load_image(np.array([[[-1.0, 3.9, 300.0]]])), [[[0, 3, 255]]])
    assert_rgb(load_image(np.array([[0.5, 255.0]], np.float32)), grey3([[0, 255]]))


@pytest.mark.parametrize("shape", [(2, 3, 2), (2, 3, 5), (2, 3, 3, 1), (4,), (0, 3, 3), (3, 0, 3)])
def test_arrays_of_other_shapes_are_refused(shape):
    assert refusal(load_image, np.zeros(shape, np.float32)) == (
        "invalid_image", f"expected an HxW, HxWx3 or HxWx4 array, got shape {shape}")


def test_arrays_over_the_pixel_limit_are_refused_at_the_limit():
    assert load_image(np.zeros((2, 5, 3), np.uint8), max_pixels=10).shape == (2, 5, 3)
    assert refusal(load_image, np.zeros((2, 5, 3), np.uint8), max_pixels=9) == (
        "image_too_large", "image has 5x2 pixels, over the limit")
    assert load_image(np.zeros((2, 5), np.float32), max_pixels=10).shape == (2, 5, 3)
    assert refusal(load_image, np.zeros((2, 5, 4), np.float32), max_pixels=9) == (
        "image_too_large", "image has 5x2 pixels, over the limit")


# ---------------------------------------------------------------------------------------------- input kinds


def test_every_input_kind_decodes_the_same_picture(tmp_path):
    pixels = np.array([[[1, 2, 3], [40, 50, 60]]], np.uint8)
    data = encode(Image.fromarray(pixels), "PNG")
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    for source in (data, bytearray(data), memoryview(data), str(path), path, io.BytesIO(data),
                   Image.fromarray(pixels)):
        np.testing.assert_array_equal(load_image(source), pixels)


def test_input_kinds_that_are_not_images_are_refused(tmp_path):
    assert refusal(load_image, b"") == ("empty_image", "the image is empty (0 bytes)")
    assert refusal(load_image, bytearray()) == ("empty_image", "the image is empty (0 bytes)")
    assert refusal(probe_image, b"") == ("empty_image", "the image is empty (0 bytes)")
    missing = tmp_path / "missing.jpg"
    assert refusal(load_image, missing) == ("image_not_found", f"no image file at {missing}")
    assert refusal(load_image, str(tmp_path)) == ("image_not_found", f"no image file at {tmp_path}")
    assert refusal(load_image, 42) == ("invalid_image", "unsupported image input of type int")
    for call in (load_image, probe_image):
        assert refusal(call, b"this is not an image") == (
            "invalid_image", f"cannot decode the image: not an image in an accepted format ({ACCEPTED})")


def test_formats_outside_the_list_are_refused_even_when_pillow_reads_them():
    data = encode(Image.new("RGB", (4, 4)), "ICO")
    assert Image.open(io.BytesIO(data)).format == "ICO"
    for call in (load_image, probe_image):
        assert refusal(call, data) == ("unsupported_format", "image format ICO is not accepted")
    assert load_image(Image.open(io.BytesIO(data))).shape == (4, 4, 3)  # a caller's own PIL image is trusted


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (10_000, 9_000)), "PNG")  # 90 MP, over Pillow's own bomb warning
    assert len(bomb) < 100_000
    for call in (load_image, probe_image):
        code, message = refusal(call, bomb, max_pixels=200_000_000)
        assert code == "image_too_large"
        assert message.startswith("image refused as a decompression bomb (Image size (90000000 pixels) exceeds limit")


def test_corrupt_exif_is_only_a_warning():
    """Pillow warns about a broken EXIF directory and reads what it can; the image is still served."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "maker"
    data = bytearray(encode(Image.new("RGB", (8, 6)), "JPEG", exif=exif))
    tiff = data.index(b"Exif\0\0") + 6
    assert data[tiff:tiff + 2] == b"MM"
    data[tiff + 8:tiff + 10] = (51200).to_bytes(2, "big")  # the first directory claims 51,200 entries
    with pytest.warns(UserWarning, match="Corrupt EXIF data"):
        header = probe_image(bytes(data))
    assert (header.width, header.height, header.rotated) == (6, 8, True)
    with pytest.warns(UserWarning, match="Corrupt EXIF data"):
        assert load_image(bytes(data)).shape == (8, 6, 3)


def test_a_broken_image_body_is_a_decode_error_with_its_reason():
    whole = encode(Image.effect_noise((64, 48), 60).convert("RGB"), "JPEG")
    code, message = refusal(load_image, whole[: len(whole) // 2])
    assert code == "invalid_image" and message.startswith("cannot decode the image (image file is truncated")
    ppm = b"P6\n4 4\n0\n" + b"\0" * 48  # a header Pillow identifies and then refuses
    assert refusal(probe_image, ppm) == (
        "invalid_image", "cannot read the image's headers (maxval must be greater than 0 and less than 65536)")
    assert refusal(load_image, ppm) == (
        "invalid_image", "cannot decode the image (maxval must be greater than 0 and less than 65536)")


# --------------------------------------------------------------------------------------------------- headers


@pytest.mark.parametrize("orientation, shape, rotated", [
    (1, (30, 40), False), (2, (30, 40), True), (3, (30, 40), True), (4, (30, 40), True),
    (5, (40, 30), True), (6, (40, 30), True), (7, (40, 30), True), (8, (40, 30), True)])
def test_each_exif_orientation_is_predicted_by_the_headers_and_applied(orientation, shape, rotated):
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[0, 0] = 255  # a white top-left corner, to see where it goes
    for fmt in ("JPEG", "MPO", "WEBP", "TIFF", "PNG"):
        more = {"save_all": True, "append_images": [Image.fromarray(pixels)]} if fmt == "MPO" else {}
        data = encode(Image.fromarray(pixels), fmt, exif=exif, **more)
        header = probe_image(data)
        assert ((header.height, header.width), header.rotated, header.format) == (shape, rotated, fmt)
        assert load_image(data).shape == shape + (3,)
        assert header.decode_bytes == 1200 * (DECODE_BYTES_PER_PIXEL["rgb"] +
                                              (ROTATED_EXTRA_BYTES_PER_PIXEL if rotated else 0))


def test_an_image_without_an_orientation_is_not_rotated():
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "PPM"):
        header = probe_image(encode(Image.new("RGB", (5, 3)), fmt))
        assert (header.format, header.width, header.height, header.rotated, header.frames) == (fmt, 5, 3, False, 1)


def png_chunk(data: bytes, kind: bytes) -> tuple[int, int]:
    """(start, end) of the first chunk of `kind` in a PNG: length, type, data, CRC."""
    start = data.index(kind) - 4
    return start, start + 12 + int.from_bytes(data[start:start + 4], "big")


def test_a_png_whose_exif_follows_its_pixels_is_read_without_decoding():
    """Pillow finds a PNG's EXIF after the pixel data only by decoding them; the headers then say 'not rotated'."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (5, 3)), "PNG", exif=exif)
    (start, end), (iend, _) = png_chunk(data, b"eXIf"), png_chunk(data, b"IEND")
    late = data[:start] + data[end:iend] + data[start:end] + data[iend:]
    assert "exif" not in Image.open(io.BytesIO(late)).info and Image.open(io.BytesIO(late)).getexif()[0x0112] == 6
    header = probe_image(late)
    assert (header.width, header.height, header.rotated) == (5, 3, False)
    header = probe_image(data)
    assert (header.width, header.height, header.rotated) == (3, 5, True)


def test_bytes_per_pixel_by_mode():
    assert [bytes_per_pixel(mode) for mode in ("I;16", "I;16B", "I;16L", "I;16N")] == [12] * 4
    assert [bytes_per_pixel(mode) for mode in ("I", "F")] == [30, 30]
    assert [bytes_per_pixel(mode) for mode in ("RGBA", "LA", "PA", "RGBa", "La")] == [20] * 5
    assert [bytes_per_pixel(mode) for mode in ("RGB", "L", "P", "1", "CMYK")] == [10] * 5
    assert bytes_per_pixel("P", transparency=True) == 20 and bytes_per_pixel("I;16", transparency=True) == 12


def test_too_many_frames_are_refused_from_the_headers():
    frames = [Image.new("RGB", (1, 1), (255 * (i % 2), 0, 0)) for i in range(MAX_FRAMES + 1)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert refusal(probe_image, gif) == ("image_too_large", f"the image has {MAX_FRAMES + 1} frames, the limit is "
                                                            f"{MAX_FRAMES}")
    assert refusal(load_image, gif)[0] == "image_too_large"
    assert probe_image(encode(frames[0], "GIF", save_all=True, append_images=frames[1:-1])).frames == MAX_FRAMES


# ------------------------------------------------------------------------------------------ cut-short uploads


def test_a_jpeg_is_complete_only_with_an_end_marker_after_its_last_scan():
    whole = encode(Image.effect_noise((16, 16), 60).convert("RGB"), "JPEG")
    assert whole.endswith(b"\xff\xd9") and probe_image(whole).format == "JPEG"
    truncated = ("invalid_image", "the JPEG image is truncated (its data ends early)")
    assert refusal(probe_image, whole[:-2]) == truncated
    # an end marker's bytes inside the scan data, before a later scan, do not make it complete
    scan = whole.rindex(b"\xff\xda")
    assert refusal(probe_image, whole[:scan] + b"\xff\xd9" + whole[scan:-2]) == truncated
    assert probe_image(whole + b"\0\0").format == "JPEG"  # padding after the end marker is fine


def test_an_mpo_is_checked_as_a_jpeg():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    mpo = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert probe_image(mpo).format == "MPO"
    assert refusal(probe_image, mpo[:-2]) == ("invalid_image", "the MPO image is truncated (its data ends early)")


def test_png_gif_and_webp_ends():
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    assert refusal(probe_image, png[:-12]) == ("invalid_image", "the PNG image is truncated (its data ends early)")
    gif = encode(Image.new("P", (4, 4)), "GIF")
    assert gif.endswith(b";") and probe_image(gif + b"\0\0\0").format == "GIF"
    assert refusal(probe_image, gif[:-1]) == ("invalid_image", "the GIF image is truncated (its data ends early)")
    # only zero padding may follow the trailer: anything else means the last bytes are not the GIF's end
    assert refusal(probe_image, gif + b"XX") == ("invalid_image", "the GIF image is truncated (its data ends early)")
    webp = encode(Image.effect_noise((32, 32), 60).convert("RGB"), "WEBP")
    assert probe_image(webp).format == "WEBP"
    # Pillow reads a WebP's RIFF length with its headers: one cut short fails there
    assert refusal(probe_image, webp[:-1]) == (
        "invalid_image", "cannot read the image's headers (could not create decoder object)")


def test_formats_without_an_end_to_check_are_left_to_the_decoder():
    for fmt in ("BMP", "PPM", "TIFF"):
        data = encode(Image.new("RGB", (4, 4)), fmt)
        assert probe_image(data).format == fmt


# ------------------------------------------------------------------------------------------------------ budget


def test_the_decode_budget_gives_deep_images_fewer_pixels():
    deep = encode(Image.fromarray(np.zeros((10, 10), np.uint16)), "PNG")  # 12 bytes a pixel to decode
    assert probe_image(deep, 120).pixels == 100
    message = ("decoding this I;16 image of 10x10 pixels needs about 1200 bytes, more than the 1190 an 8-bit RGB "
               "image at the pixel limit needs")
    assert refusal(probe_image, deep, 119) == ("image_too_large", message)
    assert refusal(load_image, deep, 119) == ("image_too_large", message)


def test_the_pixel_limit_holds_at_its_boundary_for_files():
    data = encode(Image.new("RGB", (10, 10)), "PNG")
    assert probe_image(data, 100).pixels == 100 and load_image(data, 100).shape == (10, 10, 3)
    message = "image has 10x10 pixels, more than the limit of 99"
    assert refusal(probe_image, data, 99) == ("image_too_large", message)
    assert refusal(load_image, data, 99) == ("image_too_large", message)
