"""In-place feature-map ops of the pixel decoder's stride-4 branch, for inference.

Both write into a tensor the caller owns (a convolution's fresh output), so the branch
allocates no new full-resolution map for them: at 800x1067 such a map is (1, 256, 200, 272),
55 MB in float32, which the allocator maps fresh on every call (page faults) before the op can
write it. Neither records autograd history; callers use them only without autograd.

Source: the mask-feature branch of the pixel decoder (paper §4.1 and App. A: MaskDINO's
stride-4 mask features = lateral conv + GroupNorm of the stride-4 backbone map plus the
bilinearly upsampled finest encoder level, then conv + GroupNorm + ReLU); GroupNorm is Wu & He
(2018). All sizes are in pixels of the feature maps (stride 4 and 8 of the padded image).

- ``group_norm_``: GroupNorm (Wu & He 2018) applied in place, float32 / float64. Two passes
  for the statistics: per-channel means, then per-channel sums of squared deviations from them
  (float32 chunks, combined in float64), joined per group by the law of total variance, so a
  large mean does not cancel the variance away. Measured on (1, 256, 200, 272) channels-last
  float32, 2 threads, outside the model (no page faults on either side), torch's kernel ->
  this one in the same run: 21 -> 11 ms (NCHW: 19 -> 13 ms). In bf16 torch's
  own kernel is faster (5 ms): the pixel decoder keeps it there.
- ``add_upsampled_2x_``: ``target += F.interpolate(source, scale 2, bilinear,
  align_corners=False)`` as two separable passes of fixed weights (3/4, 1/4): a (N, h, 2w, C)
  row buffer and small row blocks, instead of a (N, C, 2h, 2w) upsampled map added to a
  target of another memory layout. (1, 256, 100, 136) -> (1, 256, 200, 272), target
  channels-last, 2 threads: float32 73 -> 12-14 ms, bf16 103 -> 19-23 ms (its passes run in
  float32).
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["add_upsampled_2x_", "group_norm_"]


def _is_count(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _pixel_chunks(x: torch.Tensor, chunk: int):
    """x (N, C, H, W) as (flat, dim, pieces): its pixels along ``dim`` of a view ``flat``
    ((N, HW, C) for channels-last storage, (N, C, HW) else) and the views of ``chunk`` pixels."""
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    flat, dim = (x.permute(0, 2, 3, 1).reshape(n, h * w, c), 1) if channels_last else (x.reshape(n, c, h * w), 2)
    return flat, dim, [flat.narrow(dim, a, min(chunk, h * w - a)) for a in range(0, h * w, chunk)]


def group_norm_(x: torch.Tensor, norm: nn.GroupNorm, chunk: int = 4096) -> torch.Tensor:
    """``x = norm(x)`` in place (GroupNorm with ``norm``'s groups, eps and affine parameters).

    Statistics over each image's groups of C / G channels x H x W pixels (biased variance):
    per-channel means, then per-channel sums of squared deviations from them, in float32 pixel
    chunks accumulated in float64; a group's variance is the mean of its channels' variances
    plus the variance of their means. Then ``x * scale + shift`` per channel in one in-place
    pass, with scale and shift computed in float64 and rounded to x's dtype (module docstring:
    why and how fast). Records no autograd history (the norm's parameters are read detached).

    Args:
        x: (N, C, H, W) float32 or float64 tensor, overwritten; any memory layout (channels-last
            and NCHW are read in contiguous chunks). Must not be needed by anything else, nor
            require grad. Empty tensors are returned as they are.
        norm: an ``nn.GroupNorm`` with ``num_channels == C`` (affine or not).
        chunk: pixels per partial sum, an int >= 1 (bounds the float32 temporaries).

    Returns:
        ``x``, normalised, in its dtype and memory layout.

    Raises:
        ValueError: x not a 4-D float32 / float64 tensor (bf16 / fp16: use the module, whose
            kernel also rounds once), C != norm.num_channels, chunk not an int >= 1, or
            autograd recording with an x that requires grad.
    """
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"group_norm_: x must be (N, C, H, W) float32 / float64, got {tuple(x.shape)} {x.dtype}")
    n, c, h, w = x.shape
    if c != norm.num_channels:
        raise ValueError(f"group_norm_: x has {c} channels, the norm {norm.num_channels}")
    if not _is_count(chunk):
        raise ValueError(f"group_norm_: chunk must be an int >= 1, got {chunk!r}")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("group_norm_ works in place without autograd; use the GroupNorm module to train")
    if x.numel() == 0:
        return x
    g = norm.num_groups
    with torch.no_grad():
        _, dim, pieces = _pixel_chunks(x, int(chunk))
        keep = (slice(None), None, slice(None)) if dim == 1 else (slice(None), slice(None), None)
        sums = torch.zeros(n, c, dtype=torch.float64, device=x.device)
        for piece in pieces:
            sums += piece.sum(dim, dtype=torch.float64) if x.dtype == torch.float64 else piece.sum(dim)
        mean_c = sums / (h * w)  # (N, C) float64
        centre = mean_c.to(x.dtype)[keep]  # (N, 1, C) or (N, C, 1)
        squares = torch.zeros(n, c, dtype=torch.float64, device=x.device)
        for piece in pieces:
            squares += (piece - centre).square_().sum(dim)
        # deviations were taken from the rounded centre: correct to the exact channel mean
        offset = mean_c - centre.double().reshape(n, c)
        var_c = (squares / (h * w) - offset.square()).clamp_(min=0)
        mean_g = mean_c.view(n, g, -1).mean(-1)  # (N, G)
        var_g = var_c.view(n, g, -1).mean(-1) + (mean_c.view(n, g, -1) - mean_g[..., None]).square().mean(-1)
        rstd = (var_g + norm.eps).rsqrt()
        scale = rstd[:, :, None].expand(n, g, c // g).reshape(n, c)  # (N, C)
        shift = -mean_g[:, :, None].expand(n, g, c // g).reshape(n, c) * scale
        if norm.affine:
            weight, bias = norm.weight.detach().double(), norm.bias.detach().double()
            shift = shift * weight + bias
            scale = scale * weight
        return torch.addcmul(shift.to(x.dtype)[:, :, None, None], x, scale.to(x.dtype)[:, :, None, None], out=x)


def _mix_lerp(near: torch.Tensor, far: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = 3/4 near + 1/4 far in one pass, as near + 1/4 (far - near): for finite values
    below half the float range (the difference neither overflows nor meets an inf)."""
    return torch.lerp(near, far, 0.25, out=out)


def _mix_sum(near: torch.Tensor, far: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = 3/4 near + 1/4 far as two weighted terms, as F.interpolate sums them (an inf stays
    inf, values near the float range do not overflow); two passes."""
    return torch.mul(near, 0.75, out=out).add_(far, alpha=0.25)


def _upsample_rows_2x(source: torch.Tensor, out: torch.Tensor, mix) -> torch.Tensor:
    """out (..., 2w, C) = 2x bilinear (align_corners=False) of source (..., w, C) along dim -2:
    output column 2i is 3/4 of column i + 1/4 of column i - 1, column 2i + 1 is 3/4 of i +
    1/4 of i + 1; the two outermost columns copy the border (edge clamping)."""
    mix(source[..., 1:, :], source[..., :-1, :], out[..., 2::2, :])
    mix(source[..., :-1, :], source[..., 1:, :], out[..., 1:-1:2, :])
    out[..., 0, :] = source[..., 0, :]
    out[..., -1, :] = source[..., -1, :]
    return out


def add_upsampled_2x_(target: torch.Tensor, source: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """``target += F.interpolate(source, size=target.shape[-2:], mode="bilinear",
    align_corners=False)`` in place, for a target exactly twice the source's size.

    Same values up to float rounding: the weights 3/4 and 1/4 are exact; the passes compute
    in ``source``'s dtype, at least float32 (as F.interpolate does inside), and the sum is
    rounded once to ``target``'s dtype.

    Args:
        target: (N, C, 2h, 2w) float, overwritten; any memory layout.
        source: (N, C, h, w) float, any strides (e.g. a channels-last view of encoder tokens).
        rows: output row pairs per block, an int >= 1 (bounds the temporaries to
            (N, rows, 2w, C)).

    Returns:
        ``target`` (unchanged when it is empty).

    Non-finite values propagate as in F.interpolate: each output is a weighted sum of its
    4 source pixels, so an inf source pixel makes its neighbourhood inf (NaN where +inf and
    -inf meet).

    Raises:
        ValueError: not 4-D float tensors, N / C differ, the target is not exactly 2x the
            source's size, rows not an int >= 1, or autograd recording with a target or source
            that requires grad.
    """
    if target.dim() != 4 or source.dim() != 4 or not (target.is_floating_point() and source.is_floating_point()):
        raise ValueError(f"add_upsampled_2x_: target and source must be (N, C, H, W) float, got "
                         f"{tuple(target.shape)} {target.dtype} and {tuple(source.shape)} {source.dtype}")
    n, c, h, w = source.shape
    if tuple(target.shape) != (n, c, 2 * h, 2 * w):
        raise ValueError(f"add_upsampled_2x_: target must be (N, C, 2h, 2w) = {(n, c, 2 * h, 2 * w)} for a source "
                         f"of {tuple(source.shape)}, got {tuple(target.shape)}")
    if not _is_count(rows):
        raise ValueError(f"add_upsampled_2x_: rows must be an int >= 1, got {rows!r}")
    if torch.is_grad_enabled() and (target.requires_grad or source.requires_grad):
        raise ValueError("add_upsampled_2x_ works in place without autograd; use F.interpolate to train")
    if target.numel() == 0:
        return target
    rows = int(rows)
    dtype = torch.promote_types(source.dtype, torch.float32)  # bf16 / fp16 sources: passes in float32
    src = source.permute(0, 2, 3, 1).to(dtype)  # (N, h, w, C)
    # one-pass mixes (lerp) unless a value is non-finite or beyond half the range (amax is NaN
    # then, or too large): one reduction over the small source decides for all passes
    largest = torch.linalg.vector_norm(src, float("inf"))  # max |value|, NaN if any; no temporary
    mix = _mix_lerp if bool(largest < torch.finfo(dtype).max / 2) else _mix_sum
    wide = _upsample_rows_2x(src, torch.empty(n, h, 2 * w, c, dtype=dtype, device=source.device), mix)
    out = target.permute(0, 2, 3, 1)  # (N, 2h, 2w, C), a view of target
    block = torch.empty(n, min(rows, h), 2 * w, c, dtype=dtype, device=source.device)
    out[:, 0].add_(wide[:, 0])  # the outermost rows copy the border row
    out[:, -1].add_(wide[:, -1])
    for start in range(1, h, rows):  # even output rows 2i, 1 <= i < h: 3/4 row i + 1/4 row i - 1
        stop = min(h, start + rows)
        piece = mix(wide[:, start:stop], wide[:, start - 1 : stop - 1], block[:, : stop - start])
        out[:, 2 * start : 2 * stop : 2].add_(piece)
    for start in range(0, h - 1, rows):  # odd output rows 2i + 1, 0 <= i < h - 1: 3/4 row i + 1/4 row i + 1
        stop = min(h - 1, start + rows)
        piece = mix(wide[:, start:stop], wide[:, start + 1 : stop + 1], block[:, : stop - start])
        out[:, 2 * start + 1 : 2 * stop + 1 : 2].add_(piece)
    return target
