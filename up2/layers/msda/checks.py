"""Input validation of the multi-scale deformable attention op (shapes as in ``up2.layers.msda``)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ShapesLike", "shapes_as_list", "check_core_inputs"]

ShapesLike = Union[torch.Tensor, Sequence[Tuple[int, int]]]


def shapes_as_list(spatial_shapes: ShapesLike) -> List[Tuple[int, int]]:
    """The L level sizes as a list of (h, w) ints.

    Args:
        spatial_shapes: (L, 2) int tensor or a sequence of (h, w) pairs, pixels.

    Raises:
        ValueError: a tensor that is not (L, 2).
    """
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must be (L, 2) (h, w), got shape {tuple(spatial_shapes.shape)}")
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def check_core_inputs(
    value: torch.Tensor,
    shapes: List[Tuple[int, int]],
    level_start_index: Optional[torch.Tensor],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Check the shapes ``ms_deform_attn_core`` documents against each other.

    Raises:
        ValueError: S != sum h*w, non-positive level sizes, wrong ranks, N/M/L/P disagreement,
            or ``level_start_index`` inconsistent with ``shapes``.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, Dh), got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    num_levels = len(shapes)
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be positive (h, w) pairs, got {shapes}")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"value has S={s} pixels but spatial_shapes {shapes} sum to {sum(h * w for h, w in shapes)}")
    if level_start_index is not None:
        expected = [0]
        for h, w in shapes[:-1]:
            expected.append(expected[-1] + h * w)
        got = level_start_index.tolist() if torch.is_tensor(level_start_index) else list(level_start_index)
        got = [int(i) for i in got]
        if got != expected:
            raise ValueError(f"level_start_index {got} does not match spatial_shapes {shapes} (expected {expected})")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    sn, lq, sm, sl, p, _ = sampling_locations.shape
    if (sn, sm, sl) != (n, m, num_levels):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} do not match value (N={n}, M={m}) "
            f"and L={num_levels} levels"
        )
    if tuple(attention_weights.shape) != (n, lq, m, num_levels, p):
        raise ValueError(
            f"attention_weights must be (N, Lq, M, L, P) = {(n, lq, m, num_levels, p)}, "
            f"got {tuple(attention_weights.shape)}"
        )
