"""Hungarian matching of binary proposals to class-agnostic ground truth (paper App. A; MaskDINO).

Shape shorthand (see ``up2.structures``):
    N  images        Q  queries of one decoder output     K  ground-truth instances of an image
    P  sampled points per mask                            Hm, Wm / Hp, Wp  mask sizes

Cost of assigning query q to instance k (lower is better):

    C = w_obj * C_obj(q) + w_L1 * |b_q - b_k|_1 + w_giou * (-GIoU(b_q, b_k))
        [+ w_mask * BCE_P(m_q, m_k) + w_dice * Dice_P(m_q, m_k)]

with the focal-style objectness cost (Deformable DETR / DINO, only the foreground class,
p = sigmoid(logit)):  C_obj = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p)).
Boxes are normalised cxcywh (GIoU on their xyxy form). Masks of a query and an instance are
compared at the same P uniformly random points of the (normalised) image; the mask terms
are used only for images whose targets carry masks.

This module also holds the point-sampling helpers shared with the criterion (PointRend's
``point_sample`` and uncertainty-based point selection); detectron2's implementation is
used when ``detectron2.projects.point_rend`` imports, an equivalent ``grid_sample`` one
otherwise.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from up2.structures import ProposalTargets
from up2.utils.host_sync import to_device

__all__ = ["HungarianMatcher", "point_sample", "uncertain_point_coords", "mask_cost_bce", "mask_cost_dice"]

logger = logging.getLogger(__name__)

try:
    from detectron2.projects.point_rend.point_features import (
        get_uncertain_point_coords_with_randomness as _d2_uncertain_coords,
    )
    from detectron2.projects.point_rend.point_features import point_sample as _d2_point_sample

    _POINT_PATH = "detectron2.projects.point_rend"
except ImportError:  # e.g. point_rend's package __init__ needs cv2
    _d2_point_sample = None
    _d2_uncertain_coords = None
    _POINT_PATH = "up2 grid_sample fallback"
logger.info("proposal matcher / criterion point sampling: %s", _POINT_PATH)


def point_sample(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps at normalised points (PointRend's ``point_sample``).

    Args:
        masks: (B, C, H, W) float maps.
        coords: (B, P, 2) float, normalised (x, y) in [0, 1] of the map's extent.

    Returns:
        (B, C, P) values (zero padding outside, ``align_corners=False``).
    """
    if _d2_point_sample is not None:
        return _d2_point_sample(masks, coords, align_corners=False)
    out = F.grid_sample(masks, 2.0 * coords[:, :, None, :] - 1.0, align_corners=False)
    return out[..., 0]


