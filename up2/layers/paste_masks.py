"""Binary instance masks at image size from stride-4 mask logits (paper §4.3: a localization
task's masks are its proposals' own; MaskDINO-style bilinear upsampling, then ``> 0``).

The masks are defined by ``F.interpolate`` (bilinear, ``align_corners=False``): upsample the
(Hm, Wm) logits of the padded image to its (Hp, Wp) pixels, crop the (h, w) resized image,
resize bilinearly to the original (out_h, out_w) when that differs, threshold at 0. Two paths:

* ``compiled``: ``torch.ops.up2_masks.paste_positive`` (``csrc/paste_masks_cpu.cpp``, built by
  ``python -m up2.layers.build_kernels paste_masks``; see ``paste_masks_library``). Each resize is a separable linear
  map; its taps are read off ``F.interpolate`` itself (so they are PyTorch's own weights), the
  two resizes are composed, and the kernel writes the thresholded mask without ever holding a
  float image of the output size. Same masks up to float rounding: a pixel whose logit is
  within ~1e-6 of 0 may flip. CPU only.
* ``pytorch``: ``F.interpolate`` on ``chunk`` masks at a time, then ``> 0`` (the reference).

Which path runs: ``paste_masks(compiled=True | False)`` when the caller says; else the
environment variable ``UP2_PASTE_PATH`` = ``pytorch`` | ``compiled`` | ``auto`` (default: the
kernel for CPU tensors when it is built), so the model's post-processing can be switched to the
reference without code changes (as ``UP2_MSDA_PATH`` does for deformable attention).

At 800x1067, 100 masks, 2 threads (a shared, busy machine): ~260 ms on the PyTorch path, ~110 ms
compiled; at a 480x640 original size ~245 vs ~75 ms.
"""
from __future__ import annotations

import functools
import numbers
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .paste_masks_library import PASTE_LIBRARY, compiled_paste_available

__all__ = ["paste_masks", "compiled_paste_available", "resize_taps", "PASTE_PATH_ENV"]

PASTE_PATH_ENV = "UP2_PASTE_PATH"
_PATHS = ("auto", "pytorch", "compiled")


def _interp_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float64: the weights ``F.interpolate(bilinear, align_corners=False)``
    gives each input pixel along one axis, read off by resizing one-hot rows."""
    eye = torch.eye(in_size, dtype=torch.float32)[None, :, :, None]  # channel c = one-hot at pixel c
    return F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=False)[0, :, :, 0].t().double()


@functools.lru_cache(maxsize=64)  # a few image sizes repeat; callers must not modify the result
def resize_taps(in_size: int, padded: int, size: int, out: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Taps of one axis of the paste: resize ``in_size`` -> ``padded``, keep the first ``size``,
    then resize to ``out`` (None: no second resize); all sizes in pixels of that axis.

    Returns:
        index (out, T) int64 input pixels and weight (out, T) float32, T = the most non-zero
        weights of any output pixel (2 for one bilinear resize, up to 4 for two); unused taps
        have weight 0. Cached per arguments: do not modify them.

    Raises:
        ValueError: a non-positive size, or ``size`` > ``padded``.
    """
    if not (0 < size <= padded and in_size > 0 and (out is None or out > 0)):
        raise ValueError(f"resize_taps: need 0 < size <= padded, in_size > 0, out > 0; got in_size={in_size}, "
                         f"padded={padded}, size={size}, out={out}")
    matrix = _interp_matrix(in_size, padded)[:size]  # (size, in_size)
    if out is not None:
        matrix = _interp_matrix(size, out) @ matrix  # (out, in_size), composed in float64
    taps = max(int((matrix != 0).sum(1).max()), 1)
    index = matrix.abs().topk(taps, dim=1).indices
    return index, matrix.gather(1, index).float()


def _use_compiled(device: torch.device, compiled: Optional[bool]) -> bool:
    """Whether the compiled kernel pastes tensors on ``device``: ``compiled`` when given, else
    ``UP2_PASTE_PATH`` (module docstring).

    Raises:
        ValueError: ``UP2_PASTE_PATH`` not one of auto / pytorch / compiled.
        RuntimeError: the compiled path is asked for (argument or environment) where the kernel
            is not built or the tensors are not on the CPU.
    """
    if compiled is None:
        forced = os.environ.get(PASTE_PATH_ENV, "auto").strip().lower() or "auto"
        if forced not in _PATHS:
            raise ValueError(f"{PASTE_PATH_ENV} must be one of {', '.join(_PATHS)}, "
                             f"got {os.environ.get(PASTE_PATH_ENV)!r}")
        if forced == "auto":
            return device.type == "cpu" and compiled_paste_available()
        compiled = forced == "compiled"
    if compiled and not (device.type == "cpu" and compiled_paste_available()):
        raise RuntimeError("paste_masks: the compiled kernel needs CPU tensors and the built library "
                           f"({PASTE_LIBRARY.build_command}); {PASTE_PATH_ENV}=pytorch or compiled=False "
                           "uses F.interpolate")
    return bool(compiled)


