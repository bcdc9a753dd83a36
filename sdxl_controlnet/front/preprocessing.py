"""Image in, control images out: the front Service's CPU work, torch-free.

The one control of a request without ``params.controls`` is one channel, white edges on
black, at the output size: the upload's Canny edges, or with ``preprocessor="none"`` the
upload itself. Each of ``params.controls`` is RGB at the output size: its own image or the
upload, as it is, or its Canny edges, or for tile the picture blurred."""

from __future__ import annotations

import contextlib
import math
import typing as t
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps
from pydantic import WrapValidator
from pydantic_core import PydanticCustomError
from starlette.datastructures import UploadFile

from ..errors import InvalidRequest
from ..schemas import Control, EdgeParams, GPURequest, Params, ResizeMode
from ..settings import settings
from .encoding import encode_image

SIZE_STEP = 8  # SDXL's VAE downsamples x8: both sides must be multiples of 8.


def check_image_size(image: Image.Image) -> Image.Image:
    """Refuse oversized images from the header alone, before any pixel is decoded."""
    width, height = image.size
    if width * height > settings.max_input_pixels:
        raise InvalidRequest(
            f"image is {width}×{height}; at most {settings.max_input_pixels} pixels are accepted"
        )
    return image


def _open(value: t.Any, open_image: t.Callable[[t.Any], Image.Image]) -> Image.Image:
    try:
        image = open_image(value)
    except KeyError:
        # BentoML opens an upload with the Pillow plugin its Content-Type names; one that
        # names no plugin (image/jpg, image/svg+xml) raises KeyError: look at the bytes.
        if not isinstance(value, UploadFile):
            raise
        value.file.seek(0)
        image = Image.open(value.file)
    if not isinstance(image, Image.Image):  # a JSON number, say (references.py takes text)
        raise PydanticCustomError(
            "image_not_a_file",
            "send the image as a file, an https:// URL or a data:image/…;base64, URI",
        )
    return image


def _open_upload(value: t.Any, open_image: t.Callable[[t.Any], Image.Image]) -> Image.Image:
    # Field errors: a 400 naming `image`, like every other field's.
    try:
        return check_image_size(_open(value, open_image))
    except InvalidRequest as exc:
        raise PydanticCustomError("image_too_large", exc.message) from exc
    except Image.UnidentifiedImageError as exc:
        raise PydanticCustomError(
            "image_unreadable", "not a readable image file; send a JPEG, PNG or WebP"
        ) from exc
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PydanticCustomError(
            "image_unreadable", "could not be read: {reason}", {"reason": str(exc)}
        ) from exc


# An uploaded image: BentoML opens it lazily (header only); a file that is not
# an image, or one too large, becomes a 400 before any pixel is decoded.
ImageUpload = t.Annotated[Image.Image, WrapValidator(_open_upload)]


@contextlib.contextmanager
def _decoding(field: str = "image") -> Iterator[None]:
    """Turn what PIL raises for a broken file into the client error it is."""
    try:
        yield
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"{field} could not be decoded: {exc}") from exc


