"""Triton kernels of multi-scale deformable attention, forward and backward (shapes as in
``up2.layers.msda``), the GPU path of ``ms_deform_attn_core``.

Semantics are those of ``reference.ms_deform_attn_core_pytorch``: for query q, head m, level l
(h_l x w_l pixels) and point p, the normalised location (x, y) maps to pixel coordinates
``(x * w_l - 0.5, y * h_l - 0.5)`` (pixel centres at (i + 0.5) / size); the value of head m is
sampled bilinearly there from its four neighbouring pixels, a neighbour outside the map reading
0; samples are weighted by A[q, m, l, p] and summed over (l, p).

One program handles ``BLOCK_Q`` queries of one (image, head) pair and all ``Dh`` channels of
that head (``BLOCK_D`` = the next power of two >= Dh). Levels are a loop and the P points of a
level are unrolled (P gathers in flight; unrolling the levels too made the compiled code four
times larger for L = 4); level sizes are read from the ``(L, 2)`` int ``spatial_shapes``
tensor on the device and the level offsets in S are their running sum, so a launch needs no
host value beyond tensor shapes.

Dtypes: value, locations and weights are each read in their own dtype (float32, bfloat16,
float16 or float64) and computed in float32 (float64 when any of them is float64). The output
is written in ``value``'s dtype. In the backward pass the value gradient is accumulated with
atomic adds into a float32 (float64) buffer, cast to ``value``'s dtype at the end; location and
weight gradients are written once each, in their inputs' dtypes. Atomic adds make the value
gradient's summation order, hence its last bits, vary from run to run.

Launch configuration: ``LaunchConfig`` (queries per program, warps). ``config=None`` autotunes
over ``AUTOTUNE_CONFIGS`` on a GPU (once per head width, level and point count, query-count
power of two and dtypes) and uses ``DEFAULT_CONFIG`` under ``TRITON_INTERPRET=1``, where
autotuning cannot run. Whether the kernels run interpreted is fixed when this module is
imported (``triton.jit`` reads ``TRITON_INTERPRET`` then; ``triton.language``'s own helpers
are fixed when ``triton`` is first imported, so the interpreter must be on from the start of
the process).

Importing this module imports ``triton`` (``ImportError`` where it is not installed).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = [
    "AUTOTUNE_CONFIGS", "DEFAULT_CONFIG", "INTERPRETED", "LaunchConfig", "interpreter_on", "msda_backward",
    "msda_forward",
]



def interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter now, read as ``triton.jit`` reads it."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED: bool = interpreter_on()
"""Whether the kernels were jitted for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""


