"""Losses of the binary proposal network (paper §4.1, App. A; MaskDINO / DINO set losses).

Shape shorthand (see ``up2.structures``):
    N  images      Q  matching queries      T  denoising queries      K  ground-truth instances
    M  matched (query, instance) pairs over the batch                 P  sampled mask points

For every supervised stage (the query-selection ``interm`` prediction, the prediction on the
initial queries and after each decoder layer) the queries are Hungarian-matched to the ground
truth, and

    objectness: sigmoid focal loss, target 1 on matched queries, 0 elsewhere, summed / K_tot
    box:        L1 on normalised cxcywh, summed over matches / K_tot
    giou:       1 - GIoU, summed over matches / K_tot
    mask, dice: sigmoid BCE (mean over P points) and dice over matches / K_masks, the P points
                chosen by PointRend's uncertainty sampling on the predicted mask

K_tot (K_masks) is the number of ground-truth instances (with masks) in the batch, averaged over
ranks and clamped to >= 1. Denoising queries have known targets (no matching): positives are
supervised like matched queries, negatives only as background; normalised by the number of
positive denoising queries. Every loss is multiplied by its weight.

Loss keys (fixed by ``num_stages``, ``with_masks``, ``with_denoising``, ``deep_supervision`` so
that every rank returns the same keys, even for images without ground truth):
    loss_{name}           last decoder layer        loss_{name}_interm    query selection
    loss_{name}_{j}       decoder stage j < last (0 = initial queries), if deep supervision
    loss_{name}_dn[_{j}]  the same for the denoising queries, if ``with_denoising``
with name in (objectness, box, giou[, mask, dice]).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from up2.modeling.proposal.predictions import ProposalDecoderOutput, ProposalPredictions
from up2.modeling.proposal.matcher import HungarianMatcher, point_sample, uncertain_point_coords
from up2.structures import ProposalTargets
from up2.utils.host_sync import to_device

__all__ = ["ProposalCriterion", "giou_loss"]

Matches = List[Tuple[torch.Tensor, torch.Tensor]]


def _dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask dice loss: logits, targets (M, P) -> (M,)."""
    p = logits.sigmoid()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``1 - GIoU`` of paired boxes (Rezatofighi et al. 2019), computed with clamps only (no
    boolean-mask indexing, hence no host synchronisation; torchvision's loss indexes with masks).

    Args:
        boxes1, boxes2: (M, 4) float xyxy boxes with x2 >= x1, y2 >= y1.
        eps: added to the union and the enclosing area.

    Returns:
        (M,) float loss in [0, 2].
    """
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = area1 + area2 - inter
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return 1 - inter / (union + eps) + (hull - union) / (hull + eps)


class ProposalCriterion(nn.Module):
    """Matching + weighted losses of every supervised stage (module docstring).

    Args:
        matcher: the Hungarian matcher.
        num_stages: decoder stages with predictions (``DEC_LAYERS + 1``).
        objectness_weight, box_weight, giou_weight, mask_weight, dice_weight: loss weights.
        focal_alpha, focal_gamma: of the objectness focal loss.
        num_points, oversample_ratio, importance_sample_ratio: mask point sampling.
        with_masks: emit (and compute) mask/dice losses.
        with_denoising: emit denoising losses (zeros when a batch has no denoising queries).
        deep_supervision: supervise every decoder stage, not only the last (``interm`` always).

    Raises:
        ValueError: ``num_stages`` < 1 or ``num_points`` < 1.
    """

    @configurable
    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        num_stages: int,
        objectness_weight: float = 4.0,
        box_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        with_masks: bool = True,
        with_denoising: bool = True,
        deep_supervision: bool = True,
    ):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"ProposalCriterion: num_stages must be >= 1, got {num_stages}")
        if num_points < 1:
            raise ValueError(f"ProposalCriterion: num_points must be >= 1, got {num_points}")
        self.matcher = matcher
        self.num_stages = num_stages
        self.weights = {"objectness": objectness_weight, "box": box_weight, "giou": giou_weight,
                        "mask": mask_weight, "dice": dice_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.with_masks = with_masks
        self.with_denoising = with_denoising
        self.deep_supervision = deep_supervision

    @classmethod
    def from_config(cls, cfg, with_masks: bool = True):
        p = cfg.MODEL.PROPOSAL
        return {
            "matcher": HungarianMatcher(cfg),
            "num_stages": p.DEC_LAYERS + 1,
            "objectness_weight": p.OBJECTNESS_WEIGHT,
            "box_weight": p.BOX_WEIGHT,
            "giou_weight": p.GIOU_WEIGHT,
            "mask_weight": p.MASK_WEIGHT,
            "dice_weight": p.DICE_WEIGHT,
            "focal_alpha": p.FOCAL_ALPHA,
            "focal_gamma": p.FOCAL_GAMMA,
            "num_points": p.TRAIN_NUM_POINTS,
            "oversample_ratio": p.OVERSAMPLE_RATIO,
            "importance_sample_ratio": p.IMPORTANCE_SAMPLE_RATIO,
            "with_masks": with_masks,
            "with_denoising": p.DN_NUM > 0,
            "deep_supervision": p.DEEP_SUPERVISION,
        }

    @property
    def loss_names(self) -> Tuple[str, ...]:
        return ("objectness", "box", "giou") + (("mask", "dice") if self.with_masks else ())

    def _stage_suffixes(self) -> List[Tuple[int, str]]:
        """(stage index, key suffix) of the supervised decoder stages."""
        last = self.num_stages - 1
        stages = range(self.num_stages) if self.deep_supervision else [last]
        return [(j, "" if j == last else f"_{j}") for j in stages]

    def loss_keys(self) -> List[str]:
        """All keys ``forward`` returns, in order."""
        suffixes = ["_interm"] + [s for _, s in self._stage_suffixes()]
        if self.with_denoising:
            suffixes += ["_dn" + s for _, s in self._stage_suffixes()]
        return [f"loss_{name}{s}" for s in suffixes for name in self.loss_names]

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _normaliser(counts: List[float], device: torch.device) -> torch.Tensor:
        """Counts averaged over ranks, each clamped to >= 1: (len(counts),) float."""
        t = to_device(counts, device, torch.float32)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(t)
            t = t / comm.get_world_size()
        return t.clamp(min=1.0)

    def _stage_losses(
        self,
        pred: ProposalPredictions,
        targets: Sequence[ProposalTargets],
        matches: Matches,
        obj_target: torch.Tensor,
        obj_valid: Optional[torch.Tensor],
        num_boxes: torch.Tensor,
        num_masks: torch.Tensor,
        masks: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Unweighted losses of one stage.

        Args:
            pred: the stage's predictions (N, X, ...).  targets: N ProposalTargets.
            masks: (N, X, Hm, Wm) the stage's mask logits when already computed, else None
                (computed here from ``pred`` when the criterion has mask losses).
            matches: N (query_idx, tgt_idx) pairs supervised towards boxes / masks.
            obj_target: (N, X) float objectness targets.  obj_valid: (N, X) bool or None (all).
            num_boxes, num_masks: () float normalisers.
        """
        logits = pred.objectness.float()
        focal = sigmoid_focal_loss(logits, obj_target, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                   reduction="none")
        if obj_valid is not None:
            focal = focal * obj_valid
        losses = {"objectness": focal.sum() / num_boxes}

        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
        query_idx = torch.cat([q for q, _ in matches])
        src_boxes = pred.boxes[batch_idx, query_idx].float()
        tgt_boxes = torch.cat([t.boxes[k].to(src_boxes) for t, (_, k) in zip(targets, matches)])
        if src_boxes.numel():
            losses["box"] = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
            losses["giou"] = giou_loss(box_convert(src_boxes, "cxcywh", "xyxy"),
                                       box_convert(tgt_boxes, "cxcywh", "xyxy")).sum() / num_boxes
        else:  # zero, but attached to the graph
            losses["box"] = losses["giou"] = pred.boxes.sum() * 0.0

        if self.with_masks:
            masks = pred.mask_logits() if masks is None else masks
            losses.update(self._mask_losses(masks, targets, matches, num_masks))
        return losses

    def _mask_losses(self, masks: torch.Tensor, targets: Sequence[ProposalTargets], matches: Matches,
                     num_masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """BCE + dice on uncertainty-sampled points for matches whose image has masks."""
        per_image = [(i, q, k) for i, (t, (q, k)) in enumerate(zip(targets, matches))
                     if t.masks is not None and q.numel()]
        if not per_image:
            zero = masks.sum() * 0.0
            return {"mask": zero, "dice": zero}
        src = torch.cat([masks[i, q] for i, q, _ in per_image]).float()[:, None]  # (M, 1, Hm, Wm)
        with torch.no_grad():
            coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio)  # (M, P, 2)
            sizes = [q.numel() for _, q, _ in per_image]
            tgt_points = torch.cat([
                point_sample(targets[i].masks[k][:, None].to(src), c)[:, 0]
                for (i, _, k), c in zip(per_image, coords.split(sizes))
            ])  # (M, P)
        src_points = point_sample(src, coords)[:, 0]
        bce = F.binary_cross_entropy_with_logits(src_points, tgt_points, reduction="none").mean(1)
        return {"mask": bce.sum() / num_masks, "dice": _dice_loss(src_points, tgt_points).sum() / num_masks}

    def _matched_losses(self, preds, targets, num_boxes, num_masks) -> List[Tuple[Dict[str, torch.Tensor], Matches]]:
        """(losses, matches) of each of ``preds`` (ProposalPredictions of the matched stages),
        matched together (one host round trip, ``HungarianMatcher.match_stages``)."""
        masks = [pred.mask_logits() if self.with_masks else None for pred in preds]  # once for matcher and losses
        all_matches = self.matcher.match_stages(
            [(pred.objectness, pred.boxes, m) for pred, m in zip(preds, masks)], targets)
        out = []
        for pred, m, matches in zip(preds, masks, all_matches):
            obj_target = torch.zeros_like(pred.objectness, dtype=torch.float32)
            for i, (q, _) in enumerate(matches):
                obj_target[i, q] = 1.0
            out.append((self._stage_losses(pred, targets, matches, obj_target, None, num_boxes, num_masks, m),
                        matches))
        return out

    # ------------------------------------------------------------------ forward
    def forward(
        self, outputs: ProposalDecoderOutput, targets: Sequence[ProposalTargets]
    ) -> Tuple[Dict[str, torch.Tensor], Matches]:
        """Compute all losses.

        Args:
            outputs: the decoder's output (``len(outputs.layers)`` must equal ``num_stages``).
            targets: N ProposalTargets (boxes (K, 4) normalised cxcywh, masks (K, Hp, Wp) bool or None).

        Returns:
            (losses, matches): weighted scalar losses keyed as in ``loss_keys()``; the last
            stage's N (pred_idx, tgt_idx) int64 matches.

        Raises:
            ValueError: wrong number of stages or targets.
        """
        if len(outputs.layers) != self.num_stages:
            raise ValueError(f"ProposalCriterion: got {len(outputs.layers)} decoder stages, built for "
                             f"{self.num_stages} (DEC_LAYERS + 1)")
        n = outputs.query_features.shape[0]
        if len(targets) != n:
            raise ValueError(f"ProposalCriterion: got {len(targets)} targets for {n} images")
        device = outputs.query_features.device
        dn = outputs.denoising
        num_dn_pos = sum(q.numel() for q, _ in dn.positive_matches) if dn is not None else 0
        num_dn_pos_masks = 0 if dn is None else sum(
            q.numel() for t, (q, _) in zip(targets, dn.positive_matches) if t.masks is not None)
        norm = self._normaliser([
            sum(t.boxes.shape[0] for t in targets),
            sum(t.boxes.shape[0] for t in targets if t.masks is not None),
            num_dn_pos,
            num_dn_pos_masks,
        ], device)

        raw: Dict[str, Dict[str, torch.Tensor]] = {}
        stages = self._stage_suffixes()
        matched = self._matched_losses([outputs.interm] + [outputs.layers[j] for j, _ in stages], targets,
                                       norm[0], norm[1])
        raw["_interm"] = matched[0][0]
        last_matches: Matches = []
        for (j, suffix), (stage_losses, matches) in zip(stages, matched[1:]):
            raw[suffix] = stage_losses
            if j == self.num_stages - 1:
                last_matches = matches
        if self.with_denoising:
            for j, suffix in self._stage_suffixes():
                if dn is None:
                    zero = outputs.layers[j].objectness.sum() * 0.0
                    raw["_dn" + suffix] = {name: zero for name in self.loss_names}
                else:
                    raw["_dn" + suffix] = self._stage_losses(
                        outputs.dn_layers[j], targets, dn.positive_matches, dn.objectness_target,
                        ~dn.padding_mask, norm[2], norm[3])
        losses = {f"loss_{name}{suffix}": self.weights[name] * value
                  for suffix, group in raw.items() for name, value in group.items()}
        return losses, last_matches