def upright_size(image: Image.Image, field: str = "image") -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5 to 8 turn the picture a quarter."""
    with _decoding(field):
        turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    width, height = image.size
    return (height, width) if turned else (width, height)


def to_grayscale(
    image: Image.Image, min_side: int | None = None, background: str = "white"
) -> np.ndarray:
    """Decode any PIL mode to 8-bit gray, honouring EXIF orientation and
    flattening transparency onto ``background``: white for a picture, so that
    transparent areas draw no edges; black for a control image, where white is an edge.

    A JPEG decodes straight to gray (libjpeg skips the colour planes) and, when
    both sides stay at least ``min_side``, at 1/2, 1/4 or 1/8 scale (libjpeg's
    DCT scaling): a phone photo decodes several times faster. Other formats
    ignore the hint.
    """
    check_image_size(image)
    with _decoding():
        image.draft("L", (min_side, min_side) if min_side else None)
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when upright
        return np.asarray(_flattened(image, background, "L"))


def _transparent(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _flattened(image: Image.Image, background: str, mode: str) -> Image.Image:
    """``image`` in ``mode`` ("L" or "RGB"), any transparency composited onto
    ``background``: pasted through its alpha onto a plain picture of ``mode``, so that no
    RGBA copy is made beside the decoded picture (a 4096² one is 64 MB)."""
    if not _transparent(image):
        return image if image.mode == mode else image.convert(mode)
    with_alpha = image if image.mode in ("RGBA", "LA") else image.convert("RGBA")
    flat = Image.new(mode, image.size, background)
    flat.paste(with_alpha.convert(mode), mask=with_alpha.getchannel("A"))
    return flat


def snapped_size(width: int, height: int) -> tuple[int, int]:
    """The input's size scaled into SDXL's limits, keeping its aspect ratio."""
    scale = min(1.0, math.sqrt(settings.max_output_pixels / (width * height)))
    scale = max(scale, settings.min_output_side / min(width, height))
    size = tuple(
        max(settings.min_output_side, int(side * scale) // SIZE_STEP * SIZE_STEP)
        for side in (width, height)
    )
    if size[0] * size[1] > settings.max_output_pixels:
        raise InvalidRequest(
            f"image aspect ratio {width}:{height} is too extreme to fit "
            f"{settings.max_output_pixels} pixels with sides of at least {settings.min_output_side}"
        )
    return size


def _resize(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < gray.shape[0] * gray.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(gray, (width, height), interpolation=interpolation)


def fit_size(
    width: int, height: int, size: tuple[int, int] | None, resize_mode: ResizeMode
) -> tuple[int, int]:
    """The size a ``width``×``height`` picture is resized to before Canny, never larger
    than the output: ``size`` itself where it is stretched, or cropped first
    (``crop_cover``); where it is fitted inside, the padding then makes it ``size``."""
    if size is None:
        return snapped_size(width, height)
    if resize_mode != "resize_and_fill":
        return size
    scale = min(size[0] / width, size[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def crop_cover(width: int, height: int, size: tuple[int, int]) -> tuple[slice, slice]:
    """The centred part of a ``width``×``height`` picture with ``size``'s aspect ratio, as
    (rows, columns): what ``crop_and_resize`` keeps. Cropped before it is resized, a thin
    picture makes no array larger than itself or the output."""
    crop_w = min(width, max(1, round(height * size[0] / size[1])))
    crop_h = min(height, max(1, round(width * size[1] / size[0])))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return slice(top, top + crop_h), slice(left, left + crop_w)


def sizing(image: Image.Image, params: EdgeParams) -> tuple[tuple[int, int], ResizeMode]:
    """The output size (width, height) for a control image, and how it meets that size:
    as asked, or its own size snapped to SDXL's limits."""
    if params.size:
        return params.size, params.resize_mode
    return snapped_size(*upright_size(image)), "resize"


def _draft_side(
    image: Image.Image, size: tuple[int, int], resize_mode: ResizeMode, field: str = "image"
) -> int:
    """The smallest side a JPEG may decode at. Square, because draft() sees the picture
    before EXIF turns it."""
    return max(fit_size(*upright_size(image, field), size, resize_mode))


def edge_map(image: Image.Image, params: EdgeParams) -> np.ndarray:
    """The control image a request asks for: ``image`` decoded, sized and run through
    Canny, or with ``preprocessor="none"`` decoded and sized only."""
    size, resize_mode = sizing(image, params)
    min_side = _draft_side(image, size, resize_mode)
    if params.preprocessor == "none":
        gray = to_grayscale(image, min_side, background="black")
        return fit(gray, size, resize_mode, lambda pixels: pixels)
    gray = to_grayscale(image, min_side)
    return canny(gray, params.low_threshold, params.high_threshold, size, resize_mode)


def edge_map_png(image: Image.Image, params: EdgeParams) -> bytes:
    """``edge_map`` as a PNG: what ``/canny`` answers."""
    return encode_image(edge_map(image, params), "png")


