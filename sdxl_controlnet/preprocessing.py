"""Image in, edge map out: the front Service's CPU work, torch-free."""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image, ImageOps

from . import settings
from .errors import InvalidRequest
from .schemas import EdgeParams, ResizeMode, check_image_size

SIZE_STEP = 8  # SDXL's VAE downsamples x8: both sides must be multiples of 8.


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Decode any PIL mode to 8-bit gray, honouring EXIF orientation and
    flattening transparency onto white so transparent areas draw no edges."""
    check_image_size(image)
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        return np.asarray(image.convert("L"))
    except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for broken files
        raise InvalidRequest(f"image could not be decoded: {exc}") from exc


def snapped_size(width: int, height: int) -> tuple[int, int]:
    """The input's size scaled into SDXL's limits, keeping its aspect ratio."""
    scale = min(1.0, math.sqrt(settings.MAX_OUTPUT_PIXELS / (width * height)))
    scale = max(scale, settings.MIN_OUTPUT_SIDE / min(width, height))
    size = tuple(
        max(settings.MIN_OUTPUT_SIDE, int(side * scale) // SIZE_STEP * SIZE_STEP)
        for side in (width, height)
    )
    if size[0] * size[1] > settings.MAX_OUTPUT_PIXELS:
        raise InvalidRequest(
            f"image aspect ratio {width}:{height} is too extreme to fit "
            f"{settings.MAX_OUTPUT_PIXELS} pixels with sides of at least {settings.MIN_OUTPUT_SIDE}"
        )
    return size


def _resize(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < gray.shape[0] * gray.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(gray, (width, height), interpolation=interpolation)


def edge_map(image: Image.Image, params: EdgeParams) -> np.ndarray:
    """The edge map a request asks for: ``image`` decoded, sized and run through Canny."""
    return canny(
        to_grayscale(image),
        params.low_threshold,
        params.high_threshold,
        params.size,
        params.resize_mode,
    )


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
    in_h, in_w = gray.shape
    width, height = size or snapped_size(in_w, in_h)
    if resize_mode == "resize" or size is None:
        return cv2.Canny(_resize(gray, width, height), low_threshold, high_threshold)

    cover = resize_mode == "crop_and_resize"
    scale = (max if cover else min)(width / in_w, height / in_h)
    fit_w, fit_h = max(1, round(in_w * scale)), max(1, round(in_h * scale))
    edges = cv2.Canny(_resize(gray, fit_w, fit_h), low_threshold, high_threshold)
    if cover:
        top, left = (fit_h - height) // 2, (fit_w - width) // 2
        return np.ascontiguousarray(edges[top : top + height, left : left + width])
    # Pad the edges, not the picture: a padded border would itself be an edge.
    top, left = (height - fit_h) // 2, (width - fit_w) // 2
    return cv2.copyMakeBorder(
        edges, top, height - fit_h - top, left, width - fit_w - left, cv2.BORDER_CONSTANT, value=0
    )
