"""``MSDeformAttn``: the multi-scale deformable attention module (Deformable DETR §4.1):
sampling-offset, attention-weight, value and output projections around ``ms_deform_attn_core``
(shapes as in ``up2.layers.msda``). Parameter names are those of Deformable DETR, so
checkpoints load unchanged."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from up2.utils.host_sync import cpu_only, to_device

from .checks import shapes_as_list
from .function import ms_deform_attn_core

__all__ = ["MSDeformAttn"]


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(-1)``; without autograd, as ``exp(x - max) / sum`` in place on a copy.

    torch's CPU softmax is slow on a short last dimension (L * P = 12 here): on (1, 17850, 8, 12)
    float32 it took 20 ms where these four vectorised passes take 3 ms. Same formula, so the
    same values up to rounding of the sum. bf16 / fp16 inputs are computed in float32 (the
    kernel consumes float32 weights anyway).
    """
    if torch.is_grad_enabled():
        return x.softmax(-1)
    e = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x.clone()
    e = e.sub_(e.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR §4.1): projections + the op.

    Sampling offsets and attention weights are linear functions of the query; values are a
    linear projection of ``value_input``; the heads' outputs are concatenated and projected.

    Args:
        embed_dim: C, divisible by ``num_heads``.
        num_heads: M.
        num_levels: L.
        num_points: P, sampling points per head and level.

    Raises:
        ValueError: if ``embed_dim % num_heads != 0`` or any size is not positive.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_levels", num_levels),
                        ("num_points", num_points)):
            if int(v) <= 0:
                raise ValueError(f"MSDeformAttn: {name} must be positive, got {v}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"MSDeformAttn: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR initialisation: head m's points start on a ray at angle 2*pi*m/M
        (unit step scaled so the larger of |cos|, |sin| is 1), point p at distance p+1
        pixels; uniform attention; Xavier value/output projections."""
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(m, dtype=torch.float32) * (2.0 * math.pi / m)
        dirs = torch.stack((angles.cos(), angles.sin()), dim=-1)  # (M, 2)
        dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, p + 1, dtype=torch.float32)  # (P,)
        bias = dirs[:, None, None, :] * steps[None, None, :, None]  # (M, 1, P, 2)
        self.sampling_offsets.bias.copy_(bias.expand(m, lv, p, 2).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: Optional[torch.Tensor] = None,
        value_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attend from each query to P points per head around its reference on every level.

        Args:
            query: (N, Lq, C) float (position embedding already added by the caller).
            reference_points: (N, Lq, L, 2) normalised (x, y) in [0, 1]: offsets are in pixels
                of each level (divided by the level's (w, h)); or (N, Lq, L, 4) normalised
                cxcywh boxes: offsets are scaled by ``box_wh * 0.5 / P``.
            value_input: (N, S, C) float, the multi-scale features flattened level by level.
            spatial_shapes: (L, 2) int64, (h_l, w_l).
            level_start_index: (L,) int64 offsets of the levels in S (checked), or None.
            value_padding_mask: (N, S) bool, True on padded pixels (their values are zeroed),
                or None.

        Returns:
            (N, Lq, C) tensor.

        Raises:
            ValueError: on shape mismatches (C, L, S != sum h*w, reference-point layout).
        """
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (N, Lq, {self.embed_dim}), got {tuple(query.shape)}")
        n, lq, _ = query.shape
        if value_input.dim() != 3 or value_input.shape[0] != n or value_input.shape[-1] != self.embed_dim:
            raise ValueError(f"value_input must be (N={n}, S, {self.embed_dim}), got {tuple(value_input.shape)}")
        s = value_input.shape[1]
        shapes = shapes_as_list(spatial_shapes)
        if len(shapes) != self.num_levels:
            raise ValueError(f"spatial_shapes has {len(shapes)} levels, module was built for {self.num_levels}")
        if sum(h * w for h, w in shapes) != s:
            raise ValueError(f"value_input has S={s} pixels but spatial_shapes {shapes} sum to "
                             f"{sum(h * w for h, w in shapes)}")
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (n, lq, self.num_levels) \
                or reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must be (N={n}, Lq={lq}, L={self.num_levels}, 2 or 4), "
                f"got {tuple(reference_points.shape)}"
            )
        m, lv, p = self.num_heads, self.num_levels, self.num_points

        value = self.value_proj(value_input)
        if value_padding_mask is not None:
            if tuple(value_padding_mask.shape) != (n, s) or value_padding_mask.dtype != torch.bool:
                raise ValueError(f"value_padding_mask must be (N={n}, S={s}) bool, got "
                                 f"{tuple(value_padding_mask.shape)} {value_padding_mask.dtype}")
            if torch.is_grad_enabled():
                value = value.masked_fill(value_padding_mask[..., None], 0.0)
            elif value.device.type == "cpu":
                # value_proj's output is a fresh tensor: zero its padded rows in place. Writing only
                # those rows beats a masked pass over all of them (0.13 vs 2.0 ms fp32, 3.6 ms bf16
                # on (1, 17850, 256) with 2% padding); on GPUs nonzero() would synchronise.
                with cpu_only():
                    rows = value_padding_mask.reshape(-1).nonzero().squeeze(1)
                value.view(-1, value.shape[-1]).index_fill_(0, rows, 0.0)
            else:
                value.masked_fill_(value_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.embed_dim // m)

        weights = _softmax_last(self.attention_weights(query).view(n, lq, m, lv * p)).view(n, lq, m, lv, p)
        offsets = self.sampling_offsets(query)  # (N, Lq, M * L * P * 2)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: reference + offset / (w, h), as one fused
            # multiply-add in the reference points' precision (bf16 offsets under autocast are
            # widened first). Every operand is laid out with the (L, P, 2) values of one head as
            # its contiguous last dim: broadcasting over P and xy in the last dims instead made
            # the pass 5x slower (15 vs 2.8 ms on (1, 17850, 8, 3, 4, 2) float32).
            ref = reference_points[:, :, :, None, :].expand(n, lq, lv, p, 2).reshape(n, lq, 1, lv * p * 2)
            inv_wh = to_device([[1.0 / w, 1.0 / h] for h, w in shapes], query.device, reference_points.dtype)
            inv_wh = inv_wh[:, None, :].expand(lv, p, 2).reshape(lv * p * 2)
            locations = torch.addcmul(ref, offsets.view(n, lq, m, lv * p * 2).to(reference_points.dtype), inv_wh)
            locations = locations.view(n, lq, m, lv, p, 2)
        else:
            offsets = offsets.view(n, lq, m, lv, p, 2)
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets * (reference_points[:, :, None, :, None, 2:] * (0.5 / p))
            )
        out = ms_deform_attn_core(value, shapes, level_start_index, locations, weights)
        return self.output_proj(out)
