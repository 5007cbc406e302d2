"""Sine position encodings for feature maps and boxes (DETR-style, fixed, no parameters).

Shape shorthand (see ``up2.structures``):
    N  images            H, W  height / width of one feature map (pixels of that level)
    Q  queries / boxes   K     coordinates per item (2 for a point, 4 for a box)
    F  features per coordinate (even)          D  output channels

Encoding of one normalised coordinate ``u`` in [0, 1] with ``F`` features (the
"Attention Is All You Need" sinusoid applied to ``2*pi*u``, as in DETR / DINO):

    a = 2*pi*u,   f_k = temperature ** (2 * floor(k / 2) / F)      for k = 0 .. F-1
    enc[2m]   = sin(a / f_{2m}),   enc[2m+1] = cos(a / f_{2m+1})

so each frequency contributes one sin/cos pair. Several coordinates are encoded
independently and concatenated in the order given.

Used by the pixel decoder (2-D map encoding, Deformable DETR) and by the proposal
decoder / image encoder for the box term of paper Eq. 2 (``PE(q^box)``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["sine_encode", "position_encoding_2d", "box_sine_encoding"]


def sine_encode(coords: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine/cosine features of normalised coordinates (formula in the module docstring).

    Args:
        coords: (..., K) float, normalised coordinates (nominally in [0, 1]; values outside
            are encoded all the same).
        num_feats: F, features per coordinate; a positive even int.
        temperature: base of the geometric frequency ladder (10000 in DETR).

    Returns:
        (..., K * F) tensor in ``coords``' floating dtype (float32 for integer input): the F
        features of coordinate 0, then those of coordinate 1, ...

    Raises:
        ValueError: if ``num_feats`` is not a positive even integer or ``temperature`` <= 0.
    """
    if num_feats <= 0 or num_feats % 2 != 0:
        raise ValueError(f"num_feats must be a positive even integer, got {num_feats}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not coords.is_floating_point():
        coords = coords.float()
    k = torch.arange(num_feats, device=coords.device, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)  # (F,)
    angles = coords.float()[..., None] * (2 * math.pi) / freq  # (..., K, F)
    enc = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1)  # (..., K, F/2, 2)
    return enc.flatten(-3).to(coords.dtype)


def position_encoding_2d(
    padding_mask: Optional[torch.Tensor],
    dim: int,
    shape: Optional[tuple] = None,
    temperature: float = 10000.0,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """2-D sine position encoding of a feature map (DETR / Deformable DETR convention).

    Pixel (row i, col j) of an image whose un-padded part is ``h_v x w_v`` pixels gets the
    normalised coordinates ``y = (i + 0.5) / h_v`` and ``x = (j + 0.5) / w_v`` (padding is at
    the bottom/right, as in detectron2's ``ImageList``); the result is
    ``concat(sine_encode(y, D/2), sine_encode(x, D/2))`` along channels. Padded pixels get
    coordinates beyond 1 (harmless: they are masked out downstream).

    Args:
        padding_mask: (N, H, W) bool, True on padded pixels; or None = no padding (then give
            ``shape``).
        dim: D, output channels; must be divisible by 4.
        shape: (N, H, W), required when ``padding_mask`` is None, ignored otherwise.
        temperature: frequency base (10000).
        device: device of the output when ``padding_mask`` is None (default CPU).

    Returns:
        (N, D, H, W) float32 tensor, stored channels-last (an (N, H, W, D) buffer), so
        ``flatten(2).transpose(1, 2)`` is the (N, H*W, D) token layout without a copy.

    Raises:
        ValueError: bad ``dim``, mask that is not (N, H, W) bool, or neither mask nor shape.
    """
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(f"dim must be a positive multiple of 4, got {dim}")
    if padding_mask is None:
        if shape is None or len(shape) != 3:
            raise ValueError(f"give padding_mask (N, H, W) or shape=(N, H, W); got shape={shape}")
        n, h, w = (int(s) for s in shape)
        rows = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        cols = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        f = dim // 2
        enc = torch.cat((sine_encode(rows[:, None], f, temperature)[None, :, None].expand(n, h, w, f),
                         sine_encode(cols[:, None], f, temperature)[None, None].expand(n, h, w, f)), dim=-1)
        return enc.permute(0, 3, 1, 2)
    if padding_mask.dim() != 3 or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"padding_mask must be a (N, H, W) bool tensor, got {tuple(padding_mask.shape)} {padding_mask.dtype}"
        )
    n, h, w = padding_mask.shape
    valid = ~padding_mask
    h_valid = valid.any(2).sum(1, keepdim=True).clamp(min=1).float()  # (N, 1) un-padded rows
    w_valid = valid.any(1).sum(1, keepdim=True).clamp(min=1).float()  # (N, 1) un-padded columns
    rows = (torch.arange(h, device=valid.device, dtype=torch.float32) + 0.5) / h_valid  # (N, H)
    cols = (torch.arange(w, device=valid.device, dtype=torch.float32) + 0.5) / w_valid  # (N, W)
    # separable: each image's H row and W column encodings, broadcast over the map
    f = dim // 2
    enc = torch.cat((sine_encode(rows[..., None], f, temperature)[:, :, None].expand(n, h, w, f),
                     sine_encode(cols[..., None], f, temperature)[:, None].expand(n, h, w, f)), dim=-1)
    return enc.permute(0, 3, 1, 2)


def box_sine_encoding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine features of normalised boxes: ``PE(q^box)`` of paper Eq. 2 (and DINO's query PE).

    Each of (cx, cy, w, h) gets ``dim / 4`` features (module docstring), concatenated in
    that order.

    Args:
        boxes: (N, Q, 4) float, normalised cxcywh in [0, 1] (any leading dims are accepted).
        dim: D, output features; must be divisible by 8.
        temperature: frequency base (10000).

    Returns:
        (N, Q, D) tensor in ``boxes``' dtype.

    Raises:
        ValueError: if the last dim of ``boxes`` is not 4 or ``dim`` is not a multiple of 8.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (..., 4) normalised cxcywh, got shape {tuple(boxes.shape)}")
    if dim <= 0 or dim % 8 != 0:
        raise ValueError(f"dim must be a positive multiple of 8, got {dim}")
    return sine_encode(boxes, dim // 4, temperature)
