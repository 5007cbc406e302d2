"""FLOP counts for the speed benchmark. One multiply-add counts as one flop (fvcore's convention).

* ``count_flops``: fvcore's jit-trace counter (detectron2's wrapper for models that take a list
  of dicts), with handles for ops fvcore lacks: scaled dot-product attention, ``baddbmm`` and
  up2's compiled deformable attention. Ops without a handle count 0 and are listed.
* ``count_flops_dispatch``: ``torch.utils.flop_counter`` at the dispatcher, for calls whose
  outputs leave a traced graph (generated token ids).

Tracing turns image sizes into 0-dim tensors. up2's mask pasting takes Python ints, so while
counting, every task's ``paste_masks`` is wrapped to convert its sizes (``_int_paste_sizes``);
the model itself is left as it was.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class Call(nn.Module):
    """A module whose forward is ``fn(*inputs)``; ``owner`` (the model) is a submodule, so tracing sees it."""

    def __init__(self, owner: nn.Module, fn):
        super().__init__()
        self.owner = owner
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


def _shape(value):
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def _sdpa_flops(inputs, outputs) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): L*S*E for q k^T plus L*S*Ev for the weighted sum."""
    q, k, v = (_shape(x) for x in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _baddbmm_flops(inputs, outputs) -> int:
    """baddbmm(input, b1 (B, n, m), b2 (B, m, p)): B*n*m*p."""
    (b, n, m), p = _shape(inputs[1]), _shape(inputs[2])[-1]
    return b * n * m * p


def _msda_flops(inputs, outputs) -> int:
    """up2's compiled or Triton deformable attention (a traced PythonOp): value (N, S, M, D), sampling
    locations (N, Q, M, L, P, 2): 4 per sampled channel, as fvcore counts the bilinear
    ``grid_sample`` of the PyTorch path."""
    shapes = [s for s in (_shape(x) for x in inputs) if s is not None]
    value = next(s for s in shapes if len(s) == 4)
    locations = next(s for s in shapes if len(s) == 6)
    return 4 * math.prod(locations[:-1]) * value[-1]


HANDLES = {"aten::scaled_dot_product_attention": _sdpa_flops, "aten::baddbmm": _baddbmm_flops,
           "prim::PythonOp._CompiledMSDA": _msda_flops, "prim::PythonOp._TritonMSDA": _msda_flops}


@contextlib.contextmanager
def _int_paste_sizes(module: nn.Module):
    """Inside the block, the ``paste_masks(logits, size, padded, out)`` of every task of every
    up2 model under ``module`` gets its sizes as Python ints (traced sizes are 0-dim tensors)."""
    def as_ints(paste):
        def paste_int(logits, size, padded, out, *args, **kwargs):
            size, padded, out = (tuple(int(v) for v in pair) for pair in (size, padded, out))
            return paste(logits, size, padded, out, *args, **kwargs)
        return paste_int

    patched = []
    for m in module.modules():
        for task in (getattr(m, "tasks", None) or {}).values():
            if callable(getattr(task, "paste_masks", None)) and "paste_masks" not in vars(task):
                task.paste_masks = as_ints(task.paste_masks)
                patched.append(task)
    try:
        yield
    finally:
        for task in patched:
            del task.paste_masks  # the class's method shows through again


def count_flops(module: nn.Module, inputs: tuple, detectron2_style: bool) -> dict:
    """Traces ``module(*inputs)`` (``detectron2_style``: ``module(inputs[0])`` with a list of dicts).

    Returns:
        {"gflops": count / 1e9, "unsupported": {op: times seen}} or {"error": message}.
    """
    from detectron2.utils.analysis import FlopCountAnalysis as D2Flops
    from fvcore.nn import FlopCountAnalysis

    try:
        with torch.no_grad(), _int_paste_sizes(module):
            flops = D2Flops(module, inputs[0]) if detectron2_style else FlopCountAnalysis(module, inputs)
            flops.set_op_handle(**HANDLES)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            return {"gflops": flops.total() / 1e9, "unsupported": dict(flops.unsupported_ops())}
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def count_flops_dispatch(model: nn.Module, fn) -> dict:
    """Multiply-adds of ``fn()`` by ``torch.utils.flop_counter`` (which counts 2 per multiply-add;
    halved here). ``model``'s parameters stop requiring grad while counting, then are restored."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    needs = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in needs:
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            fn()
    finally:
        for p in needs:
            p.requires_grad_(True)
    return {"gflops": counter.get_total_flops() / 2e9, "unsupported": {}}
