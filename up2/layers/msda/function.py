"""``ms_deform_attn_core``: the single entry point of the multi-scale deformable attention op
(shapes as in ``up2.layers.msda``). It validates its inputs, settles the dtype, and runs the
path ``routing.select_path`` picks: the compiled CPU kernel or the Triton kernels, each through
an autograd Function, ``torch.compile`` of the reference, or the pure-PyTorch reference."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from up2.utils.host_sync import to_device

from .checks import ShapesLike, check_core_inputs, shapes_as_list
from .reference import ms_deform_attn_core_pytorch
from .routing import select_path

__all__ = ["ms_deform_attn_core"]


class _CompiledMSDA(torch.autograd.Function):
    """autograd wrapper of ``torch.ops.up2_msda.forward`` / ``backward`` (float32 / float64, CPU)."""

    @staticmethod
    def forward(ctx, value, shapes_t, sampling_locations, attention_weights):
        value, sampling_locations, attention_weights = (
            t.contiguous() for t in (value, sampling_locations, attention_weights)
        )
        ctx.save_for_backward(value, shapes_t, sampling_locations, attention_weights)
        return torch.ops.up2_msda.forward(value, shapes_t, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        value, shapes_t, loc, attn = ctx.saved_tensors
        g_value, g_loc, g_attn = torch.ops.up2_msda.backward(grad_out.contiguous(), value, shapes_t, loc, attn)
        need = ctx.needs_input_grad
        return (g_value if need[0] else None, None, g_loc if need[2] else None, g_attn if need[3] else None)


class _TritonMSDA(torch.autograd.Function):
    """autograd wrapper of ``triton_kernels.msda_forward`` / ``msda_backward`` (fp32 / bf16 /
    fp16 / fp64 inputs, each kept in its own dtype; computed in fp32, fp64 if any is fp64)."""

    @staticmethod
    def forward(ctx, value, shapes_t, sampling_locations, attention_weights):
        from . import triton_kernels

        value, sampling_locations, attention_weights = (
            t.contiguous() for t in (value, sampling_locations, attention_weights)
        )
        ctx.save_for_backward(value, shapes_t, sampling_locations, attention_weights)
        return triton_kernels.msda_forward(value, shapes_t, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from . import triton_kernels

        value, shapes_t, loc, attn = ctx.saved_tensors
        g_value, g_loc, g_attn = triton_kernels.msda_backward(grad_out.contiguous(), value, shapes_t, loc, attn)
        need = ctx.needs_input_grad
        return (g_value if need[0] else None, None, g_loc if need[2] else None, g_attn if need[3] else None)


@functools.lru_cache(maxsize=None)
def _compiled_reference() -> Callable[..., torch.Tensor]:
    """``torch.compile`` of the reference (one graph: it compiles without breaks), built on first use."""
    return torch.compile(ms_deform_attn_core_pytorch, fullgraph=True)


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: ShapesLike,
    level_start_index: Optional[torch.Tensor],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention sampling (Deformable DETR Eq. 3, without projections).

    Args:
        value: (N, S, M, Dh) float, per-head values of all levels flattened level after level.
        spatial_shapes: (L, 2) int64 tensor (or list of (h, w)): size of each level in pixels.
        level_start_index: (L,) int64 offsets of each level in S, or None; when given it is
            checked against ``spatial_shapes``.
        sampling_locations: (N, Lq, M, L, P, 2) float, normalised (x, y) in [0, 1] of the
            level's map (0 = left/top edge, 1 = right/bottom edge); outside samples read 0.
        attention_weights: (N, Lq, M, L, P) float, normalised over (L, P) by the caller.

    Returns:
        (N, Lq, M * Dh) tensor in ``value``'s dtype; head m occupies channels
        ``[m * Dh, (m + 1) * Dh)``.

    Dtypes: the three float inputs are cast to their promoted dtype (e.g. float32 when
    ``value`` is bf16 but the locations are float32, so locations keep their precision) and
    the op runs with autocast disabled, so it never fails on mixed dtypes under
    ``torch.autocast``. The compiled and Triton paths compute bf16 / fp16 in float32 (the
    Triton kernels read each input in its own dtype, so nothing is cast before them); the
    output is cast back to ``value``'s dtype on every path.

    Path: the compiled CPU kernel for CPU tensors when built, the Triton kernels for CUDA
    tensors when ``triton`` imports, else pure PyTorch (see ``up2.layers.msda.routing`` and
    ``UP2_MSDA_PATH``); all give the same values and gradients up to rounding.

    Raises:
        ValueError: on any shape mismatch (S != sum h*w, wrong ranks, N/M/L/P disagreement,
            level_start_index inconsistent with spatial_shapes), or a bad ``UP2_MSDA_PATH``.
        RuntimeError: if ``UP2_MSDA_PATH`` forces a path that cannot run for these tensors.
    """
    shapes = shapes_as_list(spatial_shapes)
    check_core_inputs(value, shapes, level_start_index, sampling_locations, attention_weights)
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"value / sampling_locations / attention_weights must be floating point, got {dtype}")
    path = select_path(value.device)
    with torch.autocast(device_type=value.device.type, enabled=False):
        if path == "compiled":
            if dtype not in (torch.float32, torch.float64):
                dtype = torch.float32
            shapes_t = torch.tensor(shapes, dtype=torch.int64)
            out = _CompiledMSDA.apply(
                value.to(dtype), shapes_t, sampling_locations.to(dtype), attention_weights.to(dtype)
            )
        elif path == "triton":
            if torch.is_tensor(spatial_shapes):  # stays on the device: no host round trip
                shapes_t = spatial_shapes.to(device=value.device, dtype=torch.int64)
            else:
                shapes_t = to_device(shapes, value.device, torch.int64)  # non-blocking copy
            out = _TritonMSDA.apply(value, shapes_t, sampling_locations, attention_weights)
        elif path == "compiled_reference":
            out = _compiled_reference()(
                value.to(dtype), shapes, sampling_locations.to(dtype), attention_weights.to(dtype)
            )
        else:
            out = ms_deform_attn_core_pytorch(
                value.to(dtype), shapes, sampling_locations.to(dtype), attention_weights.to(dtype)
            )
    return out.to(value.dtype)
