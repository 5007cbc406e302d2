"""Conditional mixture-of-experts FFN with attribute-level routing (paper §4.3, §5.2;
Uni-Perceiver-MoE, Zhu et al. 2022).

Shape shorthand: B sequences, T tokens, N = B*T tokens, d width, f FFN hidden width,
E experts, k experts per token (top-k), A attribute width, G distinct attribute rows.

Every FFN of the unified decoder can be replaced by E expert FFNs. A gate picks k of them per
token from the token's ATTRIBUTE vector (``up2.modeling.token_attributes``: modality, role,
attention, task family), never from its content. Tokens with equal attributes therefore route
alike, and dispatch is done per attribute group: the gate runs once per distinct attribute
row, and each group's k experts run densely (one batched matmul) on all of its tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConditionalMoE", "switch_balance_loss"]


def switch_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` over attribute groups.

    ``f_e`` is the fraction of token-to-expert assignments that go to expert e (each token has
    k assignments; no gradient), ``P_e`` the mean gate probability of expert e over tokens.
    Both are token-weighted, so the result equals the per-token definition. It is 1 when the
    load is uniform and grows to E when one expert takes everything (k = 1).

    Args:
        probs: (G, E) float, softmax gate probabilities of each group.
        expert_idx: (G, k) int64, experts chosen for each group.
        counts: (G,) number of tokens in each group.

    Returns:
        0-dim float tensor (differentiable w.r.t. ``probs``).
    """
    G, E = probs.shape
    k = expert_idx.shape[1]
    counts = counts.to(probs.dtype)
    total = counts.sum()
    mean_prob = (counts[:, None] * probs).sum(0) / total  # (E,)
    load = torch.zeros(E, dtype=probs.dtype, device=probs.device)
    load.index_add_(0, expert_idx.reshape(-1), counts.repeat_interleave(k))
    load = load / (total * k)  # (E,), sums to 1
    return E * (load.detach() * mean_prob).sum()


