"""Typed containers passed between the parts of UniPerceiverV2.

Shape shorthand used across up2:
    N  images in a batch            Q  proposal queries (O in the paper)
    D  proposal-network width       d  unified-decoder width
    L  feature levels               S  flattened pixels over all levels (sum of h_l * w_l)
    K  ground-truth instances       Hm, Wm  mask-feature size (stride 4 of the padded image)
    T  token-sequence length        C  candidate targets (class names, vocabulary)

Boxes are normalised (cx, cy, w, h) in [0, 1] relative to the PADDED image
(the `ImageList.tensor` size) unless a name says ``_xyxy`` / pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional, Tuple

import torch

__all__ = [
    "PixelDecoderOutput",
    "ProposalOutput",
    "ProposalTargets",
    "TokenAttention",
    "TokenBatch",
]


@dataclass
class PixelDecoderOutput:
    """What the multi-scale deformable pixel decoder gives the proposal decoder.

    Attributes:
        mask_features: (N, D, Hm, Wm) float, stride-4 per-pixel embeddings for the mask branch.
        memory: (N, S, D) float, encoder output flattened over the L levels (coarse to fine
            order is NOT assumed: use ``spatial_shapes`` / ``level_start_index``).
        spatial_shapes: (L, 2) int64, (h_l, w_l) of each level.
        level_start_index: (L,) int64, offset of each level inside S.
        level_shapes: the same (h_l, w_l) as Python ints, for code that needs them on the host
            (reading ``spatial_shapes`` back would synchronise with a GPU).
        padding_mask: (N, S) bool, True on padded pixels, or None when no image is padded.
        multi_scale_features: L tensors (N, D, h_l, w_l), the encoder output unflattened.
    """

    mask_features: torch.Tensor
    memory: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    level_shapes: Tuple[Tuple[int, int], ...]
    padding_mask: Optional[torch.Tensor]
    multi_scale_features: List[torch.Tensor]


@dataclass
class ProposalTargets:
    """Ground truth of one image for the proposal network (class-agnostic).

    Attributes:
        boxes: (K, 4) float, normalised cxcywh w.r.t. the padded image.
        masks: (K, Hp, Wp) bool at the padded image size, or None for box-only data.
        labels: (K,) int64 contiguous class ids (used by the unified decoder, not by the
            binary proposal network).
    """

    boxes: torch.Tensor
    masks: Optional[torch.Tensor]
    labels: torch.Tensor


@dataclass
class ProposalOutput:
    """General region proposals (paper §4.1) from the last proposal-decoder layer.

    Attributes:
        sem: (N, Q, D) float, q^sem, the decoder's query features.
        boxes: (N, Q, 4) float, q^box, normalised cxcywh w.r.t. the padded image.
        masks: (N, Q, Hm, Wm) float, q^mask logits at stride 4 when given as such (other
            constructors, tests); None from the proposal network, which sets ``mask_embed`` and
            ``mask_features`` instead: ``masks_of`` computes the logits of the proposals read.
        objectness: (N, Q) float, foreground logit of the binary classifier.
        matches: during training, one (pred_idx (M,), tgt_idx (M,)) int64 pair per image from
            the Hungarian matcher on the last layer (the same matching the losses use);
            None at inference.
        mask_embed: (N, Q, D) float mask embeddings (the mask head's output) or None.
        mask_features: (N, D, Hm, Wm) float stride-4 mask features or None.
    """

    sem: torch.Tensor
    boxes: torch.Tensor
    masks: Optional[torch.Tensor]
    objectness: torch.Tensor
    matches: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    mask_embed: Optional[torch.Tensor] = None
    mask_features: Optional[torch.Tensor] = None

    def masks_of(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q^mask (paper §4.1) of the proposals ``index`` (N, R) int64 -> (N, R, Hm, Wm) float
        logits at stride 4; all Q proposals (N, Q, Hm, Wm) when ``index`` is None. Computed as
        the dot product of ``mask_embed`` with ``mask_features`` (only R products) when ``masks``
        is None.

        Raises:
            ValueError: ``index`` not (N, R) int64 with this output's N, or neither ``masks``
                nor both ``mask_embed`` and ``mask_features`` are set.
        """
        n = self.objectness.shape[0]
        if index is not None and (index.dim() != 2 or index.shape[0] != n or index.dtype != torch.int64):
            raise ValueError(f"masks_of: index must be (N={n}, R) int64 proposal indices, got "
                             f"{tuple(index.shape)} {index.dtype}")
        if self.masks is not None:
            if index is None:
                return self.masks
            idx = index[:, :, None, None].expand(-1, -1, *self.masks.shape[2:])
            return torch.gather(self.masks, 1, idx)
        if self.mask_embed is None or self.mask_features is None:
            raise ValueError("ProposalOutput has no masks: set masks, or mask_embed and mask_features")
        emb = self.mask_embed
        if index is not None:
            emb = torch.gather(emb, 1, index[:, :, None].expand(-1, -1, emb.shape[-1]))
        return torch.einsum("nrd,ndhw->nrhw", emb, self.mask_features)


class TokenAttention(Enum):
    """How a token attends (paper §4.3, App. B): to the whole sequence, or only to the tokens
    before it. A token's kind is one of its MoE routing attributes
    (``up2.modeling.token_attributes``), and a batch's kind is its self-attention pattern in g:
    a CAUSAL :class:`TokenBatch` attends bidirectionally within its first ``prefix_length``
    tokens (e.g. the image of a captioning sequence) and causally after them."""

    BIDIRECTIONAL = "bidirectional"
    CAUSAL = "causal"


@dataclass
class TokenBatch:
    """A batch of token sequences for the unified decoder g.

    Attributes:
        tokens: (B, T, d) float.
        padding_mask: (B, T) bool, True on padding.
        attributes: (B, T, A) float, per-token routing attributes for conditional MoE
            (modality, role, attention kind, the task's input modalities); see ``up2.modeling.moe``.
        attention: the batch's attention pattern (:class:`TokenAttention`).
        prefix_length: (B,) int64, the bidirectional prefix of a CAUSAL batch (None = 0;
            ignored for BIDIRECTIONAL).
        segments: named parts of the sequence, name -> slice of the T positions, e.g.
            {"global": slice(0, 50), "regional": slice(50, 150)} for image tokens; g names
            its outputs by them (``up2.modeling.unified_decoder.DecoderOutput``).
        has_padding: what the producer knows on the host about ``padding_mask``: False = no
            position is padding (e.g. image tokens of images that fill the padded batch), which
            lets g attend without a mask (FlashAttention on GPUs); None = unknown (g masks by
            ``padding_mask``). Never derived from ``padding_mask``, which would wait for the device.
    """

    tokens: torch.Tensor
    padding_mask: torch.Tensor
    attributes: Optional[torch.Tensor] = None
    attention: TokenAttention = TokenAttention.BIDIRECTIONAL
    prefix_length: Optional[torch.Tensor] = None
    segments: Dict[str, slice] = field(default_factory=dict)
    has_padding: Optional[bool] = None
