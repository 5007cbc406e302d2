"""Robust image reading: any PIL mode, EXIF orientation, clear errors (DESIGN §8).

Shape shorthand: H, W image height / width in pixels. Every function returns a
``(H, W, 3) uint8`` numpy array whose channels are in the requested ``format``
("RGB" or "BGR", the detectron2 ``cfg.INPUT.FORMAT`` convention).

Mode handling (the same for files and in-memory PIL images):
    1, L, P, RGB, RGBX, CMYK, YCbCr  converted by PIL to RGB.
    LA, PA, RGBA, RGBa, P/L with a transparency entry
                                    alpha-composited onto a WHITE background.
    I;16 / I;16B / I;16L            16-bit: value // 257 maps 0..65535 onto 0..255.
    I (int32)                       treated as 16-bit (clipped to 0..65535, // 257) when its maximum
                                    exceeds 255, otherwise taken as 8-bit values.
    F (float32)                     values in [0, 1] are scaled by 255 when the maximum is <= 1,
                                    otherwise clipped to 0..255.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["read_image", "to_rgb_array", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("RGB", "BGR")
_WHITE = (255, 255, 255)


def _check_format(format: str) -> None:
    if format not in SUPPORTED_FORMATS:
        raise ValueError(f"image format must be one of {SUPPORTED_FORMATS}, got {format!r}")


def _scale_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """Map a (H, W[, C]) integer/float/bool array to uint8 (see the module docstring)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{what}: float image contains NaN or inf values")
        scale = 255.0 if float(arr.max()) <= 1.0 else 1.0
        return np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == np.uint16 or int(arr.max()) > 255:
            return (np.clip(arr.astype(np.int64), 0, 65535) // 257).astype(np.uint8)
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise ValueError(f"{what}: unsupported array dtype {arr.dtype}; expected uint8, uint16, bool or float")


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colour + (H, W) uint8 alpha -> (H, W, 3) uint8 over white."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pil_to_rgb(image: Image.Image, what: str) -> np.ndarray:
    """Any-mode PIL image -> (H, W, 3) uint8 RGB. Raises ValueError for modes PIL cannot convert."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(image)
        if arr.ndim != 2:
            raise ValueError(f"{what}: mode {mode} image has unexpected array shape {arr.shape}")
        gray = _scale_to_uint8(arr, what)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("LA", "PA", "RGBA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    try:
        if has_alpha:
            rgba = np.asarray(image.convert("RGBA"))
            return _composite_on_white(rgba[:, :, :3], rgba[:, :, 3])
        if mode == "RGB":
            return np.asarray(image)
        return np.asarray(image.convert("RGB"))
    except ValueError as e:  # e.g. "conversion from LAB to RGB not supported"
        raise ValueError(f"{what}: cannot convert image mode {mode!r} to RGB ({e})") from e


def _finish(rgb: np.ndarray, format: str) -> np.ndarray:
    if format == "BGR":
        rgb = rgb[:, :, ::-1]
    return np.array(rgb, dtype=np.uint8, order="C")  # always a fresh, writable array


def read_image(path: Union[str, os.PathLike], format: str = "RGB") -> np.ndarray:
    """Read an image file of any PIL mode as a (H, W, 3) uint8 array in ``format``.

    EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so (H, W) are those of
    the image as displayed, which is what COCO annotations refer to. Alpha is composited
    onto white; 16-bit images are scaled to 8 bit (module docstring).

    Args:
        path: a local file path.
        format: "RGB" or "BGR", the channel order of the result.
    Returns:
        (H, W, 3) uint8 C-contiguous array.
    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is not a readable image (corrupt, truncated, unknown format) or its
            mode cannot be converted, or ``format`` is not RGB/BGR; the message names the path.
    """
    _check_format(format)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    what = f"image {path}"
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _pil_to_rgb(image, what)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e
    return _finish(rgb, format)


def to_rgb_array(image: Union[Image.Image, np.ndarray], format: str = "RGB", input_format: str = "BGR") -> np.ndarray:
    """Convert an in-memory image to a (H, W, 3) uint8 array in ``format``.

    Args:
        image: a PIL image of any mode (EXIF orientation applied, as in :func:`read_image`), or a
            numpy array of shape (H, W) grayscale, (H, W, 1), (H, W, 3) colour or (H, W, 4)
            colour + alpha. Array dtypes: uint8; uint16 (16-bit, // 257); bool; float with values
            in [0, 1] (scaled by 255) or [0, 255].
        format: "RGB" or "BGR", the channel order of the result.
        input_format: "RGB" or "BGR", the channel order of a 3/4-channel numpy input (the
            detectron2/OpenCV convention is BGR). Ignored for PIL images and grayscale arrays.
    Returns:
        (H, W, 3) uint8 C-contiguous array (a new array; the input is never modified).
    Raises:
        TypeError: ``image`` is neither a PIL image nor a numpy array.
        ValueError: bad shape (not 2-D or 3-D with 1/3/4 channels, or an empty side), bad dtype,
            non-finite floats, or an unknown ``format`` / ``input_format``.
    """
    _check_format(format)
    _check_format(input_format)
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        return _finish(_pil_to_rgb(image, "PIL image"), format)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL.Image.Image or numpy.ndarray, got {type(image).__name__}")
    arr = image
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image array has an empty side: shape {arr.shape}")
    arr = _scale_to_uint8(arr, "image array")
    if arr.ndim == 2:
        return _finish(np.repeat(arr[:, :, None], 3, axis=2), format)
    color = arr[:, :, :3]
    if input_format == "BGR":
        color = color[:, :, ::-1]
    if arr.shape[2] == 4:
        color = _composite_on_white(color, arr[:, :, 3])
    return _finish(color, format)
