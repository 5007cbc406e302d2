"""Contrastive denoising queries for the binary proposal decoder (DINO §3.3, MaskDINO; paper App. A).

Shape shorthand (see ``up2.structures``):
    N  images            K_i  ground-truth boxes of image i     Km = max_i K_i
    G  denoising groups  T  = 2 * G * Km denoising queries per image
    Q  matching queries  D  decoder width

Layout of the T denoising queries of one image: G groups of 2*Km slots; inside group g,
slots [0, Km) are POSITIVES and slots [Km, 2*Km) are NEGATIVES; slot k (resp. Km + k) is
built from ground-truth box k. Slots k >= K_i of an image with fewer boxes are padding
(never supervised, never attended to).

Noise (DINO): in xyxy, every corner moves by ``u * lambda * (w/2, h/2)`` with a random
sign, ``u ~ U(0, 1)`` for positives and ``u ~ U(1, 2)`` for negatives, then the box is
clipped to [0, 1]. Positives are supervised to their ground-truth box / mask and to
foreground; negatives to background only. Every denoising query has the same content
query: the single (foreground) label embedding of the binary classifier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torchvision.ops import box_convert

__all__ = ["DenoisingQueries", "build_denoising_queries"]


@dataclass
class DenoisingQueries:
    """Denoising part of the decoder input for one batch (prepended to the matching queries).

    Attributes:
        content: (N, T, D) float, content queries (the fg label embedding; zeros on padding).
        boxes: (N, T, 4) float, noised reference boxes, normalised cxcywh in [0, 1].
        attn_mask: (T + Q, T + Q) bool self-attention mask over [denoising, matching]
            queries, True = may NOT attend. Matching queries see no denoising query; a
            denoising query sees its own group and all matching queries.
        padding_mask: (N, T) bool, True on padding slots (no ground-truth box behind them).
        objectness_target: (N, T) float, 1 on positives, 0 on negatives and padding.
        positive_matches: per image, (query_idx (G*K_i,), tgt_idx (G*K_i,)) int64: the
            positive slots and the ground-truth box each one denoises.
        num_groups: G.
        max_boxes: Km.
    """

    content: torch.Tensor
    boxes: torch.Tensor
    attn_mask: torch.Tensor
    padding_mask: torch.Tensor
    objectness_target: torch.Tensor
    positive_matches: List[Tuple[torch.Tensor, torch.Tensor]]
    num_groups: int
    max_boxes: int

    @property
    def num_queries(self) -> int:
        """T, denoising queries per image."""
        return self.content.shape[1]


def build_denoising_queries(
    gt_boxes: Sequence[torch.Tensor],
    *,
    num_dn: int,
    box_noise_scale: float,
    num_matching: int,
    label_embedding: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> Optional[DenoisingQueries]:
    """Make the noised positive / negative queries and their attention mask (DINO CDN).

    Args:
        gt_boxes: N tensors (K_i, 4) float, ground-truth boxes, normalised cxcywh.
        num_dn: target number of denoising queries per image; G = max(1, num_dn // (2 * Km))
            groups of Km positives + Km negatives, so T = 2 * G * Km (about ``num_dn``).
        box_noise_scale: lambda >= 0 (``MODEL.PROPOSAL.DN_BOX_NOISE``).
        num_matching: Q, matching queries that follow the denoising ones in the sequence.
        label_embedding: (D,) float, content query of every denoising query.
        generator: optional RNG for the noise (tests).

    Returns:
        DenoisingQueries, or None when ``num_dn`` <= 0 or no image has a ground-truth box.

    Raises:
        ValueError: if a box tensor is not (K, 4), ``box_noise_scale`` < 0, ``num_matching``
            < 0 or ``label_embedding`` is not 1-D.
    """
    if box_noise_scale < 0:
        raise ValueError(f"box_noise_scale (MODEL.PROPOSAL.DN_BOX_NOISE) must be >= 0, got {box_noise_scale}")
    if num_matching < 0:
        raise ValueError(f"num_matching must be >= 0, got {num_matching}")
    if label_embedding.dim() != 1:
        raise ValueError(f"label_embedding must be (D,), got {tuple(label_embedding.shape)}")
    for i, b in enumerate(gt_boxes):
        if b.dim() != 2 or b.shape[-1] != 4:
            raise ValueError(f"gt_boxes[{i}] must be (K, 4) normalised cxcywh, got {tuple(b.shape)}")
    counts = [int(b.shape[0]) for b in gt_boxes]
    max_k = max(counts, default=0)
    if num_dn <= 0 or max_k == 0:
        return None

    n = len(gt_boxes)
    device, dim = label_embedding.device, label_embedding.shape[0]
    groups = max(1, num_dn // (2 * max_k))
    t = 2 * groups * max_k

    # (N, Km, 4) padded ground truth and (N, Km) validity.
    padded = torch.zeros(n, max_k, 4, device=device)
    valid = torch.zeros(n, max_k, dtype=torch.bool, device=device)
    for i, b in enumerate(gt_boxes):
        padded[i, : counts[i]] = b.to(device=device, dtype=padded.dtype)
        valid[i, : counts[i]] = True

    # Slots as (N, G, 2, Km): axis 2 is positive (0) / negative (1).
    base = padded[:, None, None].expand(n, groups, 2, max_k, 4)
    xyxy = box_convert(base, "cxcywh", "xyxy")
    half_wh = (base[..., 2:] / 2).repeat(1, 1, 1, 1, 2)  # (w/2, h/2, w/2, h/2)
    magnitude = torch.rand(base.shape, device=device, generator=generator)
    magnitude = magnitude + torch.arange(2, device=device, dtype=magnitude.dtype).view(1, 1, 2, 1, 1)
    sign = torch.randint(0, 2, base.shape, device=device, generator=generator).float() * 2 - 1
    noised = (xyxy + sign * magnitude * half_wh * box_noise_scale).clamp(0.0, 1.0)
    boxes = box_convert(noised, "xyxy", "cxcywh").reshape(n, t, 4)

    slot_valid = valid[:, None, None].expand(n, groups, 2, max_k).reshape(n, t)
    is_positive = torch.zeros(groups, 2, max_k, dtype=torch.bool, device=device)
    is_positive[:, 0] = True
    is_positive = is_positive.reshape(t)
    objectness_target = (slot_valid & is_positive[None]).float()
    boxes = boxes * slot_valid[..., None]
    content = label_embedding[None, None].expand(n, t, dim) * slot_valid[..., None].to(label_embedding.dtype)

    # Group g owns [g * 2Km, (g + 1) * 2Km); block attention across groups and dn <- matching.
    group_of = torch.arange(t, device=device) // (2 * max_k)
    attn_mask = torch.zeros(t + num_matching, t + num_matching, dtype=torch.bool, device=device)
    attn_mask[:t, :t] = group_of[:, None] != group_of[None, :]
    attn_mask[t:, :t] = True

    positive_matches = []
    for i in range(n):  # positives of image i: slots g * 2Km + k of every group g, k < K_i
        k_idx = torch.arange(counts[i], device=device)
        q_idx = (torch.arange(groups, device=device)[:, None] * (2 * max_k) + k_idx[None]).flatten()
        positive_matches.append((q_idx, k_idx.repeat(groups)))
    return DenoisingQueries(
        content=content,
        boxes=boxes,
        attn_mask=attn_mask,
        padding_mask=~slot_valid,
        objectness_target=objectness_target,
        positive_matches=positive_matches,
        num_groups=groups,
        max_boxes=max_k,
    )
