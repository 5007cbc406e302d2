"""Parameter counts of a model: all parameters, and the paper's deployment convention (Tab. 6)."""
from __future__ import annotations

from typing import Dict, NamedTuple

from torch import nn

__all__ = ["ParameterCounts", "parameter_counts"]


class ParameterCounts(NamedTuple):
    """Numbers of scalar parameters (not bytes).

    full: every parameter. deployment: each conditional MoE layer counted with k of its E experts
    (k = top-k), the paper's convention for "Uni-Perceiver-v2 BASE = 308M" (Tab. 6).
    parts: full count per top-level child module (``backbone``, ``text_encoder``, ...).
    """

    full: int
    deployment: int
    parts: Dict[str, int]


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Count the parameters of ``model`` (works on the meta device: only shapes are read).

    Shared parameters are counted once (``nn.Module.parameters`` deduplicates them).
    """
    from up2.modeling.moe import ConditionalMoE

    full = sum(p.numel() for p in model.parameters())
    unused = 0
    for m in model.modules():
        if isinstance(m, ConditionalMoE):
            per_expert = sum(p[0].numel() for p in (m.w1, m.b1, m.w2, m.b2))
            unused += (m.num_experts - m.top_k) * per_expert
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return ParameterCounts(full, full - unused, parts)
