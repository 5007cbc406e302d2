"""The unified likelihood: cosine similarity over a learnable temperature (paper Eq. 5-7).

Shape shorthand: X inputs (any leading shape), C candidate targets, d width.
"""
from __future__ import annotations

import math
from typing import Optional, Set

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

__all__ = ["Likelihood"]


class Likelihood(nn.Module):
    """``logits = cos(x, y) / tau`` with a learnable tau > 0 (Eq. 6), and the loss of Eq. 7.

    tau is stored as ``log(1 / tau)`` and clamped to tau >= ``min_temperature`` so logits stay bounded.
    Logits are computed in float32 even under autocast.
    """

    @configurable
    def __init__(self, *, init_temperature: float = 0.07, min_temperature: float = 0.01):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"UNIFIED_DECODER.INIT_TEMPERATURE must be > 0, got {init_temperature}")
        self.log_inv_tau = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_inv_tau = math.log(1.0 / min_temperature)

    @classmethod
    def from_config(cls, cfg):
        return {"init_temperature": cfg.MODEL.UNIFIED_DECODER.INIT_TEMPERATURE}

    def no_weight_decay(self) -> Set[str]:
        """tau is not decayed (``up2.solver.weight_decay``): decay would pull log(1/tau) to 0, tau to 1."""
        return {"log_inv_tau"}

    @property
    def temperature(self) -> torch.Tensor:
        """tau, a 0-dim float tensor."""
        return torch.exp(-self.log_inv_tau.clamp(max=self.max_log_inv_tau))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Similarity logits.

        Args:
            x: (..., d) input features from g (any dtype).
            y: (C, d) target features from g.

        Returns:
            (..., C) float32 logits ``cos(x, y) / tau``.
        """
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(f"input width {x.shape[-1]} != target width {y.shape[-1]}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1)
            y = F.normalize(y.float(), dim=-1)
            scale = self.log_inv_tau.float().clamp(max=self.max_log_inv_tau).exp()
            return scale * x @ y.t()

    @staticmethod
    def loss(logits: torch.Tensor, target: torch.Tensor, weight: float = 1.0,
             valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Eq. 7 for one task: ``w_k * mean(-log softmax(logits)[target])``.

        Args:
            logits: (M, C) float32. target: (M,) int64 in [0, C). weight: w_k.
            valid: (M,) bool or None: the mean runs over the rows where it is True (a row mask
                that needs no host synchronisation, unlike selecting the rows).

        Returns:
            0-dim float. With M = 0 (or no valid row) it is an exact zero that is still connected
            to ``logits`` (so every rank produces the same graph under DDP).
        """
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        if valid is None:
            return weight * F.cross_entropy(logits, target)
        nll = F.cross_entropy(logits, target, reduction="none")
        valid = valid.to(nll.dtype)
        return weight * (nll * valid).sum() / valid.sum().clamp(min=1.0)