class ConditionalMoE(nn.Module):
    """E expert FFNs (Linear-GELU-Linear) with a top-k gate on token attributes.

    ``y_t = sum_{e in topk(g(a_t))} w_{t,e} FFN_e(x_t)`` with ``g(a) = W_g a + b_g`` (E logits)
    and ``w_t = softmax`` over the k selected logits (weights sum to 1; with k = 1 the token
    goes through one expert with weight 1, so E = 1 is exactly a dense FFN). The gate is
    computed in float32 even under autocast.

    Expert weights are stored batched: ``w1`` (E, d, f), ``b1`` (E, f), ``w2`` (E, f, d),
    ``b2`` (E, d); initialised like ``nn.Linear``. Experts not chosen by any token of a batch
    receive no gradient from it (zero rows in ``.grad``).

    Load balancing: with ``balance_loss_weight > 0`` every forward returns
    ``balance_loss_weight * switch_balance_loss`` (computed over all tokens, padding included,
    since padding is routed like its attributes) next to its output; g sums it over layers and
    the meta-architecture adds the sum over every pass through g (inputs and targets) to the
    training losses. The module keeps no state between calls.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int,
        attribute_dim: int,
        dropout: float = 0.0,
        balance_loss_weight: float = 0.0,
    ):
        """
        Args:
            embed_dim: d. ffn_dim: f, hidden width of each expert.
            num_experts: E >= 1. top_k: k in [1, E].
            attribute_dim: A, width of the attribute vectors given to ``forward``.
            dropout: dropout on the expert hidden activations (as the dense FFN).
            balance_loss_weight: weight of the switch load-balancing loss (0 disables it).

        Raises:
            ValueError: a size < 1, top_k > num_experts, dropout outside [0, 1) or a negative
                balance_loss_weight.
        """
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("ffn_dim", ffn_dim), ("num_experts", num_experts),
                            ("top_k", top_k), ("attribute_dim", attribute_dim)):
            if value < 1:
                raise ValueError(f"ConditionalMoE: {name} must be >= 1, got {value}")
        if top_k > num_experts:
            raise ValueError(
                f"ConditionalMoE: top_k={top_k} exceeds num_experts={num_experts} (need MOE.TOP_K <= MOE.NUM_EXPERTS)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ConditionalMoE: dropout must be in [0, 1), got {dropout}")
        if balance_loss_weight < 0:
            raise ValueError(f"ConditionalMoE: balance_loss_weight must be >= 0, got {balance_loss_weight}")
        self.embed_dim, self.ffn_dim = embed_dim, ffn_dim
        self.num_experts, self.top_k, self.attribute_dim = num_experts, top_k, attribute_dim
        self.balance_loss_weight = float(balance_loss_weight)
        self.w1 = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, embed_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.gate = nn.Linear(attribute_dim, num_experts)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts as ``nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        for w, b, fan_in in ((self.w1, self.b1, self.embed_dim), (self.w2, self.b2, self.ffn_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.gate.reset_parameters()

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, attribute_dim={self.attribute_dim}, "
                f"balance_loss_weight={self.balance_loss_weight}")

    def _gate(self, groups: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G, A) attribute rows -> probs (G, E) fp32, expert_idx (G, k) int64, weights (G, k) fp32."""
        with torch.autocast(device_type=groups.device.type, enabled=False):
            logits = F.linear(groups.float(), self.gate.weight.float(), self.gate.bias.float())
        top_logits, expert_idx = logits.topk(self.top_k, dim=-1)
        return logits.softmax(-1), expert_idx, top_logits.softmax(-1)

    def _check_attributes(self, x: torch.Tensor, attributes: Optional[torch.Tensor]) -> None:
        if attributes is None:
            raise ValueError(
                "ConditionalMoE routes on token attributes, but TokenBatch.attributes is None: build them "
                "with up2.modeling.token_attributes (constant_attributes / concat_attributes)"
            )
        if attributes.shape != (*x.shape[:-1], self.attribute_dim):
            raise ValueError(
                f"TokenBatch.attributes has shape {tuple(attributes.shape)}, expected "
                f"{(*x.shape[:-1], self.attribute_dim)} (tokens {tuple(x.shape)}, A={self.attribute_dim})"
            )

    def route(self, attributes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Routing decision of every token (depends on ``attributes`` only).

        Args:
            attributes: (..., A) float.

        Returns:
            expert_idx (..., k) int64 and weights (..., k) float32 (sum to 1 over k), ordered by
            decreasing gate logit.

        Raises:
            ValueError: last dim of ``attributes`` is not A.
        """
        if attributes.shape[-1] != self.attribute_dim:
            raise ValueError(f"attributes last dim {attributes.shape[-1]} != attribute_dim {self.attribute_dim}")
        _, expert_idx, weights = self._gate(attributes.reshape(-1, self.attribute_dim))
        lead = attributes.shape[:-1]
        return expert_idx.reshape(*lead, self.top_k), weights.reshape(*lead, self.top_k)

    def forward(self, x: torch.Tensor, attributes: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Apply the routed experts.

        Args:
            x: (B, T, d) float tokens (any leading shape works: (..., d)).
            attributes: (B, T, A) float routing attributes, same leading shape as ``x``.

        Returns:
            ((B, T, d), the dtype the experts' matmuls produce (x's dtype, or the autocast
            dtype); the weighted balance loss, 0-dim float32, or None when its weight is 0).

        Raises:
            ValueError: ``attributes`` is None or its shape does not match ``x`` and A.
        """
        self._check_attributes(x, attributes)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"ConditionalMoE: token width {x.shape[-1]} != embed_dim {self.embed_dim}")
        lead = x.shape[:-1]
        x_flat = x.reshape(-1, self.embed_dim)
        if x_flat.shape[0] == 0:
            return x.clone(), None
        groups, inverse, counts = torch.unique(
            attributes.reshape(-1, self.attribute_dim), dim=0, return_inverse=True, return_counts=True
        )
        probs, expert_idx, weights = self._gate(groups)  # (G, E), (G, k), (G, k)
        # Sort tokens by group so each group is one contiguous slice (no per-token loop).
        order = torch.argsort(inverse, stable=True)
        chunks = x_flat[order].split(counts.tolist())
        outputs = []
        for g, chunk in enumerate(chunks):  # loop over the few distinct attribute rows
            idx = expert_idx[g]  # (k,)
            h = torch.baddbmm(self.b1[idx, None, :], chunk.expand(self.top_k, -1, -1), self.w1[idx])  # (k, n, f)
            h = self.dropout(F.gelu(h))
            y = torch.baddbmm(self.b2[idx, None, :], h, self.w2[idx])  # (k, n, d)
            outputs.append((weights[g].to(y.dtype)[:, None, None] * y).sum(0))  # (n, d)
        undo = torch.empty_like(order)
        undo[order] = torch.arange(order.numel(), device=order.device)
        out = torch.cat(outputs)[undo]
        loss = None
        if self.balance_loss_weight > 0:
            loss = self.balance_loss_weight * switch_balance_loss(probs, expert_idx, counts)
        return out.reshape(*lead, self.embed_dim), loss

