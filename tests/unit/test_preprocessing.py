"""The front Service's CPU work: decoding any image a user has, sizing, Canny."""

from __future__ import annotations

import contextlib
import io
import resource
import tracemalloc
from collections.abc import Iterator

import cv2
import numpy as np
import psutil
import pytest
from PIL import Image, ImageDraw, ImageOps

from devtools.harness import decode, encode, shapes_image
from sdxl_controlnet.errors import InvalidRequest
from sdxl_controlnet.front import preprocessing
from sdxl_controlnet.schemas import EdgeParams
from sdxl_controlnet.settings import settings


def test_edges_follow_the_picture_and_flat_areas_have_none() -> None:
    gray = preprocessing.to_grayscale(shapes_image(160, 120))
    edges = preprocessing.canny(gray, 100, 200)
    assert edges.shape == (120, 160) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    # The rectangle's left side is at x=20, rows 30..90: an edge runs down it.
    assert edges[40:80, 18:23].any(axis=1).all()
    # Inside the rectangle and in the white background nothing changes: no edges.
    assert not edges[40:80, 30:70].any()
    assert not edges[100:, :].any()


def test_flat_image_has_no_edges() -> None:
    gray = preprocessing.to_grayscale(Image.new("RGB", (128, 128), (90, 120, 200)))
    assert not preprocessing.canny(gray, 100, 200).any()


def test_lower_thresholds_find_at_least_as_many_edges() -> None:
    noisy = np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)
    gray = preprocessing.to_grayscale(Image.fromarray(noisy).convert("RGB"))
    low = preprocessing.canny(gray, 20, 60).astype(bool).sum()
    high = preprocessing.canny(gray, 200, 250).astype(bool).sum()
    assert low > high


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "CMYK", "F"])
def test_every_image_mode_finds_the_outline(mode: str) -> None:
    edges = preprocessing.canny(preprocessing.to_grayscale(shapes_image(mode=mode)), 100, 200)
    assert edges.shape == (120, 160)
    # Whatever the mode, the rectangle's left side (x=20, rows 30..90) is found.
    assert edges[40:80, 18:23].any(axis=1).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_encoded_formats_decode(fmt: str) -> None:
    image = decode(encode(shapes_image(), fmt))
    edges = preprocessing.canny(preprocessing.to_grayscale(image), 100, 200)
    assert edges.shape == (120, 160) and edges.any()


def test_transparent_areas_draw_no_edges() -> None:
    # Black, fully transparent pixels: visible as nothing, so no edges against the white.
    rgba = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 64, 128))
    assert not preprocessing.canny(preprocessing.to_grayscale(rgba), 100, 200).any()


def test_exif_orientation_is_honoured() -> None:
    image = shapes_image(160, 120)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert preprocessing.to_grayscale(decode(buffer.getvalue())).shape == (160, 120)


def jpeg(image: Image.Image, orientation: int = 1) -> Image.Image:
    """``image`` saved as a JPEG with an EXIF orientation, opened lazily as an upload is."""
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return Image.open(buffer)


def test_large_jpeg_decodes_at_reduced_scale_but_never_below_min_side() -> None:
    gray = preprocessing.to_grayscale(jpeg(shapes_image(4000, 3000)), min_side=1000)
    assert gray.shape == (1500, 2000)  # libjpeg's 1/2 scale: 1/4 of 3000 would be under 1000


