"""f_image: an image as global + regional tokens for the unified decoder (paper §4.1, Eq. 1-3).

Shape shorthand: N images, C channels of F_L, h x w the size of F_L, D proposal width,
d unified-decoder width, Q proposals, R regional tokens kept (R <= Q), M' attention poolings,
Hm x Wm the mask-logit size (stride 4).

Token order of one image: ``AttnPool_1..M'(F_L) ++ Flatten(F_L) ++ R regional tokens``
(the unified decoder adds ``[SPE]`` in front). Global tokens carry a 2-D sine position
embedding; every token kind carries a learned type embedding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from up2.modeling.proposal.position_encoding import box_sine_encoding, position_encoding_2d
from up2.structures import ProposalOutput, TokenBatch

__all__ = ["ImageEncoder", "ImageTokens", "gather_proposals", "select_regional_proposals", "GLOBAL_SEGMENT",
           "REGIONAL_SEGMENT"]

# names of the token batch's segments (paper Eq. 1): global tokens, then regional tokens
GLOBAL_SEGMENT, REGIONAL_SEGMENT = "global", "regional"

# token kinds (rows of the type embedding)
ATTN_POOL, GLOBAL, REGIONAL = 0, 1, 2


@dataclass
class ImageTokens:
    """Output of :class:`ImageEncoder`.

    Attributes:
        batch: TokenBatch with tokens (N, M' + h*w + R, d), its padding mask and the segments
            "global" (the M' + h*w global tokens) and "regional" (the R regional tokens).
        regional_start: index of the first regional token inside the sequence (without [SPE]).
        regional_index: (N, R) int64, which proposal (0..Q-1) each regional token comes from.
        regional_masks: (N, R, Hm, Wm) float mask logits of those proposals (set by
            ``ImageEncoder``; None from other constructors: ``ProposalOutput.masks_of`` gives them).
    """

    batch: TokenBatch
    regional_start: int
    regional_index: torch.Tensor
    regional_masks: Optional[torch.Tensor] = None


def select_regional_proposals(
    objectness: torch.Tensor,
    num_tokens: int,
    matches: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> torch.Tensor:
    """Pick the R proposals that become regional tokens: the highest foreground logits,
    with every matched proposal forced in during training (so each ground-truth object
    gets a class loss).

    Args:
        objectness: (N, Q) float foreground logits.
        num_tokens: R; clipped to Q.
        matches: per image (pred_idx (M,), tgt_idx (M,)) from the proposal matcher, or None.

    Returns:
        (N, R) int64 proposal indices, sorted by descending priority.
    """
    score = objectness.detach().float().clone()
    if matches is not None:
        for i, (pred_idx, _) in enumerate(matches):
            score[i, pred_idx.to(score.device)] = float("inf")
    r = min(num_tokens, score.shape[1])
    return score.topk(r, dim=1).indices


def gather_proposals(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a per-proposal tensor: t (N, Q, *rest), index (N, R) int64 -> (N, R, *rest)."""
    idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return torch.gather(t, 1, idx)


class AttentionPool(nn.Module):
    """M' learned queries attending over the flattened F_L (CLIP-style attention pooling, [27]).

    Input (N, h*w, d) with padding mask (N, h*w) bool; output (N, M', d).
    """

    def __init__(self, embed_dim: int, num_queries: int, num_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)

    def no_weight_decay(self) -> Set[str]:
        """The learned queries are embeddings: not decayed (``up2.solver.weight_decay``)."""
        return {"queries"}

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        q = self.queries.to(tokens.dtype)[None].expand(tokens.shape[0], -1, -1)
        return self.attn(q, tokens, tokens, key_padding_mask=padding_mask, need_weights=False)[0]


class ImageEncoder(nn.Module):
    """Builds image tokens from the last backbone feature and the proposals (Eq. 1-3)."""

    @configurable
    def __init__(
        self,
        *,
        global_channels: int,
        global_stride: int,
        proposal_dim: int,
        embed_dim: int,
        num_attn_pools: int,
        num_regional_tokens: int,
        mask_pool_size: int,
        num_heads: int,
    ):
        """
        Args:
            global_channels: C of F_L. global_stride: stride of F_L in pixels (for padding).
            proposal_dim: D of q^sem. embed_dim: d. num_attn_pools: M' (>= 0).
            num_regional_tokens: R (>= 1; more than Q keeps all Q). ``from_config`` reads 0 in
                ``MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS`` as Q (all proposals).
            mask_pool_size: side of the pooled mask (paper: 28).
            num_heads: heads of the attention poolings.

        Raises:
            ValueError: ``num_regional_tokens`` < 1 or ``num_attn_pools`` < 0 (``from_config``:
                ``NUM_REGIONAL_TOKENS`` < 0, or a ``GLOBAL_FEATURE`` the backbone does not output).
        """
        super().__init__()
        if num_regional_tokens < 1:
            raise ValueError(f"IMAGE_ENCODER.NUM_REGIONAL_TOKENS must be >= 1, got {num_regional_tokens}")
        if num_attn_pools < 0:
            raise ValueError(f"IMAGE_ENCODER.NUM_ATTN_POOLS must be >= 0, got {num_attn_pools}")
        self.embed_dim = embed_dim
        self.global_stride = global_stride
        self.num_regional_tokens = num_regional_tokens
        self.mask_pool_size = mask_pool_size
        self.global_proj = nn.Conv2d(global_channels, embed_dim, kernel_size=1)
        self.attn_pool = AttentionPool(embed_dim, num_attn_pools, num_heads) if num_attn_pools else None
        self.sem_proj = nn.Linear(proposal_dim, embed_dim)
        self.box_pe_dim = proposal_dim - proposal_dim % 8 or 8
        self.box_proj = nn.Linear(self.box_pe_dim, embed_dim)  # B(q^box), Eq. 2
        self.mask_proj = nn.Linear(mask_pool_size * mask_pool_size, embed_dim)  # M(q^mask), Eq. 2
        self.type_embed = nn.Embedding(3, embed_dim)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ie = cfg.MODEL.IMAGE_ENCODER
        if ie.GLOBAL_FEATURE not in input_shape:
            raise ValueError(
                f"MODEL.IMAGE_ENCODER.GLOBAL_FEATURE={ie.GLOBAL_FEATURE!r} is not a backbone output "
                f"(outputs: {sorted(input_shape)})"
            )
        spec = input_shape[ie.GLOBAL_FEATURE]
        if ie.NUM_REGIONAL_TOKENS < 0:
            raise ValueError(f"MODEL.IMAGE_ENCODER.NUM_REGIONAL_TOKENS must be >= 0 (0 = all "
                             f"MODEL.PROPOSAL.NUM_QUERIES proposals), got {ie.NUM_REGIONAL_TOKENS}")
        return {
            "global_channels": spec.channels,
            "global_stride": spec.stride,
            "proposal_dim": cfg.MODEL.PROPOSAL.HIDDEN_DIM,
            "embed_dim": cfg.MODEL.UNIFIED_DECODER.EMBED_DIM,
            "num_attn_pools": ie.NUM_ATTN_POOLS,
            # 0: every one of the O proposals is a regional token (paper §4.1 Eq. 1, §4.3)
            "num_regional_tokens": ie.NUM_REGIONAL_TOKENS or cfg.MODEL.PROPOSAL.NUM_QUERIES,
            "mask_pool_size": ie.MASK_POOL_SIZE,
            "num_heads": cfg.MODEL.UNIFIED_DECODER.NUM_HEADS,
        }

    def global_tokens(self, feature: torch.Tensor, image_sizes: List[Tuple[int, int]]):
        """Eq. 3. feature: (N, C, h, w); image_sizes: un-padded (H, W) pixels per image.

        Returns tokens (N, M' + h*w, d) and padding mask (N, M' + h*w) bool (True on cells
        that lie wholly in the padding)."""
        N, _, h, w = feature.shape
        x = self.global_proj(feature)  # (N, d, h, w)
        pad = torch.ones(N, h, w, dtype=torch.bool, device=x.device)
        for i, size in enumerate(image_sizes):
            hv, wv = self._valid_cells(size)
            pad[i, :hv, :wv] = False
        pos = position_encoding_2d(pad, self.embed_dim - self.embed_dim % 4 or 4)
        if pos.shape[1] != self.embed_dim:
            pos = F.pad(pos, (0, 0, 0, 0, 0, self.embed_dim - pos.shape[1]))
        x = (x + pos.to(x.dtype)).flatten(2).transpose(1, 2)  # (N, h*w, d)
        x = x + self.type_embed.weight[GLOBAL].to(x.dtype)
        pad = pad.flatten(1)
        if self.attn_pool is None:
            return x, pad
        pooled = self.attn_pool(x, pad) + self.type_embed.weight[ATTN_POOL].to(x.dtype)
        pooled_pad = torch.zeros(N, pooled.shape[1], dtype=torch.bool, device=x.device)
        return torch.cat([pooled, x], dim=1), torch.cat([pooled_pad, pad], dim=1)

    def _valid_cells(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """Rows and columns of global-token cells that hold some of an (H, W) image."""
        H, W = image_size
        return max(1, -(-H // self.global_stride)), max(1, -(-W // self.global_stride))

    def regional_tokens(self, proposals: ProposalOutput, index: torch.Tensor, masks: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
        """Eq. 2 for the selected proposals.

        Args:
            proposals: sem (N, Q, D), boxes (N, Q, 4) cxcywh, and masks (see ``ProposalOutput.masks_of``).
            index: (N, R) int64 proposal indices.
            masks: (N, R, Hm, Wm) mask logits of those proposals when already computed, else None.

        Returns:
            (N, R, d): Linear(q^sem) + Linear(PE(q^box)) + Linear(AvgPool_28x28(sigmoid(q^mask))).
        """
        sem, boxes = (gather_proposals(t, index) for t in (proposals.sem, proposals.boxes))
        if masks is None:
            masks = proposals.masks_of(index)
        N, R = index.shape
        pooled = F.adaptive_avg_pool2d(masks.sigmoid().flatten(0, 1)[:, None], self.mask_pool_size)
        pooled = pooled.view(N, R, -1)
        box_pe = box_sine_encoding(boxes, self.box_pe_dim)
        x = self.sem_proj(sem) + self.box_proj(box_pe.to(sem.dtype)) + self.mask_proj(pooled.to(sem.dtype))
        return x + self.type_embed.weight[REGIONAL].to(x.dtype)

    def forward(
        self,
        feature: torch.Tensor,
        image_sizes: List[Tuple[int, int]],
        proposals: ProposalOutput,
    ) -> ImageTokens:
        """Eq. 1: ``Concat(global tokens, regional tokens)``.

        Args:
            feature: (N, C, h, w) F_L. image_sizes: (H, W) pixels per image before padding.
            proposals: the proposal network output (``matches`` set in training).

        Returns:
            ImageTokens (see its docstring).
        """
        g_tokens, g_pad = self.global_tokens(feature, image_sizes)
        index = select_regional_proposals(proposals.objectness, self.num_regional_tokens, proposals.matches)
        masks = proposals.masks_of(index)  # (N, R, Hm, Wm): R mask products from the mask embeddings
        r_tokens = self.regional_tokens(proposals, index, masks)
        r_pad = torch.zeros(r_tokens.shape[:2], dtype=torch.bool, device=r_tokens.device)
        G, R = g_tokens.shape[1], r_tokens.shape[1]
        h, w = feature.shape[-2:]
        batch = TokenBatch(
            tokens=torch.cat([g_tokens, r_tokens.to(g_tokens.dtype)], dim=1),
            padding_mask=torch.cat([g_pad, r_pad], dim=1),
            segments={GLOBAL_SEGMENT: slice(0, G), REGIONAL_SEGMENT: slice(G, G + R)},
            # known on the host: only global cells wholly in the padding are masked
            has_padding=any(self._valid_cells(size) != (h, w) for size in image_sizes),
        )
        return ImageTokens(batch=batch, regional_start=g_tokens.shape[1], regional_index=index, regional_masks=masks)
