"""Multi-scale deformable-attention pixel decoder of the proposal network (paper §4.1, App. A;
the MaskDINO / Deformable DETR encoder) and the stride-4 mask features.

Shape shorthand (see ``up2.structures``):
    N  images          L  encoder levels (``in_features``), ordered coarse to fine (largest
                          stride first)
    D  hidden width    h_l, w_l  size of level l      S = sum_l h_l * w_l
    Hp, Wp  padded image size (pixels)                Hm, Wm  size of ``mask_in_feature``
    C_f  channels of backbone feature f
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Set

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from torch import nn

from up2.layers.msda import MSDeformAttn
from up2.modeling.proposal.position_encoding import position_encoding_2d
from up2.structures import PixelDecoderOutput
from up2.utils.host_sync import to_device

__all__ = ["MSDeformAttnPixelDecoder", "DeformableEncoderLayer"]


def _pointwise_conv_nchw(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; for a 1x1, stride-1, ungrouped, unpadded ``conv`` without norm or activation
    and a channels-last ``x``, computed as one GEMM that returns NCHW-contiguous output (any
    other conv or input: simply ``conv(x)``).

    The mask features feed the (Q, D) x (D, Hm * Wm) mask-logit products of every supervised
    stage. With channels-last mask features each bf16 product first copied them into NCHW
    (45 ms per product at 800x1067, 2 threads). As one batched GEMM that reads x's pixel rows
    and writes channel-major output, the 1x1 conv costs the same as before and yields the layout
    the products want: conv + 2 products 163 -> 78 ms in bf16, unchanged in float32, same values.

    Args:
        conv: a detectron2 ``Conv2d``.
        x: (N, C_in, H, W) float.

    Returns:
        (N, C_out, H, W), contiguous (NCHW) when ``x`` is channels-last.
    """
    n, c, h, w = x.shape
    pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 \
        and conv.padding in (0, (0, 0))
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not (pointwise and channels_last) or conv.norm is not None or conv.activation is not None:
        return conv(x)
    pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view of the NHWC storage
    weight = conv.weight.view(conv.out_channels, c)[None].expand(n, -1, -1)
    if conv.bias is None:
        out = torch.bmm(weight, pixels.transpose(1, 2))
    else:
        out = torch.baddbmm(conv.bias[None, :, None], weight, pixels.transpose(1, 2))
    return out.view(n, conv.out_channels, h, w)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``channels`` below 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class DeformableEncoderLayer(nn.Module):
    """One deformable encoder layer: MSDeformAttn self-attention then an FFN, each followed
    by residual + LayerNorm (post-norm, Deformable DETR). ``prepare_for_inference`` makes it
    ``up2.modeling.inference.ChunkedFFNEncoderLayer`` (same values, less memory traffic).

    Args:
        dim: D.  num_heads: M.  num_levels: L.  num_points: P.  ffn_dim: FFN hidden width.
        dropout: dropout probability after attention and inside / after the FFN.
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """
        Args:
            src: (N, S, D) features.  pos: (N, S, D) position + level embedding.
            reference_points: (N, S, L, 2) normalised (x, y).
            spatial_shapes: (L, 2) int64.  level_start_index: (L,) int64.
            padding_mask: (N, S) bool, True = padded, or None.

        Returns:
            (N, S, D).
        """
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout3(self._ffn(src)))

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        # in place: ReLU's backward needs only its output, and linear1 keeps its own input
        return self.linear2(self.dropout2(F.relu(self.linear1(x), inplace=True)))


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable encoder over ``in_features`` plus stride-4 mask features (paper §4.1).

    Each level is projected to D (1x1 conv + GroupNorm), gets a 2-D sine position encoding
    plus a learned level embedding, and the flattened levels go through ``num_layers``
    deformable encoder layers. Mask features: the finest encoder level, bilinearly upsampled
    to ``mask_in_feature``'s size, plus a lateral 1x1 conv (+GN) of that feature, then a 3x3
    conv + GN + ReLU and a 1x1 conv to D.

    Args:
        input_shape: backbone feature name -> ShapeSpec (channels, stride); must hold every
            name in ``in_features`` and ``mask_in_feature``.
        in_features: names of the encoder levels (any order; sorted coarse to fine).
        mask_in_feature: name of the stride-4 feature fused into the mask features.
        hidden_dim: D (divisible by ``num_heads`` and by 4).
        num_heads, num_points: of MSDeformAttn.  num_layers: encoder layers, >= 1.
        ffn_dim: FFN hidden width.  dropout: dropout probability.

    Raises:
        ValueError: unknown feature names, empty ``in_features``, ``num_layers`` < 1, or a
            ``hidden_dim`` not divisible by ``num_heads`` / 4.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: Dict[str, ShapeSpec],
        in_features: List[str],
        mask_in_feature: str,
        hidden_dim: int,
        num_heads: int,
        num_layers: int,
        ffn_dim: int,
        num_points: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not in_features:
            raise ValueError("MODEL.PROPOSAL.IN_FEATURES must name at least one backbone feature")
        missing = [f for f in list(in_features) + [mask_in_feature] if f not in input_shape]
        if missing:
            raise ValueError(f"pixel decoder: features {missing} are not produced by the backbone "
                             f"(available: {sorted(input_shape)})")
        if num_layers < 1:
            raise ValueError(f"MODEL.PROPOSAL.ENC_LAYERS must be >= 1, got {num_layers}")
        if hidden_dim % num_heads != 0 or hidden_dim % 4 != 0:
            raise ValueError(f"MODEL.PROPOSAL.HIDDEN_DIM ({hidden_dim}) must be divisible by NHEADS "
                             f"({num_heads}) and by 4")
        self.in_features = sorted(in_features, key=lambda f: -input_shape[f].stride)  # coarse to fine
        self.mask_in_feature = mask_in_feature
        self.hidden_dim = hidden_dim
        num_levels = len(self.in_features)

        self.input_proj = nn.ModuleList(
            Conv2d(input_shape[f].channels, hidden_dim, kernel_size=1, norm=_group_norm(hidden_dim))
            for f in self.in_features
        )
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(hidden_dim, num_heads, num_levels, num_points, ffn_dim, dropout)
            for _ in range(num_layers)
        )
        self.lateral_conv = Conv2d(
            input_shape[mask_in_feature].channels, hidden_dim, kernel_size=1, bias=False, norm=_group_norm(hidden_dim)
        )
        self.output_conv = Conv2d(
            hidden_dim, hidden_dim, kernel_size=3, padding=1, bias=False, norm=_group_norm(hidden_dim),
            activation=F.relu_,  # in place on GroupNorm's output, which GroupNorm's backward does not need
        )
        self.mask_features = Conv2d(hidden_dim, hidden_dim, kernel_size=1)

        for conv in self.input_proj:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_embed)
        for conv in (self.lateral_conv, self.output_conv, self.mask_features):
            weight_init.c2_xavier_fill(conv)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        p = cfg.MODEL.PROPOSAL
        return {
            "input_shape": input_shape,
            "in_features": list(p.IN_FEATURES),
            "mask_in_feature": p.MASK_IN_FEATURE,
            "hidden_dim": p.HIDDEN_DIM,
            "num_heads": p.NHEADS,
            "num_layers": p.ENC_LAYERS,
            "ffn_dim": p.ENC_FFN_DIM,
            "num_points": p.N_POINTS,
            "dropout": p.DROPOUT,
        }

    def no_weight_decay(self) -> Set[str]:
        """The level embedding is a learned per-level type embedding: not decayed
        (``up2.solver.weight_decay``)."""
        return {"level_embed"}

    @staticmethod
    def _reference_points(shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level as encoder reference points.

        Args:
            shapes: L (h, w) pairs.  valid_ratios: (N, L, 2) float, un-padded fraction (x, y).

        Returns:
            (N, S, L, 2) normalised (x, y): the centre of pixel (i, j) of level l, expressed
            relative to the valid region and mapped into every level's padded map.
        """
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            ys = (torch.arange(h, device=valid_ratios.device, dtype=valid_ratios.dtype) + 0.5)
            xs = (torch.arange(w, device=valid_ratios.device, dtype=valid_ratios.dtype) + 0.5)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            # normalise by the valid size of this level: (N, h*w)
            rx = gx.reshape(1, -1) / (valid_ratios[:, lvl, 0:1] * w)
            ry = gy.reshape(1, -1) / (valid_ratios[:, lvl, 1:2] * h)
            refs.append(torch.stack((rx, ry), dim=-1))  # (N, h*w, 2)
        ref = torch.cat(refs, dim=1)  # (N, S, 2)
        return ref[:, :, None] * valid_ratios[:, None]  # (N, S, L, 2)

    def forward(
        self, features: Dict[str, torch.Tensor], padding_mask: Optional[torch.Tensor] = None
    ) -> PixelDecoderOutput:
        """Encode the multi-scale features and build the mask features.

        Args:
            features: name -> (N, C_f, h_f, w_f) backbone features (must hold ``in_features``
                and ``mask_in_feature``).
            padding_mask: (N, Hp, Wp) bool, True on padded pixels of the padded image, or None.
                It is resized (nearest) to every level.

        Returns:
            PixelDecoderOutput: mask_features (N, D, Hm, Wm); memory (N, S, D) with levels
            coarse to fine; spatial_shapes (L, 2); level_start_index (L,); padding_mask (N, S)
            bool or None; multi_scale_features L x (N, D, h_l, w_l).

        Raises:
            ValueError: missing feature names, or a padding_mask that is not (N, Hp, Wp) bool.
        """
        missing = [f for f in self.in_features + [self.mask_in_feature] if f not in features]
        if missing:
            raise ValueError(f"pixel decoder: features {missing} missing from the input (got {sorted(features)})")
        first = features[self.in_features[0]]
        n, device = first.shape[0], first.device
        if padding_mask is not None and (
            padding_mask.dim() != 3 or padding_mask.shape[0] != n or padding_mask.dtype != torch.bool
        ):
            raise ValueError(f"padding_mask must be (N={n}, Hp, Wp) bool, got "
                             f"{tuple(padding_mask.shape)} {padding_mask.dtype}")

        srcs, poss, masks, shapes = [], [], [], []
        for lvl, name in enumerate(self.in_features):
            x = self.input_proj[lvl](features[name])  # (N, D, h, w)
            h, w = x.shape[-2:]
            shapes.append((h, w))
            if padding_mask is not None:
                m = F.interpolate(padding_mask[:, None].float(), size=(h, w), mode="nearest")[:, 0].bool()
                masks.append(m.flatten(1))
                pos = position_encoding_2d(m, self.hidden_dim)
            else:
                pos = position_encoding_2d(None, self.hidden_dim, shape=(n, h, w), device=device)
            srcs.append(x.flatten(2).transpose(1, 2))
            poss.append(pos.to(x.dtype).flatten(2).transpose(1, 2) + self.level_embed[lvl])

        src = torch.cat(srcs, dim=1)  # (N, S, D)
        pos = torch.cat(poss, dim=1)
        if padding_mask is not None:
            flat_mask = torch.cat(masks, dim=1)  # (N, S)
            valid_ratios = torch.stack(
                [self._valid_ratio(m.view(n, h, w)) for m, (h, w) in zip(masks, shapes)], dim=1
            )  # (N, L, 2)
        else:
            flat_mask = None
            valid_ratios = torch.ones(n, len(shapes), 2, device=device)
        shapes = tuple((int(h), int(w)) for h, w in shapes)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        spatial_shapes = to_device(shapes, device, torch.int64)  # for callers that want tensors
        level_start_index = to_device(starts, device, torch.int64)
        reference_points = self._reference_points(shapes, valid_ratios)

        memory = src
        for layer in self.layers:
            memory = layer(memory, pos, reference_points, shapes, None, flat_mask)  # host shapes: no sync

        multi_scale = [
            chunk.transpose(1, 2).reshape(n, self.hidden_dim, h, w)
            for chunk, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        lateral = self.lateral_conv(features[self.mask_in_feature])
        # NCHW input: bilinear upsampling of the channels-last view (as memory is laid out)
        # returns NCHW through a slow layout copy; copying the small input first is faster
        finest = F.interpolate(multi_scale[-1].contiguous(), size=lateral.shape[-2:], mode="bilinear",
                               align_corners=False)
        lateral.add_(finest)  # in place: GroupNorm's fresh output (its backward does not need it)
        mask_features = _pointwise_conv_nchw(self.mask_features, self.output_conv(lateral))
        return PixelDecoderOutput(
            mask_features=mask_features,
            memory=memory,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            level_shapes=shapes,
            padding_mask=flat_mask,
            multi_scale_features=multi_scale,
        )

    @staticmethod
    def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """(N, h, w) bool padding mask -> (N, 2) float un-padded fraction (x, y), >= 1 pixel."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).float()
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).float()
        return torch.stack((valid_w / w, valid_h / h), dim=-1)
