"""Geometry of two-stage query selection (paper §4.1, App. A; DINO / MaskDINO): the anchor box
each encoder pixel proposes, and the boxes of the selected queries' masks that re-initialise the
reference boxes (MaskDINO's mask-enhanced box initialisation).

Shape shorthand: N images, S encoder pixels over all L levels, Q selected queries,
Hm, Wm mask-feature size (stride 4). Boxes are normalised cxcywh w.r.t. the padded image.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torchvision.ops import box_convert

from up2.structures import PixelDecoderOutput

__all__ = ["pixel_anchors", "boxes_from_mask_embed"]


def pixel_anchors(enc: PixelDecoderOutput) -> Tuple[torch.Tensor, torch.Tensor]:
    """The anchor box of every encoder pixel: centred on the pixel, of side ``0.05 * 2**r``
    (r = 0 for the finest level, +1 per coarser level).

    Args:
        enc: the pixel decoder's output (memory (N, S, D), spatial_shapes (L, 2) int64,
            padding_mask (N, S) bool or None).

    Returns:
        anchors (N, S, 4) float32 normalised cxcywh; valid (N, S) bool: un-padded pixels whose
        anchor lies inside (0.01, 0.99).
    """
    n, s, _ = enc.memory.shape
    shapes = enc.level_shapes
    by_area = sorted(range(len(shapes)), key=lambda lvl: -shapes[lvl][0] * shapes[lvl][1])  # stable
    rank = [by_area.index(lvl) for lvl in range(len(shapes))]  # 0 = finest
    device, anchors = enc.memory.device, []
    for (h, w), r in zip(shapes, rank):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        side = torch.full_like(gx, 0.05 * 2.0**r)
        anchors.append(torch.stack((gx, gy, side, side), dim=-1).reshape(-1, 4))
    anchors = torch.cat(anchors, 0)[None].expand(n, s, 4)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1)
    if enc.padding_mask is not None:
        valid = valid & ~enc.padding_mask
    return anchors, valid


def boxes_from_mask_embed(mask_embed: torch.Tensor, mask_features: torch.Tensor, fallback: torch.Tensor,
                          chunk: int = 32) -> torch.Tensor:
    """Normalised cxcywh bounding boxes of the masks ``mask_embed · mask_features > 0``;
    ``fallback`` where a mask is empty (MaskDINO's mask-initialised reference boxes).

    The logits are computed ``chunk`` queries at a time, each reduced to the rows and columns
    holding a positive logit (a row holds one iff its maximum is > 0), so the (N, Q, Hm, Wm)
    logits are never held: at 800x1067 they are a 65 MB buffer the allocator would map fresh on
    every call, where 32-query pieces stay in cache (docs/inference_rewrites.md: "mask boxes in
    pieces"). Read detached: the boxes carry no gradient. With a NaN logit the maximum of its
    row and column is NaN, so both count as empty.

    Args:
        mask_embed: (N, Q, D) float.  mask_features: (N, D, Hm, Wm) float, any memory layout.
        fallback: (N, Q, 4) normalised cxcywh.  chunk: queries per piece, an int >= 1.

    Returns:
        (N, Q, 4) in ``fallback``'s dtype, in [0, 1]; a box covers whole mask pixels
        (x2 = (last column + 1) / Wm).

    Raises:
        ValueError: ``chunk`` < 1 or mismatched N / D.
    """
    n, q, d = mask_embed.shape
    if chunk < 1:
        raise ValueError(f"boxes_from_mask_embed: chunk must be >= 1, got {chunk}")
    if mask_features.dim() != 4 or mask_features.shape[:2] != (n, d):
        raise ValueError(f"boxes_from_mask_embed: mask_features must be (N={n}, D={d}, Hm, Wm), got "
                         f"{tuple(mask_features.shape)}")
    h, w = mask_features.shape[-2:]
    feats = mask_features.detach().flatten(2)  # (N, D, Hm*Wm)
    embed = mask_embed.detach()
    rows = torch.empty(n, q, h, dtype=torch.bool, device=embed.device)  # rows / columns holding a pixel
    cols = torch.empty(n, q, w, dtype=torch.bool, device=embed.device)
    for a in range(0, q, chunk):
        logits = torch.bmm(embed[:, a : a + chunk], feats).view(n, -1, h, w)
        torch.gt(logits.amax(3), 0, out=rows[:, a : a + chunk])
        torch.gt(logits.amax(2), 0, out=cols[:, a : a + chunk])

    def first_last(hit: torch.Tensor):
        size = hit.shape[-1]
        first = hit.to(torch.uint8).argmax(-1)  # the first maximum: the first True
        last = size - 1 - hit.flip(-1).to(torch.uint8).argmax(-1)
        return first, last

    (y1, y2), (x1, x2) = first_last(rows), first_last(cols)
    xyxy = torch.stack((x1, y1, x2 + 1, y2 + 1), dim=-1).to(fallback.dtype)
    xyxy = xyxy / xyxy.new_tensor([w, h, w, h])
    boxes = box_convert(xyxy, "xyxy", "cxcywh")
    return torch.where(cols.any(-1, keepdim=True), boxes, fallback)
