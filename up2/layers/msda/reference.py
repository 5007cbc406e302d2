"""The pure-PyTorch multi-scale deformable attention op: the numerical reference of every
other path, and the path that runs where no kernel does (shapes as in ``up2.layers.msda``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import ShapesLike, shapes_as_list

__all__ = ["ms_deform_attn_core_pytorch"]


def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    spatial_shapes: ShapesLike,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference pure-PyTorch op (no input checks; use ``ms_deform_attn_core``).

    Shapes and semantics as ``ms_deform_attn_core``: value (N, S, M, Dh), sampling_locations
    (N, Lq, M, L, P, 2) normalised (x, y), attention_weights (N, Lq, M, L, P); returns
    (N, Lq, M * Dh). Computes in the dtype of ``value`` (all inputs must share it). Loops over
    levels only (L calls to ``F.grid_sample``, bilinear, zero padding, ``align_corners=False``).
    """
    shapes = shapes_as_list(spatial_shapes)
    n, _, m, dh = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1] and the batch to be (image, head).
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # (N*M, Lq, L, P, 2)
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # (N*M, Lq, L, P)
    out = value.new_zeros(n * m, dh, lq)
    for lvl, (h, w) in enumerate(shapes):
        # contiguous: torch's CPU bf16 grid_sample returns NaN for a strided input (seen on 2.14;
        # a copy only when N = 1, where the reshape is a view)
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, dh, h, w).contiguous()
        sampled = F.grid_sample(
            v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (N*M, Dh, Lq, P)
        out = out + (sampled * weights[:, None, :, lvl]).sum(-1)
    return out.view(n, m * dh, lq).transpose(1, 2).contiguous()
