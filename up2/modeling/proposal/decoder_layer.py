"""One layer of the proposal decoder (paper App. A; DINO / MaskDINO's decoder layer).

Shape shorthand: N images, X = T + Q queries (denoising ++ matching), S encoder pixels over
all L levels, D width.
"""
from __future__ import annotations

import torch
from torch import nn

from up2.layers.msda import MSDeformAttn

__all__ = ["DecoderLayer"]


class DecoderLayer(nn.Module):
    """Post-norm DINO decoder layer: self-attention, deformable cross-attention, FFN.

    Args:
        dim: D.  num_heads: attention heads.  num_levels: L.  num_points: per head and level.
        ffn_dim: FFN hidden width.  dropout: dropout probability.
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, pos, ref_boxes, memory, spatial_shapes, level_start_index, memory_padding_mask,
                attn_mask, key_padding_mask) -> torch.Tensor:
        """tgt, pos: (N, X, D); ref_boxes: (N, X, L, 4) normalised cxcywh; memory (N, S, D);
        spatial_shapes (L, 2) int64; level_start_index (L,) int64; memory_padding_mask (N, S)
        bool or None; attn_mask (X, X) bool or None; key_padding_mask (N, X) bool or None
        -> (N, X, D)."""
        q = k = tgt + pos
        attn = self.self_attn(q, k, tgt, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        cross = self.cross_attn(tgt + pos, ref_boxes, memory, spatial_shapes, level_start_index, memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout(cross))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))