@pytest.mark.parametrize("orientation", [1, 6])
def test_output_size_comes_from_the_picture_not_the_reduced_decode(orientation: int) -> None:
    # 3001×2508 snaps to 1120×936; its half-scale decode (1501×1254) would snap to 1120×928.
    edges = preprocessing.edge_map(jpeg(shapes_image(3001, 2508), orientation), EdgeParams())
    assert edges.shape == ((936, 1120) if orientation == 1 else (1120, 936))


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("size", [None, (768, 1024)])
def test_reduced_scale_decode_keeps_the_edges_of_a_full_decode(
    orientation: int, size: tuple[int, int] | None
) -> None:
    params = EdgeParams(width=size and size[0], height=size and size[1])
    fast = preprocessing.edge_map(jpeg(shapes_image(4000, 3000), orientation), params)
    upright = ImageOps.exif_transpose(jpeg(shapes_image(4000, 3000), orientation))
    full = preprocessing.canny(np.asarray(upright.convert("L")), 100, 200, size)
    assert fast.shape == full.shape and fast.any()
    # 99 % of each map's edge pixels lie within a pixel of an edge of the other.
    for edges, other in ((fast, full), (full, fast)):
        near = edges & cv2.dilate(other, np.ones((3, 3), np.uint8))
        assert np.count_nonzero(near) >= 0.99 * np.count_nonzero(edges)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((160, 120), (160, 120)),
        ((1024, 1024), (1024, 1024)),
        ((1027, 771), (1024, 768)),  # snapped down to multiples of 8
        ((4000, 3000), (1176, 880)),  # scaled into the area limit, aspect kept
        ((20, 10), (128, 64)),  # scaled up to the minimum side
    ],
)
def test_snapped_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    width, height = preprocessing.snapped_size(*size)
    assert (width, height) == expected
    assert width % 8 == 0 and height % 8 == 0
    assert width * height <= settings.max_output_pixels


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="aspect ratio"):
        preprocessing.snapped_size(20000, 10)


@pytest.mark.parametrize("mode", ["resize", "crop_and_resize", "resize_and_fill"])
def test_explicit_size_in_every_resize_mode(mode: str) -> None:
    gray = preprocessing.to_grayscale(shapes_image(160, 120))
    edges = preprocessing.canny(gray, 100, 200, (96, 128), mode)
    assert edges.shape == (128, 96) and edges.any()


@contextlib.contextmanager
def address_space_bound(headroom: int = 2**29) -> Iterator[None]:
    """This process may map ``headroom`` more bytes: a regression fails the test with a
    MemoryError instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def traced() -> Iterator[list[int]]:
    """The peak of what NumPy allocated within the block, in the list yielded."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.mark.parametrize("mode", ["resize", "crop_and_resize", "resize_and_fill"])
@pytest.mark.parametrize(("width", "height"), [(1, 16384), (16384, 1), (3, 4096)])
def test_fitting_a_thin_picture_makes_no_array_larger_than_the_output(
    mode: str, width: int, height: int
) -> None:
    # Resized to cover 1024² before it was cropped, a 1×16384 picture made a 16 GiB array.
    thin = np.full((height, width, 3), 255, dtype=np.uint8)
    with address_space_bound(), traced() as peak:
        fitted = preprocessing.fit(thin, (1024, 1024), mode, lambda pixels: pixels)
    assert fitted.shape == (1024, 1024, 3)
    assert peak[0] <= 2 * fitted.nbytes


def test_crop_and_resize_keeps_the_centre_at_the_output_s_aspect_ratio() -> None:
    rows, columns = preprocessing.crop_cover(400, 100, (256, 128))
    assert (rows, columns) == (slice(0, 100), slice(100, 300))
    rows, columns = preprocessing.crop_cover(1, 4096, (1024, 1024))
    assert (rows, columns) == (slice(2047, 2048), slice(0, 1))


def test_resize_and_fill_pads_with_no_edges() -> None:
    gray = preprocessing.to_grayscale(shapes_image(160, 120))
    edges = preprocessing.canny(gray, 100, 200, (160, 240), "resize_and_fill")
    # The 160×120 picture sits centred in 160×240: 60 empty rows above and below.
    assert not edges[:58].any() and not edges[-58:].any()
    assert edges[60:180].any()


def test_oversized_image_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        preprocessing, "settings", settings.model_copy(update={"max_input_pixels": 100 * 100})
    )
    image = Image.open(io.BytesIO(encode(shapes_image(160, 120))))
    with pytest.raises(InvalidRequest, match="at most 10000 pixels"):
        preprocessing.to_grayscale(image)
    assert image._im is None  # no pixel was decoded


