"""Convolutions followed by a frozen BatchNorm, folded into one convolution.

A ResNet backbone built by detectron2 with ``MODEL.RESNETS.NORM: "FrozenBN"`` is a chain of
``detectron2.layers.Conv2d(norm=FrozenBatchNorm2d)``. The frozen norm is a fixed per-channel
affine map, y = x * s + t with s = gamma / sqrt(var + eps) and t = beta - mean * s, so

    FrozenBN(conv(x; W, b)) = conv(x; W * s, b * s + t)            (s broadcast over W's out dim)

:class:`FrozenBNConv2d` runs the folded convolution in float32 / float64: the norm's separate
pass over the feature map goes away. The folded weight is recomputed on every call (one pass
over the weights, small next to the feature maps), so nothing is cached and there is nothing to
invalidate when weights or norm buffers change. It is one of the inference rewrites that
``up2.modeling.inference.prepare_for_inference`` applies (its A/B: docs/inference_rewrites.md);
models are built with detectron2's class.

Not folded (detectron2's own forward runs unchanged): in bf16 / fp16 (autocast to them, or such
inputs): the folded bias t = beta - mean * s would be rounded to the low precision before it is
added, which made bf16 outputs 1.6-3x further from float32 than the unfolded path; adding t
afterwards in float32 is a mixed-dtype pass several times slower than the norm.

The module's parameters, buffers and ``state_dict`` are detectron2's. ``torch.jit.script`` of a
folded conv is not supported (tracing is).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

__all__ = ["FrozenBNConv2d", "fold_frozen_batchnorm"]

_LOW = (torch.bfloat16, torch.float16)


class FrozenBNConv2d(Conv2d):
    """detectron2 ``Conv2d`` whose ``FrozenBatchNorm2d`` is folded into the convolution when it
    runs in float32 / float64 (module docstring). Input (N, C_in, H, W) float, output
    (N, C_out, H', W'), the same as detectron2's conv -> norm -> activation up to float rounding
    (gradients too: the folded weight is differentiable in W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        device = x.device.type
        low_precision = x.dtype in _LOW or (
            torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in _LOW
        )
        if low_precision or not isinstance(norm, FrozenBatchNorm2d):
            return super().forward(x)
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # s, (C_out,) in the buffers' dtype
        shift = norm.bias - norm.running_mean * scale  # t
        if self.bias is not None:
            shift = torch.addcmul(shift, self.bias, scale)
        weight = self.weight * scale.to(self.weight.dtype).view(-1, 1, 1, 1)  # keeps the memory format
        x = F.conv2d(x, weight, shift.to(self.weight.dtype), self.stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Make every detectron2 ``Conv2d`` inside ``module`` whose ``norm`` is a ``FrozenBatchNorm2d``
    a :class:`FrozenBNConv2d` (in place: the same object, parameters and buffers; only the
    forward changes). Instances of ``Conv2d`` subclasses are left alone.

    Not part of the paper: an inference speed-up of the backbone (paper §5.2's ResNet-50 with
    frozen BatchNorm), applied by ``up2.modeling.inference.prepare_for_inference``; outputs are
    unchanged up to float rounding. Idempotent.

    Returns:
        The number of convolutions changed (0 for a backbone without FrozenBN, e.g. Swin).
    """
    count = 0
    for m in module.modules():
        if type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d):
            m.__class__ = FrozenBNConv2d
            count += 1
    return count
