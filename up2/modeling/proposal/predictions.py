"""What the proposal decoder predicts, and the small heads it predicts with (paper §4.1, App. A).

Shape shorthand (see ``up2.structures``):
    N  images        X  queries of a stage (Q matching, T denoising, or both)
    D  width         Hm, Wm  mask-feature size (stride 4)

Masks are carried as mask embeddings (N, X, D) next to the shared mask features
(N, D, Hm, Wm); their logits are the dot product of the two, computed where they are consumed
(:meth:`ProposalPredictions.mask_logits` in the criterion and the matcher for every query in
training; ``ProposalOutput.masks_of`` for the R regional proposals of the image encoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from up2.modeling.proposal.denoising import DenoisingQueries

__all__ = ["MLP", "ProposalDecoderOutput", "ProposalPredictions", "inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [eps, 1 - eps] (same shape and dtype as ``x``)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between: in_dim -> hidden_dim ... -> out_dim.

    Input (..., in_dim) float -> output (..., out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass
class ProposalPredictions:
    """Predictions of one supervised stage for a set of queries.

    Attributes:
        objectness: (N, X) float foreground logits.
        boxes: (N, X, 4) float, normalised cxcywh in (0, 1).
        masks: (N, X, Hm, Wm) float mask logits when given as such (e.g. by a test), else None:
            the decoder sets ``mask_embed`` and ``mask_features`` instead.
        mask_embed: (N, X, D) float mask embeddings, or None (a stage without a mask head: the
            decoder's intermediate layers when it runs without targets).
        mask_features: (N, D, Hm, Wm) float stride-4 mask features shared by all stages, or None.
    """

    objectness: torch.Tensor
    boxes: torch.Tensor
    masks: Optional[torch.Tensor] = None
    mask_embed: Optional[torch.Tensor] = None
    mask_features: Optional[torch.Tensor] = None

    def mask_logits(self) -> Optional[torch.Tensor]:
        """(N, X, Hm, Wm) float mask logits: ``masks`` when set, else ``mask_embed · mask_features``
        (one (X, D) x (D, Hm*Wm) product per image); None when the stage has no masks."""
        if self.masks is not None:
            return self.masks
        if self.mask_embed is None or self.mask_features is None:
            return None
        return torch.einsum("nqd,ndhw->nqhw", self.mask_embed, self.mask_features)

    def part(self, queries: slice) -> "ProposalPredictions":
        """The predictions of the queries ``queries`` (a slice of the X): same fields, sliced."""
        def cut(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[:, queries]

        return ProposalPredictions(cut(self.objectness), cut(self.boxes), cut(self.masks), cut(self.mask_embed),
                                   self.mask_features)


@dataclass
class ProposalDecoderOutput:
    """Everything the decoder produces for one batch.

    Attributes:
        interm: predictions of the query-selection head on the Q selected pixels.
        layers: ``num_layers + 1`` predictions of the matching queries: on the initial queries,
            then after each decoder layer (the last is the network's output).
        query_features: (N, Q, D) float, q^sem: the last layer's queries after the final norm.
        dn_layers: ``num_layers + 1`` predictions of the T denoising queries, or None.
        denoising: the denoising queries that were used, or None.
    """

    interm: ProposalPredictions
    layers: List[ProposalPredictions]
    query_features: torch.Tensor
    dn_layers: Optional[List[ProposalPredictions]] = None
    denoising: Optional[DenoisingQueries] = None
