"""Where up2's detection + segmentation time goes: wall time per component, measured by forward
hooks on the model's submodules (and wrapped methods), so no model code changes.

Top-level components count only while no other top-level component runs (the outermost wins),
so they add up to at most the total; the deformable-attention lines (indented) are counted
inside their parent wherever they run.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

COMPONENTS = ("backbone", "pixel decoder", "  of which MSDA (pixel decoder)", "proposal decoder",
              "  of which MSDA (proposal decoder)", "image tokens", "text encoder + g on class names (target set)",
              "unified decoder", "post-processing")
OTHER = "other (preprocess, likelihood, gathers)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class ComponentTimer:
    """Seconds per component name (``totals``) over the calls made while it is attached."""

    def __init__(self, device: str):
        self.device = device
        self.totals = defaultdict(float)
        self.active = None
        self.handles, self.wrapped = [], []

    def _enter(self, name, sub):
        if not sub and self.active is not None:
            return None
        _sync(self.device)
        self.active = self.active if sub else name
        return time.perf_counter()

    def _exit(self, name, sub, t0):
        if t0 is None:
            return
        _sync(self.device)
        self.totals[name] += time.perf_counter() - t0
        if not sub:
            self.active = None

    def module(self, name: str, module: nn.Module, sub: bool = False) -> None:
        starts = []
        self.handles.append(module.register_forward_pre_hook(lambda m, a: starts.append(self._enter(name, sub))))
        self.handles.append(module.register_forward_hook(lambda m, a, o: self._exit(name, sub, starts.pop())))

    def method(self, name: str, obj, attr: str) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = self._enter(name, False)
            try:
                return original(*args, **kwargs)
            finally:
                self._exit(name, False, t0)

        setattr(obj, attr, timed)
        self.wrapped.append((obj, attr))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for obj, attr in self.wrapped:
            delattr(obj, attr)  # the instance attribute shadowed the class's method


def _timed_calls(model, task: str, inputs, device: str, n: int):
    from up2.layers.msda import MSDeformAttn

    timer, net = ComponentTimer(device), model.proposal_network
    for name, module in (("backbone", model.backbone), ("pixel decoder", net.pixel_decoder),
                         ("proposal decoder", net.decoder), ("image tokens", model.image_encoder),
                         ("unified decoder", model.unified_decoder)):
        timer.module(name, module)
    timer.method("text encoder + g on class names (target set)", model, "embed_targets")
    timer.method("post-processing", model.tasks[task], "postprocess")
    for name, part in (("  of which MSDA (pixel decoder)", net.pixel_decoder),
                       ("  of which MSDA (proposal decoder)", net.decoder)):
        for m in part.modules():
            if isinstance(m, MSDeformAttn):
                timer.module(name, m, sub=True)
    total = 0.0
    try:
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            model(inputs, task=task)
            _sync(device)
            total += time.perf_counter() - t0
    finally:
        timer.close()
    parts = {k: timer.totals.get(k, 0.0) / n for k in COMPONENTS}
    parts[OTHER] = max(total / n - sum(v for k, v in parts.items() if not k.startswith(" ")), 0.0)
    return total / n, parts


def profile_up2(model, task: str, inputs, device: str, repeats: int) -> dict:
    """Mean seconds per call of each component over ``repeats`` calls of ``model(inputs,
    task=task)`` after one warm-up call (which embeds the class names; the timed calls reuse them).

    Returns:
        {"total_s": s, "components_s": {component: s}}.
    """
    with torch.inference_mode():
        model(inputs, task=task)
        total, parts = _timed_calls(model, task, inputs, device, repeats)
    return {"total_s": total, "components_s": parts}


def profile_table(profiles: dict):
    """(headers, rows) of ``{where: profile_up2(...)}`` for tabulate."""
    rows = []
    for where, p in profiles.items():
        rows += [[where, k, f"{s:.3f}", f"{100 * s / p['total_s']:.1f}%"] for k, s in p["components_s"].items()]
        rows.append([where, "total", f"{p['total_s']:.3f}", "100%"])
    return ["where", "component", "s/img", "share"], rows