@dataclass(frozen=True)
class LaunchConfig:
    """A fixed launch configuration: ``block_q`` queries per program (a power of two), ``num_warps``."""

    block_q: int = 32
    num_warps: int = 4

    def __post_init__(self):
        if self.block_q < 1 or self.block_q & (self.block_q - 1):
            raise ValueError(f"LaunchConfig.block_q must be a positive power of two, got {self.block_q}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"LaunchConfig.num_warps must be a positive power of two, got {self.num_warps}")


DEFAULT_CONFIG = LaunchConfig(block_q=16, num_warps=4)
"""Used when not autotuning (``TRITON_INTERPRET=1``, or a caller's explicit choice)."""

AUTOTUNE_CONFIGS = tuple(
    LaunchConfig(block_q=bq, num_warps=nw) for bq, nw in ((16, 2), (32, 4), (64, 4), (64, 8), (128, 8))
)


@triton.jit
def _neighbours(loc_ptr, lp, q_ok, h, w, start, row, d, d_ok, ACC: tl.constexpr):
    """The four pixels around the samples ``lp`` of a level (h x w pixels, first pixel ``start``):
    the fractional offsets (fx, fy), then the element offsets in value of pixels (x0, y0),
    (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1) and channels ``d``, then their masks (pixel
    inside the map, query and channel in range)."""
    wf = w.to(ACC)
    hf = h.to(ACC)
    # pixel coordinates; clamped far outside, where every neighbour is outside either way, so
    # that floor() fits in int32
    x = tl.load(loc_ptr + 2 * lp, mask=q_ok, other=0.0).to(ACC) * wf - 0.5
    y = tl.load(loc_ptr + 2 * lp + 1, mask=q_ok, other=0.0).to(ACC) * hf - 0.5
    x = tl.minimum(tl.maximum(x, -2.0), wf + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), hf + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    in_x0 = (x0 >= 0) & (x0 < w)
    in_x1 = (x0 + 1 >= 0) & (x0 + 1 < w)
    in_y0 = q_ok & (y0 >= 0) & (y0 < h)
    in_y1 = q_ok & (y0 + 1 >= 0) & (y0 + 1 < h)
    px = start + y0 * w + x0
    off00 = (px * row)[:, None] + d[None, :]
    off10 = off00 + row
    off01 = off00 + w * row
    off11 = off01 + row
    ok00 = (in_y0 & in_x0)[:, None] & d_ok[None, :]
    ok10 = (in_y0 & in_x1)[:, None] & d_ok[None, :]
    ok01 = (in_y1 & in_x0)[:, None] & d_ok[None, :]
    ok11 = (in_y1 & in_x1)[:, None] & d_ok[None, :]
    return x - x0f, y - y0f, off00, off10, off01, off11, ok00, ok10, ok01, ok11


@triton.jit
def _corner_values(v_base, off00, off10, off01, off11, ok00, ok10, ok01, ok11, ACC: tl.constexpr):
    """The four bilinear neighbours' values (BLOCK_Q, BLOCK_D) in ACC; 0 outside the map."""
    v00 = tl.load(v_base + off00, mask=ok00, other=0.0).to(ACC)
    v10 = tl.load(v_base + off10, mask=ok10, other=0.0).to(ACC)
    v01 = tl.load(v_base + off01, mask=ok01, other=0.0).to(ACC)
    v11 = tl.load(v_base + off11, mask=ok11, other=0.0).to(ACC)
    return v00, v10, v01, v11


@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, loc_ptr, attn_ptr, out_ptr,
    S, LQ, M, DH, LQ_BUCKET,
    L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // M
    m = pid_nm % M
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < LQ
    d_ok = d < DH
    row = M * DH  # elements per pixel of value
    v_base = value_ptr + n.to(tl.int64) * S * row + m * DH
    qm = (n.to(tl.int64) * LQ + q) * M + m  # (BLOCK_Q,) flat (n, q, m) index
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
    start = 0  # first pixel of the level in S
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        for pt in tl.static_range(P):
            lp = qm * (L * P) + lvl * P + pt
            a = tl.load(attn_ptr + lp, mask=q_ok, other=0.0).to(ACC)
            fx, fy, off00, off10, off01, off11, ok00, ok10, ok01, ok11 = _neighbours(
                loc_ptr, lp, q_ok, h, w, start, row, d, d_ok, ACC)
            v00, v10, v01, v11 = _corner_values(v_base, off00, off10, off01, off11, ok00, ok10, ok01, ok11, ACC)
            top = v00 + fx[:, None] * (v10 - v00)
            bottom = v01 + fx[:, None] * (v11 - v01)
            acc += a[:, None] * (top + fy[:, None] * (bottom - top))
        start += h * w
    out_ptrs = out_ptr + (qm * DH)[:, None] + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _msda_bwd_kernel(
    grad_out_ptr, value_ptr, shapes_ptr, loc_ptr, attn_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    S, LQ, M, DH, LQ_BUCKET,
    L: tl.constexpr, P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // M
    m = pid_nm % M
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < LQ
    d_ok = d < DH
    row = M * DH
    image = n.to(tl.int64) * S * row + m * DH
    v_base = value_ptr + image
    gv_base = grad_value_ptr + image
    qm = (n.to(tl.int64) * LQ + q) * M + m
    go = tl.load(grad_out_ptr + (qm * DH)[:, None] + d[None, :], mask=q_ok[:, None] & d_ok[None, :],
                 other=0.0).to(ACC)
    start = 0  # first pixel of the level in S
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        w = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        for pt in tl.static_range(P):
            lp = qm * (L * P) + lvl * P + pt
            a = tl.load(attn_ptr + lp, mask=q_ok, other=0.0).to(ACC)
            fx, fy, off00, off10, off01, off11, ok00, ok10, ok01, ok11 = _neighbours(
                loc_ptr, lp, q_ok, h, w, start, row, d, d_ok, ACC)
            v00, v10, v01, v11 = _corner_values(v_base, off00, off10, off01, off11, ok00, ok10, ok01, ok11, ACC)
            top = v00 + fx[:, None] * (v10 - v00)
            bottom = v01 + fx[:, None] * (v11 - v01)
            sampled = top + fy[:, None] * (bottom - top)
            # d sample / d x and d y in pixels; x = loc_x * w - 0.5, so d / d loc_x = w * d / d x
            dx = (v10 - v00) + fy[:, None] * ((v11 - v01) - (v10 - v00))
            dy = bottom - top
            tl.store(grad_attn_ptr + lp, tl.sum(go * sampled, axis=1).to(grad_attn_ptr.dtype.element_ty), mask=q_ok)
            g_x = a * w.to(ACC) * tl.sum(go * dx, axis=1)
            g_y = a * h.to(ACC) * tl.sum(go * dy, axis=1)
            tl.store(grad_loc_ptr + 2 * lp, g_x.to(grad_loc_ptr.dtype.element_ty), mask=q_ok)
            tl.store(grad_loc_ptr + 2 * lp + 1, g_y.to(grad_loc_ptr.dtype.element_ty), mask=q_ok)
            ga = a[:, None] * go
            gfy = ga * fy[:, None]
            gtop = ga - gfy  # a * (1 - fy) * go
            tl.atomic_add(gv_base + off00, gtop - gtop * fx[:, None], mask=ok00)
            tl.atomic_add(gv_base + off10, gtop * fx[:, None], mask=ok10)
            tl.atomic_add(gv_base + off01, gfy - gfy * fx[:, None], mask=ok01)
            tl.atomic_add(gv_base + off11, gfy * fx[:, None], mask=ok11)
        start += h * w


def _triton_configs():
    return [triton.Config({"BLOCK_Q": c.block_q}, num_warps=c.num_warps) for c in AUTOTUNE_CONFIGS]


_KEY = ["DH", "LQ_BUCKET", "L", "P"]
_fwd_autotuned = triton.autotune(configs=_triton_configs(), key=_KEY)(_msda_fwd_kernel)
_bwd_autotuned = triton.autotune(configs=_triton_configs(), key=_KEY, reset_to_zero=["grad_value_ptr"])(
    _msda_bwd_kernel
)


def _acc_dtype(*tensors: torch.Tensor):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _launch_context(t: torch.Tensor):
    """Run on the device of ``t`` (Triton launches on the current CUDA device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton MSDA kernels got CPU tensors but were jitted for GPUs: set TRITON_INTERPRET=1 "
            "before up2.layers.msda.triton_kernels is first imported to run them on the CPU"
        )
    return contextlib.nullcontext()


def _launch(tuned, plain, grid_args, args, config: Optional[LaunchConfig], n_programs_nm: int, lq: int):
    if config is None and not INTERPRETED:
        tuned[lambda meta: (triton.cdiv(lq, meta["BLOCK_Q"]), n_programs_nm)](*args, **grid_args)
    else:
        cfg = config or DEFAULT_CONFIG
        plain[(triton.cdiv(lq, cfg.block_q), n_programs_nm)](
            *args, **grid_args, BLOCK_Q=cfg.block_q, num_warps=cfg.num_warps
        )


def _sizes(value: torch.Tensor, spatial_shapes: torch.Tensor, loc: torch.Tensor):
    n, s, m, dh = value.shape
    lq, lv, p = loc.shape[1], loc.shape[3], loc.shape[4]
    if tuple(spatial_shapes.shape) != (lv, 2):
        raise ValueError(f"spatial_shapes must be (L={lv}, 2), got {tuple(spatial_shapes.shape)}")
    if spatial_shapes.device != value.device or spatial_shapes.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"spatial_shapes must be an int32/int64 tensor on {value.device}, got {spatial_shapes.dtype} "
            f"on {spatial_shapes.device}"
        )
    return n, s, m, dh, lq, lv, p


def msda_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    config: Optional[LaunchConfig] = None,
) -> torch.Tensor:
    """Forward of the op (no input checks beyond ``spatial_shapes``; use ``ms_deform_attn_core``).

    Args:
        value: (N, S, M, Dh) float, contiguous.
        spatial_shapes: (L, 2) int32/int64 (h, w) in pixels, on ``value``'s device.
        sampling_locations: (N, Lq, M, L, P, 2) float, contiguous, normalised (x, y).
        attention_weights: (N, Lq, M, L, P) float, contiguous.
        config: a fixed ``LaunchConfig``; None autotunes on a GPU (``DEFAULT_CONFIG`` when interpreted).

    Returns:
        (N, Lq, M * Dh) in ``value``'s dtype.

    Raises:
        ValueError: ``spatial_shapes`` of the wrong shape, dtype or device.
        RuntimeError: CPU tensors while the kernels were not jitted for the interpreter.
    """
    n, s, m, dh, lq, lv, p = _sizes(value, spatial_shapes, sampling_locations)
    out = value.new_empty(n, lq, m * dh)
    if out.numel() == 0:
        return out.zero_()
    meta = dict(L=lv, P=p, BLOCK_D=triton.next_power_of_2(dh),
                ACC=_acc_dtype(value, sampling_locations, attention_weights))
    args = (value, spatial_shapes, sampling_locations, attention_weights, out, s, lq, m, dh,
            triton.next_power_of_2(lq))
    with _launch_context(value):
        _launch(_fwd_autotuned, _msda_fwd_kernel, meta, args, config, n * m, lq)
    return out


def msda_backward(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    config: Optional[LaunchConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``msda_forward``'s output w.r.t. value, sampling locations and attention weights.

    Args:
        grad_out: (N, Lq, M * Dh) float, contiguous; the other arguments as ``msda_forward``.

    Returns:
        (grad_value (N, S, M, Dh), grad_locations (N, Lq, M, L, P, 2), grad_weights (N, Lq, M, L, P)),
        each in the dtype of its input. The gradient w.r.t. a location is the one-sided (right)
        derivative where it falls on a pixel centre, as ``F.grid_sample``'s.

    Raises:
        ValueError / RuntimeError: as ``msda_forward``.
    """
    n, s, m, dh, lq, lv, p = _sizes(value, spatial_shapes, sampling_locations)
    acc = _acc_dtype(grad_out, value, sampling_locations, attention_weights)
    acc_torch = torch.float64 if acc == tl.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=acc_torch, device=value.device)
    grad_loc = torch.empty_like(sampling_locations)
    grad_attn = torch.empty_like(attention_weights)
    if grad_out.numel() == 0:
        return grad_value.to(value.dtype), grad_loc.zero_(), grad_attn.zero_()
    meta = dict(L=lv, P=p, BLOCK_D=triton.next_power_of_2(dh), ACC=acc)
    args = (grad_out, value, spatial_shapes, sampling_locations, attention_weights, grad_value, grad_loc, grad_attn,
            s, lq, m, dh, triton.next_power_of_2(lq))
    with _launch_context(value):
        _launch(_bwd_autotuned, _msda_bwd_kernel, meta, args, config, n * m, lq)
    return grad_value.to(value.dtype), grad_loc, grad_attn