def _is_int(v) -> bool:
    """A Python or numpy integer (not a bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_pair(pair) -> bool:
    """Two positive ints (``_is_int``): a tuple, list, torch.Size or numpy array of 2."""
    try:
        values = list(pair)
    except TypeError:
        return False
    return len(values) == 2 and all(_is_int(v) and v > 0 for v in values)


def paste_masks(logits: torch.Tensor, size: Tuple[int, int], padded: Tuple[int, int], out: Tuple[int, int],
                chunk: int = 4, compiled: Optional[bool] = None) -> torch.Tensor:
    """Binary masks at the original image size.

    Args:
        logits: (K, Hm, Wm) mask logits of the padded image (any float dtype; stride 4).
        size: (h, w) resized image inside the padding, pixels.  padded: (Hp, Wp) padded size,
            pixels.  out: (out_h, out_w) original image size, pixels.
        chunk: masks resized at a time on the PyTorch path (bounds its float32 temporaries to
            ``chunk`` padded images; the result does not depend on it).
        compiled: True = the compiled kernel (raises if unavailable), False = PyTorch, None =
            as ``UP2_PASTE_PATH`` says (default: the kernel for CPU tensors when it is built,
            else PyTorch).

    Returns:
        (K, out_h, out_w) bool: bilinear upsampling to (Hp, Wp), crop to (h, w), bilinear
        resize to ``out`` (skipped when ``out == size``: the identity), then ``> 0``.

    Non-finite logits: NaN gives False on both paths; a +/-inf logit may differ between them
    (``F.interpolate`` multiplies it by zero weights into NaN; the kernel skips zero taps).

    Raises:
        ValueError: ``chunk`` not an int >= 1, logits not (K, Hm, Wm) float, ``size`` /
            ``padded`` / ``out`` not two positive ints, ``size`` larger than ``padded``, or a
            ``UP2_PASTE_PATH`` other than auto / pytorch / compiled.
        RuntimeError: the compiled path asked for (``compiled=True`` or ``UP2_PASTE_PATH=compiled``)
            where the kernel is unavailable or the tensors are not on the CPU.
    """
    if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"paste_masks: chunk must be an int >= 1, got {chunk!r}")
    if logits.dim() != 3 or not logits.is_floating_point() or logits.shape[1] < 1 or logits.shape[2] < 1:
        raise ValueError(f"paste_masks: logits must be (K, Hm, Wm) float with Hm, Wm >= 1, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    for name, pair in (("size", size), ("padded", padded), ("out", out)):
        if not _is_pair(pair):
            raise ValueError(f"paste_masks: {name} must be two positive ints (height, width), got {pair!r}")
    (h, w), (Hp, Wp), out = (int(v) for v in size), (int(v) for v in padded), tuple(int(v) for v in out)
    if not (h <= Hp and w <= Wp):
        raise ValueError(f"paste_masks: size {tuple(size)} must fit in the padded size {tuple(padded)}")
    if _use_compiled(logits.device, compiled):
        second = out != (h, w)
        ri, rw = resize_taps(logits.shape[1], Hp, h, out[0] if second else None)
        ci, cw = resize_taps(logits.shape[2], Wp, w, out[1] if second else None)
        return torch.ops.up2_masks.paste_positive(logits.float().contiguous(), ri, rw, ci, cw)
    result = torch.empty(logits.shape[0], *out, dtype=torch.bool, device=logits.device)
    for a in range(0, logits.shape[0], chunk):
        m = F.interpolate(logits[None, a : a + chunk].float(), size=(Hp, Wp), mode="bilinear", align_corners=False)
        m = m[:, :, :h, :w]
        if out != (h, w):
            m = F.interpolate(m, size=out, mode="bilinear", align_corners=False)
        torch.gt(m[0], 0, out=result[a : a + chunk])
    return result
