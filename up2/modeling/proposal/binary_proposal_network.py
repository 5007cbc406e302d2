"""The binary (foreground/background) region-proposal network of f_image (paper §4.1, App. A).

Shape shorthand (see ``up2.structures``):
    N  images        Q  proposals (O in the paper)      D  width
    K  ground-truth instances of an image               Hp, Wp  padded image size (pixels)
    Hm, Wm  mask-feature size (stride 4)                C_f, h_f, w_f  backbone feature f

MaskDINO with every multi-class classifier replaced by one foreground logit: a deformable
pixel decoder encodes the backbone features, the proposal decoder selects and refines Q
queries, and each proposal carries (q^sem, q^box, q^mask, objectness). In training, the
criterion Hungarian-matches proposals to class-agnostic ground truth and returns the
proposal losses; the last layer's matches are handed on so that the unified decoder can
supervise the same proposals with class names (paper §4.3).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from up2.modeling.proposal.criterion import ProposalCriterion
from up2.modeling.proposal.decoder import ProposalDecoder
from up2.modeling.proposal.pixel_decoder import MSDeformAttnPixelDecoder
from up2.structures import ProposalOutput, ProposalTargets
from up2.utils.host_sync import device_assert

__all__ = ["BinaryProposalNetwork"]


class BinaryProposalNetwork(nn.Module):
    """Pixel decoder + proposal decoder + matcher/criterion (module docstring).

    Args:
        pixel_decoder: module mapping (features, padding_mask) to ``PixelDecoderOutput``.
        decoder: the ProposalDecoder.
        criterion: the ProposalCriterion (holds the matcher).
    """

    @configurable
    def __init__(self, *, pixel_decoder: nn.Module, decoder: ProposalDecoder, criterion: ProposalCriterion):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.criterion = criterion

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        """Build from ``cfg.MODEL.PROPOSAL``; ``input_shape`` is the backbone's output_shape()."""
        return {
            "pixel_decoder": MSDeformAttnPixelDecoder(cfg, input_shape),
            "decoder": ProposalDecoder(cfg),
            "criterion": ProposalCriterion(cfg),
        }

    @property
    def loss_keys(self) -> List[str]:
        """Keys of the loss dict returned in training (fixed for a given configuration)."""
        return self.criterion.loss_keys()

    @staticmethod
    def _check_targets(targets: Sequence[ProposalTargets], n: int, device: torch.device) -> List[ProposalTargets]:
        if len(targets) != n:
            raise ValueError(f"BinaryProposalNetwork: got {len(targets)} targets for {n} images")
        checked = []
        for i, t in enumerate(targets):
            if t.boxes.dim() != 2 or t.boxes.shape[-1] != 4:
                raise ValueError(f"targets[{i}].boxes must be (K, 4) normalised cxcywh, got {tuple(t.boxes.shape)}")
            k = t.boxes.shape[0]
            if k:
                device_assert((t.boxes >= 0) & (t.boxes <= 1),
                              f"targets[{i}].boxes must be normalised cxcywh in [0, 1] w.r.t. the padded image")
            masks = t.masks
            if masks is not None:
                if masks.dim() != 3 or masks.shape[0] != k:
                    raise ValueError(f"targets[{i}].masks must be (K={k}, Hp, Wp) at the padded size, got "
                                     f"{tuple(masks.shape)}")
                masks = masks.to(device=device, dtype=torch.bool)
            checked.append(ProposalTargets(boxes=t.boxes.to(device=device, dtype=torch.float32), masks=masks,
                                           labels=t.labels))
        return checked

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        targets: Optional[Sequence[ProposalTargets]] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[ProposalOutput, Dict[str, torch.Tensor]]:
        """Propose regions (and compute proposal losses when targets are given).

        Args:
            features: backbone features, name -> (N, C_f, h_f, w_f) float (must hold
                ``MODEL.PROPOSAL.IN_FEATURES`` and ``MASK_IN_FEATURE``).
            targets: N ProposalTargets (boxes (K, 4) normalised cxcywh w.r.t. the padded
                image; masks (K, Hp, Wp) bool at the padded size or None), or None at inference.
                Denoising queries are used only when the module is in training mode.
            padding_mask: (N, Hp, Wp) bool, True on padded pixels, or None.

        Returns:
            (ProposalOutput, losses): the last decoder layer's Q proposals (sem (N, Q, D),
            boxes (N, Q, 4) normalised cxcywh, objectness (N, Q) logits, masks as mask embeddings
            (N, Q, D) and mask features (N, D, Hm, Wm): ``ProposalOutput.masks_of(index)``
            computes the logits of the proposals read; matches per image when targets are
            given, else None) and the weighted losses keyed as ``loss_keys`` (``{}`` without
            targets).

        Raises:
            ValueError: malformed targets (shape, range, count) or features (see the parts).
        """
        enc = self.pixel_decoder(features, padding_mask)
        n = enc.memory.shape[0]
        if targets is not None:
            targets = self._check_targets(targets, n, enc.memory.device)
        out = self.decoder(enc, [t.boxes for t in targets] if targets is not None else None)
        last = out.layers[-1]
        proposals = ProposalOutput(sem=out.query_features, boxes=last.boxes, masks=None, objectness=last.objectness,
                                   mask_embed=last.mask_embed, mask_features=last.mask_features)
        if targets is None:
            return proposals, {}
        losses, matches = self.criterion(out, targets)
        proposals.matches = matches
        return proposals, losses