def canny(
    gray: np.ndarray,
    low_threshold: int,
    high_threshold: int,
    size: tuple[int, int] | None = None,
    resize_mode: ResizeMode = "crop_and_resize",
) -> np.ndarray:
    """Canny edges of ``gray`` at the output ``size`` (width, height), as a
    single-channel uint8 map (0 or 255). Without ``size`` the input's own size
    is snapped to SDXL's limits."""
    return fit(
        gray, size, resize_mode, lambda pixels: cv2.Canny(pixels, low_threshold, high_threshold)
    )


def upright_rgb(image: Image.Image, min_side: int | None, field: str = "image") -> Image.Image:
    """Decoded to RGB, upright, with transparency flattened on white; a JPEG at reduced
    scale where both sides stay at least ``min_side`` (see ``to_grayscale``)."""
    check_image_size(image)
    with _decoding(field):
        image.draft("RGB", (min_side, min_side) if min_side else None)
        ImageOps.exif_transpose(image, in_place=True)
        # Already RGB (a JPEG, or the upload decoded once for two uses): no copy.
        return _flattened(image, "white", "RGB")


def start_picture(
    image: Image.Image, size: tuple[int, int], resize_mode: ResizeMode, field: str = "init_image"
) -> np.ndarray:
    """A picture to start from, as H×W×3 uint8 RGB at ``size``, fitted like the control
    image; padding repeats its border."""
    rgb = np.asarray(upright_rgb(image, _draft_side(image, size, resize_mode, field), field))
    return fit(rgb, size, resize_mode, lambda pixels: pixels, border=cv2.BORDER_REPLICATE)


def repaint_mask(image: Image.Image, size: tuple[int, int], resize_mode: ResizeMode) -> np.ndarray:
    """Where to repaint, as H×W uint8 at ``size``, fitted like the picture it belongs to:
    white (255) repaints, black keeps; an image with transparency gives its alpha."""
    check_image_size(image)
    with _decoding("mask"):
        ImageOps.exif_transpose(image, in_place=True)
        alpha = image.convert("RGBA").getchannel("A") if _transparent(image) else None
        # An alpha channel with no transparent pixel (a canvas's export) says nothing: the
        # mask is painted in white.
        if alpha is not None and alpha.getextrema() != (255, 255):
            gray = np.asarray(alpha)
        else:
            gray = np.asarray(image.convert("L"))
    mask = fit(gray, size, resize_mode, lambda pixels: pixels)
    # diffusers repaints where the mask is at least half white.
    if not (mask >= 128).any():
        raise InvalidRequest(
            "mask: it is all black, so nothing would be repainted; paint white where the "
            "picture should change"
        )
    return mask


def fit(
    gray: np.ndarray,
    size: tuple[int, int] | None,
    resize_mode: ResizeMode,
    detect: t.Callable[[np.ndarray], np.ndarray],
    border: int = cv2.BORDER_CONSTANT,
) -> np.ndarray:
    """``gray`` (or an H×W×3 picture) cropped, resized for ``size`` and run through
    ``detect``, then padded (with black, or as ``border`` says) to exactly ``size``."""
    in_h, in_w = gray.shape[:2]
    if size is not None and resize_mode == "crop_and_resize":
        gray = gray[crop_cover(in_w, in_h, size)]
    fit_w, fit_h = fit_size(in_w, in_h, size, resize_mode)
    edges = detect(_resize(gray, fit_w, fit_h))
    width, height = size or (fit_w, fit_h)
    if (fit_w, fit_h) == (width, height):
        return edges
    # Pad the edges, not the picture: a padded border would itself be an edge.
    top, left = (height - fit_h) // 2, (width - fit_w) // 2
    return cv2.copyMakeBorder(
        edges, top, height - fit_h - top, left, width - fit_w - left, border, value=0
    )


# The tile control: the picture with its detail blurred away, so that the ControlNet keeps
# its composition and colours and the model redraws the detail (a Gaussian sigma, in
# pixels of the output).
TILE_BLUR_SIGMA = 3.0


