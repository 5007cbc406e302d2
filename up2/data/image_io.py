"""Robust image reading: any PIL mode, EXIF orientation, clear errors.

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

Very large images (PIL's decompression-bomb guard, ``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5
megapixels by default): beyond the limit PIL warns, beyond twice the limit it refuses to decode.
:func:`read_image` follows PIL's warning with one naming the file, its size and the limit (both
``PIL.Image.DecompressionBombWarning``), and raises :class:`ImageTooLargeError` naming them. To
accept larger trusted images, set ``PIL.Image.MAX_IMAGE_PIXELS`` in Python, or the environment variable
``UP2_MAX_IMAGE_PIXELS`` (a positive int, or ``none`` for no limit), which sets it when
``up2.data.image_io`` is first imported (so also in data-loader workers started afterwards).

Size checks (:func:`check_image_size`): a record's ``height``/``width`` must be those of the image
as displayed (EXIF orientation applied, as COCO annotations are). When they are swapped, the error
says whether the file carries an EXIF rotation (the usual cause: the annotation was made on the
stored, unrotated pixels).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Mapping, Optional, Tuple, Union

import numpy as np
from detectron2.data.detection_utils import SizeMismatchError
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = [
    "read_image",
    "to_rgb_array",
    "check_image_size",
    "exif_orientation",
    "apply_max_image_pixels_from_env",
    "ImageTooLargeError",
    "SUPPORTED_FORMATS",
    "MAX_IMAGE_PIXELS_ENV",
]

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("RGB", "BGR")
MAX_IMAGE_PIXELS_ENV = "UP2_MAX_IMAGE_PIXELS"
_WHITE = (255, 255, 255)
# EXIF orientations whose transposition swaps width and height (90/270 degree rotations).
_SWAPPING_ORIENTATIONS = {5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
                          8: "rotated 90 degrees counter-clockwise"}


class ImageTooLargeError(ValueError, Image.DecompressionBombError):
    """An image beyond twice ``PIL.Image.MAX_IMAGE_PIXELS``; the message names the file, its size
    and the limit. Also a ``PIL.Image.DecompressionBombError``, so PIL-style handlers still catch it."""


def apply_max_image_pixels_from_env() -> Optional[int]:
    """Set ``PIL.Image.MAX_IMAGE_PIXELS`` from ``$UP2_MAX_IMAGE_PIXELS`` when that is set.

    Called once when this module is imported. Accepted values: a positive int (pixels), or
    ``none`` (any case) for no limit. An unset or empty variable leaves PIL's limit alone.

    Returns:
        the limit now in force (``PIL.Image.MAX_IMAGE_PIXELS``; None = no limit).
    Raises:
        ValueError: any other value (names the variable and the value).
    """
    raw = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if raw:
        if raw.lower() == "none":
            limit = None
        else:
            try:
                limit = int(raw)
            except ValueError:
                limit = 0
            if limit <= 0:
                raise ValueError(
                    f"${MAX_IMAGE_PIXELS_ENV}={raw!r}: expected a positive number of pixels or 'none' (no limit)"
                )
        Image.MAX_IMAGE_PIXELS = limit
        logger.info(f"PIL.Image.MAX_IMAGE_PIXELS = {limit} (from ${MAX_IMAGE_PIXELS_ENV})")
    return Image.MAX_IMAGE_PIXELS


def _raise_limit_hint() -> str:
    return (f"if the file is trusted, raise the limit: set the environment variable {MAX_IMAGE_PIXELS_ENV}=<pixels> "
            f"(or 'none' for no limit) before starting, or PIL.Image.MAX_IMAGE_PIXELS = <pixels> in Python")


def _too_large(path: str, error: Image.DecompressionBombError) -> ImageTooLargeError:
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1))} pixels" if found else "an unknown number of pixels"
    return ImageTooLargeError(
        f"image {path} is too large to decode: {pixels}, more than twice PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS} (PIL refuses such images as possible decompression bombs); "
        f"{_raise_limit_hint()}. PIL said: {error}"
    )


def _warn_if_large(path: str, size: Tuple[int, int]) -> None:
    """PIL's warning for an image beyond MAX_IMAGE_PIXELS (and within twice it), naming the file."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > limit:
        warnings.warn(
            f"image {path} has {width} x {height} = {width * height} pixels (W x H), more than "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}; PIL decodes it but refuses images beyond {2 * limit} "
            f"pixels as possible decompression bombs; {_raise_limit_hint()}",
            Image.DecompressionBombWarning,
            stacklevel=3,
        )


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
        ImageTooLargeError (a ValueError): more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` pixels
            (names the path, the pixel count, the limit and how to raise it).
    Warns:
        PIL.Image.DecompressionBombWarning: more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels
            (after PIL's own warning, one naming the path, W x H and the limit).
    """
    _check_format(format)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    what = f"image {path}"
    # PIL's DecompressionBombWarning does not name the file; ours follows it. (Silencing PIL's with
    # warnings.catch_warnings per image would reset every "show once" warning registry each time.)
    try:
        with Image.open(path) as image:
            size = image.size
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _pil_to_rgb(image, what)
    except Image.DecompressionBombError as e:
        raise _too_large(path, e) from e
    except Image.DecompressionBombWarning as e:  # warnings turned into errors (-W error)
        raise Image.DecompressionBombWarning(f"image {path}: {e} ({_raise_limit_hint()})") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e
    _warn_if_large(path, size)
    return _finish(rgb, format)


def exif_orientation(path: Union[str, os.PathLike]) -> Optional[int]:
    """The EXIF orientation tag (1..8; 1 = as stored) of an image file, without decoding pixels.

    Returns:
        the tag, 1 when the file has none, or None when the file's header cannot be read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(os.fspath(path)) as image:
                return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (UnidentifiedImageError, OSError, ValueError, TypeError, Image.DecompressionBombError):
        return None


def check_image_size(record: Mapping, image_hw: Tuple[int, int], file_name: Optional[str] = None) -> None:
    """Check a record's ``height``/``width`` (those present) against the image as read.

    Args:
        record: a dataset record; ``height`` / ``width`` are optional.
        image_hw: (H, W) of the image as returned by :func:`read_image` (EXIF orientation applied).
        file_name: the image file; default ``record["file_name"]``.
    Raises:
        detectron2.data.detection_utils.SizeMismatchError (a ValueError): a size differs. The message
            names the file and both sizes, and, when width and height are swapped, the file's EXIF
            orientation (the likely cause) or that it has none.
    """
    file_name = record.get("file_name") if file_name is None else file_name
    height, width = int(image_hw[0]), int(image_hw[1])
    rec_h, rec_w = record.get("height"), record.get("width")
    if (rec_h is None or rec_h == height) and (rec_w is None or rec_w == width):
        return
    said = ", ".join(f"{k}={v!r}" for k, v in (("height", rec_h), ("width", rec_w)) if v is not None)
    msg = (f"image {file_name}: the record says {said} but the image as read (EXIF orientation applied) has "
           f"height {height}, width {width} pixels")
    if rec_h == width and rec_w == height:
        orientation = exif_orientation(file_name) if file_name is not None else None
        if orientation in _SWAPPING_ORIENTATIONS:
            msg += (f". Width and height are swapped: the file has EXIF orientation {orientation} "
                    f"({_SWAPPING_ORIENTATIONS[orientation]}), which read_image applies, so the record's size is "
                    f"likely that of the stored, unrotated pixels. Set the record's height/width to the displayed "
                    f"size {height} x {width} (H x W) and check that its annotations refer to the displayed image, "
                    f"or re-save the image with the rotation applied and the EXIF orientation removed")
        else:
            tag = "unreadable" if orientation is None else f"orientation {orientation}, no 90-degree rotation"
            msg += (f". Width and height are swapped, the usual sign of an EXIF-rotated photo, but this file's "
                    f"EXIF tag is {tag}: check the record")
    raise SizeMismatchError(msg)


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


apply_max_image_pixels_from_env()