def control_picture(width: int = 160, height: int = 120) -> Image.Image:
    """A ready-made control image: white lines on black."""
    picture = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(picture)
    draw.line([(20, 10), (20, 100)], fill=255, width=2)
    draw.rectangle([60, 30, 120, 90], outline=255)
    return picture


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "I;16"])
def test_preprocessor_none_passes_the_control_image_through(mode: str) -> None:
    picture = control_picture()
    sixteen_bit = Image.fromarray(np.asarray(picture).astype(np.uint16) * 257)
    upload = decode(encode(sixteen_bit if mode == "I;16" else picture.convert(mode)))
    control = preprocessing.edge_map(upload, EdgeParams(preprocessor="none"))
    assert control.shape == (120, 160) and control.dtype == np.uint8
    # The very pixels sent: no edge detection, which would turn each line into two.
    assert np.array_equal(control, np.asarray(picture))


def test_preprocessor_none_is_sized_like_any_input() -> None:
    picture = control_picture(161, 121)  # snapped down to multiples of 8
    control = preprocessing.edge_map(decode(encode(picture)), EdgeParams(preprocessor="none"))
    assert control.shape == (120, 160)
    assert control[10:100, 19:22].max() == 255 and control[:5, :].max() == 0

    padded = preprocessing.edge_map(
        decode(encode(control_picture())),
        EdgeParams(preprocessor="none", width=256, height=128, resize_mode="resize_and_fill"),
    )
    assert padded.shape == (128, 256)
    assert not padded[:, :40].any() and not padded[:, -40:].any()  # black padding


def test_preprocessor_none_makes_transparent_areas_black() -> None:
    picture = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # white, but transparent
    ImageDraw.Draw(picture).line([(32, 0), (32, 63)], fill=(255, 255, 255, 255))
    control = preprocessing.edge_map(decode(encode(picture)), EdgeParams(preprocessor="none"))
    assert control[:, 32].min() == 255 and control[:, :30].max() == 0


def test_canny_finds_two_edges_where_none_keeps_one_line() -> None:
    upload = encode(control_picture())
    canny = preprocessing.edge_map(decode(upload), EdgeParams())
    none = preprocessing.edge_map(decode(upload), EdgeParams(preprocessor="none"))
    assert not np.array_equal(canny, none)
    assert none[50, 15:26].astype(bool).sum() == 2  # the 2-pixel line itself


@pytest.mark.parametrize("blur", [0, 4])
def test_inpainting_keeps_every_pixel_the_mask_keeps_and_fades_in_the_repaint(blur: int) -> None:
    rng = np.random.default_rng(0)
    start = rng.integers(0, 256, (64, 96, 3), np.uint8)
    images = rng.integers(0, 256, (2, 64, 96, 3), np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 48:] = 200  # at least half white: repainted
    mask[:, 40:48] = 100  # under half: kept, as diffusers keeps it
    kept = preprocessing.keep_unmasked(images, start, mask, blur)
    assert kept.shape == images.shape and kept.dtype == np.uint8
    for image, generated in zip(kept, images, strict=True):
        # Beyond the fade, on either side: the start's pixels and the repaint's, exactly.
        assert np.array_equal(image[:, : 48 - blur], start[:, : 48 - blur])
        assert np.array_equal(image[:, 48 + blur :], generated[:, 48 + blur :])
        if blur:  # across the edge, a mix of the two: neither one alone
            edge = image[:, 48 - blur : 48 + blur].astype(int)
            assert not np.array_equal(edge, start[:, 48 - blur : 48 + blur])
            assert not np.array_equal(edge, generated[:, 48 - blur : 48 + blur])
            low = np.minimum(start, generated)[:, 48 - blur : 48 + blur]
            high = np.maximum(start, generated)[:, 48 - blur : 48 + blur]
            assert ((low <= edge) & (edge <= high)).all()