def control_image(
    picture: Image.Image,
    control: Control,
    params: EdgeParams,
    size: tuple[int, int],
    resize_mode: ResizeMode,
    field: str,
) -> np.ndarray:
    """One of ``params.controls`` as H×W×3 uint8 at ``size``: ``picture`` fitted as
    ``resize_mode`` says, then made as the control's preprocessor says."""
    min_side = _draft_side(picture, size, resize_mode, field)
    if control.made_by == "canny":
        gray = to_grayscale(picture, min_side)
        edges = canny(gray, params.low_threshold, params.high_threshold, size, resize_mode)
        return np.repeat(edges[..., None], 3, axis=2)
    rgb = np.asarray(upright_rgb(picture, min_side, field))
    if control.made_by == "tile":
        return fit(rgb, size, resize_mode, _blurred)
    return fit(rgb, size, resize_mode, lambda pixels: pixels)


def _blurred(rgb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), TILE_BLUR_SIGMA)


def prepare(
    image: Image.Image,
    params: Params,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    control_pictures: list[Image.Image | None] | None = None,
) -> tuple[GPURequest, Params]:
    """What a request sends the GPU Service, and its parameters resolved: the output size,
    the mode and its strength. The start picture is ``init_image``, fitted to the output,
    or for image-to-image and inpainting without one, the uploaded ``image`` itself.
    ``control_pictures`` are the images given for ``params.controls``, None where the upload
    stands in."""
    resolved = params.with_mode(init_image is not None, mask is not None)
    restyle = init_image is None and resolved.mode != "text-to-image"
    if restyle:  # the upload is the start picture too: decoded once, in colour, full size
        image = upright_rgb(image, min_side=None)
    size, resize_mode = sizing(image, params)
    edges: np.ndarray | None = None
    controls: np.ndarray | None = None
    if not params.controls:
        edges = edge_map(image, params)
    else:
        given = control_pictures or [None] * len(params.controls)
        controls = np.stack(
            [
                # A picture of its own meets the output as init_image does.
                control_image(picture, control, params, size, params.resize_mode, field)
                if picture is not None
                else control_image(image, control, params, size, resize_mode, "image")
                for field, control, picture in zip(
                    control_fields(len(given)), params.controls, given, strict=True
                )
            ]
        )
    start: np.ndarray | None = None
    repaint: np.ndarray | None = None
    if resolved.mode != "text-to-image":
        # The start picture and its mask meet the output as the control image did, or as asked.
        fitting = (size, resize_mode if restyle else params.resize_mode)
        start = start_picture(image if restyle else init_image, *fitting)
        repaint = None if mask is None else repaint_mask(mask, *fitting)
    resolved = resolved.model_copy(update={"width": size[0], "height": size[1]})
    request = GPURequest.of(resolved.generation_params(), edges, controls, start, repaint)
    return request, resolved


def keep_unmasked(images: np.ndarray, start: np.ndarray, mask: np.ndarray, blur: int) -> np.ndarray:
    """Inpainted ``images`` (N×H×W×3) with every pixel the mask keeps put back from the
    ``start`` picture, to the byte: the VAE's round trip shifts them all a little. The
    repaint fades in over ``blur`` pixels on each side of the mask's edge."""
    repaint = (mask >= 128).astype(np.float32)  # where diffusers repaints: at least half white
    if blur:
        side = 2 * blur + 1  # the kernel reaches ``blur`` pixels: beyond, the weight stays 0
        repaint = cv2.GaussianBlur(repaint, (side, side), blur / 2)
    # A convex mix of two uint8 pictures: a weight of 0 gives the start's value exactly.
    # In place, on one float copy of the batch: 4 images at 1024² hold 48 MB, not 200.
    mixed = images.astype(np.float32)
    mixed -= start
    mixed *= repaint[None, :, :, None]
    mixed += start
    return np.rint(mixed, out=mixed).astype(np.uint8)


def control_fields(count: int) -> list[str]:
    """How errors name the images of ``params.controls``."""
    return [f"params.controls[{index}].image" for index in range(count)]