def uncertain_point_coords(
    logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> torch.Tensor:
    """PointRend training points: the most uncertain (|logit| smallest) of ``oversample_ratio *
    num_points`` random points, ``importance_sample_ratio`` of them, plus uniform random ones.

    Args:
        logits: (B, 1, H, W) float mask logits.
        num_points: P.  oversample_ratio: >= 1.  importance_sample_ratio: in [0, 1].

    Returns:
        (B, P, 2) float normalised (x, y) in [0, 1].
    """
    def uncertainty(x: torch.Tensor) -> torch.Tensor:
        return -x.abs()

    if _d2_uncertain_coords is not None:
        return _d2_uncertain_coords(logits, uncertainty, num_points, oversample_ratio, importance_sample_ratio)
    b = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(b, num_sampled, 2, device=logits.device, dtype=logits.dtype)
    unc = uncertainty(point_sample(logits, coords))[:, 0]  # (B, num_sampled)
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = unc.topk(num_uncertain, dim=1).indices  # (B, num_uncertain)
    picked = coords.gather(1, idx[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        rand = torch.rand(b, num_random, 2, device=logits.device, dtype=logits.dtype)
        picked = torch.cat((picked, rand), dim=1)
    return picked


def mask_cost_bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pairwise mean sigmoid BCE. pred (Q, P) logits, target (K, P) in {0, 1} -> (Q, K)."""
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    return (pos @ target.T + neg @ (1 - target).T) / pred.shape[1]


def mask_cost_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss ``1 - (2|p t| + 1) / (|p| + |t| + 1)``. pred (Q, P) logits, target (K, P) -> (Q, K)."""
    p = pred.sigmoid()
    numerator = 2 * p @ target.T
    denominator = p.sum(-1)[:, None] + target.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth instances (cost in the module docstring).

    Args:
        cost_objectness, cost_box, cost_giou, cost_mask, cost_dice: weights of the cost terms
            (non-negative; the cfg loss weights OBJECTNESS/BOX/GIOU/MASK/DICE_WEIGHT).
        focal_alpha, focal_gamma: of the objectness cost.
        num_points: P, points at which masks are compared.

    Raises:
        ValueError: a negative weight or ``num_points`` < 1.
    """

    @configurable
    def __init__(
        self,
        *,
        cost_objectness: float = 4.0,
        cost_box: float = 5.0,
        cost_giou: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int = 12544,
    ):
        super().__init__()
        weights = dict(cost_objectness=cost_objectness, cost_box=cost_box, cost_giou=cost_giou,
                       cost_mask=cost_mask, cost_dice=cost_dice)
        for name, w in weights.items():
            if w < 0:
                raise ValueError(f"HungarianMatcher: {name} must be >= 0, got {w}")
        if num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1, got {num_points}")
        self.cost_objectness = cost_objectness
        self.cost_box = cost_box
        self.cost_giou = cost_giou
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg):
        p = cfg.MODEL.PROPOSAL
        return {
            "cost_objectness": p.OBJECTNESS_WEIGHT,
            "cost_box": p.BOX_WEIGHT,
            "cost_giou": p.GIOU_WEIGHT,
            "cost_mask": p.MASK_WEIGHT,
            "cost_dice": p.DICE_WEIGHT,
            "focal_alpha": p.FOCAL_ALPHA,
            "focal_gamma": p.FOCAL_GAMMA,
            "num_points": p.TRAIN_NUM_POINTS,
        }

    def cost_matrix(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        tgt_boxes: torch.Tensor,
        mask_points: Optional[torch.Tensor] = None,
        tgt_mask_points: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Cost of every (query, instance) pair of one image, in float32.

        Args:
            logits: (Q,) objectness logits.  boxes: (Q, 4) normalised cxcywh.
            tgt_boxes: (K, 4) normalised cxcywh.
            mask_points: (Q, P) mask logits at the sampled points, or None (no mask terms).
            tgt_mask_points: (K, P) target mask values in [0, 1] at the same points.

        Returns:
            (Q, K) float32 cost.
        """
        logits, boxes, tgt_boxes = logits.float(), boxes.float(), tgt_boxes.float()
        p = logits.sigmoid()
        a, g = self.focal_alpha, self.focal_gamma
        pos = a * (1 - p) ** g * -F.logsigmoid(logits)
        neg = (1 - a) * p**g * -F.logsigmoid(-logits)
        cost = self.cost_objectness * (pos - neg)[:, None]
        cost = cost + self.cost_box * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        cost = cost - self.cost_giou * giou
        if mask_points is not None:
            mp, tp = mask_points.float(), tgt_mask_points.float()
            cost = cost + self.cost_mask * mask_cost_bce(mp, tp) + self.cost_dice * mask_cost_dice(mp, tp)
        # scipy rejects non-finite costs (e.g. GIoU of two empty boxes): make them merely bad.
        return torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

    @torch.no_grad()
    def forward(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: Sequence[ProposalTargets],
        masks: Optional[torch.Tensor] = None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match each image's queries to its ground truth.

        Args:
            logits: (N, Q) objectness logits.
            boxes: (N, Q, 4) predicted boxes, normalised cxcywh.
            targets: N ProposalTargets (boxes (K, 4) normalised cxcywh; masks (K, Hp, Wp) bool
                or None).
            masks: (N, Q, Hm, Wm) mask logits, or None to match on objectness and boxes only.

        Returns:
            N pairs (pred_idx (M,), tgt_idx (M,)) int64 on ``logits``' device, M = min(Q, K),
            pred_idx sorted ascending; empty tensors for an image without ground truth.

        Raises:
            ValueError: if ``targets`` does not hold N entries or the shapes disagree.
        """
        return self.match_stages([(logits, boxes, masks)], targets)[0]

    @torch.no_grad()
    def match_stages(
        self,
        stages: Sequence[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
        targets: Sequence[ProposalTargets],
    ) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`forward` for several decoder stages at once, with one copy of all cost matrices
        to the host (the Hungarian algorithm runs there, in scipy) and one non-blocking copy of
        all assignments back: the only host synchronisation of matching.

        Args:
            stages: per stage (logits (N, Q), boxes (N, Q, 4), masks (N, Q, Hm, Wm) or None), as
                :meth:`forward` takes them.
            targets: N ProposalTargets, shared by the stages.

        Returns:
            per stage, :meth:`forward`'s N (pred_idx, tgt_idx) pairs.

        Raises:
            ValueError: if ``targets`` does not hold N entries or the shapes disagree.
        """
        costs, blocks = [], []  # blocks: (stage, image, Q, K) of each cost matrix in ``costs``
        for s, (logits, boxes, masks) in enumerate(stages):
            n, q = logits.shape
            if len(targets) != n:
                raise ValueError(f"HungarianMatcher: got {len(targets)} targets for {n} images")
            if boxes.shape != (n, q, 4):
                raise ValueError(f"HungarianMatcher: boxes must be (N={n}, Q={q}, 4), got {tuple(boxes.shape)}")
            with torch.autocast(device_type=logits.device.type, enabled=False):
                for i, tgt in enumerate(targets):
                    k = tgt.boxes.shape[0]
                    if k == 0:
                        continue
                    mp = tp = None
                    if masks is not None and tgt.masks is not None:
                        coords = torch.rand(1, self.num_points, 2, device=logits.device)
                        mp = point_sample(masks[i][None].float(), coords)[0]  # (Q, P)
                        tp = point_sample(tgt.masks[None].to(coords), coords)[0]  # (K, P)
                    cost = self.cost_matrix(logits[i], boxes[i], tgt.boxes.to(boxes.device), mp, tp)
                    costs.append(cost.float().flatten())
                    blocks.append((s, i, q, k))
        device = stages[0][0].device
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        out = [[(empty, empty.clone()) for _ in targets] for _ in stages]
        if not costs:
            return out
        host = torch.cat(costs).cpu().numpy()  # the one device -> host copy
        assignments, offset = [], 0
        for _, _, q, k in blocks:
            rows, cols = linear_sum_assignment(host[offset:offset + q * k].reshape(q, k))
            assignments += [rows, cols]
            offset += q * k
        flat = to_device(np.concatenate(assignments).astype(np.int64), device)  # the one host -> device copy
        parts = flat.split([len(a) for a in assignments])
        for j, (s, i, _, _) in enumerate(blocks):
            out[s][i] = (parts[2 * j], parts[2 * j + 1])
        return out
