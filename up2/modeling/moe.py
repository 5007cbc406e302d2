"""Conditional mixture-of-experts FFN with attribute-level routing and merged expert weights
(paper §4.3, §5.2: "attribute-level Conditional MoE in all FFN layers of the unified decoder",
which follows Uni-Perceiver-MoE, Zhu et al. 2022, arXiv 2206.04674).

Shape shorthand: B sequences, T tokens, N = B*T tokens, d width, f FFN hidden width,
E experts, k experts per routing group (top-k), A attribute width, G distinct attribute rows,
h gate hidden width (= d, as Uni-Perceiver-MoE's attribute transform).

Each LINEAR layer of the FFN is a set of E experts (``w1``/``b1`` for fc1, ``w2``/``b2`` for
fc2). A gate maps a token's ATTRIBUTE vector (``up2.modeling.token_attributes``: its modality,
whether it is a target, whether its attention is causal, which modalities the task's input
has), never its content, to the top-k experts and their weights ``g_e``. The chosen experts'
weights are MERGED, ``W = sum_e g_e W_e`` and ``b = sum_e g_e b_e``, so every token of a routing
group runs one dense FFN ``fc2(GELU(fc1(x)))`` with merged fc1 and fc2. As in Uni-Perceiver-MoE's
BASE configuration (``FFN_SHARE_GATE_DECISION: True``), fc1 and fc2 share one gate decision.
Tokens with equal attributes route alike, so the gate runs once per distinct attribute row and
each group does one merge and one matmul per linear layer.

Merging costs G*E*d*f per layer whatever the number of tokens, so it is cheaper than running k
expert FFNs per token unless a group has fewer than about E/k tokens (e.g. one decoding step of
a single caption).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from up2.utils.host_sync import to_device

__all__ = ["AttributeGate", "ConditionalMoE", "RoutingGroups", "routing_groups", "switch_balance_loss"]


@dataclass(frozen=True)
class RoutingGroups:
    """Tokens grouped by equal routing attributes (paper §4.3: the gate sees only these).

    Attributes:
        groups: (G, A) the distinct attribute rows, on the attributes' device and dtype.
        order: (B*T,) int64 token indices sorted by group (stable).
        undo: (B*T,) int64 inverse permutation of ``order``.
        counts: G Python ints, tokens per group (host values: they size the slices).
    """

    groups: torch.Tensor
    order: torch.Tensor
    undo: torch.Tensor
    counts: List[int]


def routing_groups(attributes: torch.Tensor) -> RoutingGroups:
    """Group the (B, T, A) ``attributes``' tokens by attribute row.

    The grouping is computed on the host from ONE copy of the attributes (their distinct rows
    decide the slice sizes, which the host needs) and kept on the tensor, so every MoE layer of
    a forward that gets the same attribute tensor reuses it: one host synchronisation per
    forward instead of one ``unique`` and one size read per layer.
    """
    # inference tensors keep no version counter (and are not modified in place here)
    version = 0 if attributes.is_inference() else attributes._version
    cached = getattr(attributes, "_up2_routing", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    device, dtype = attributes.device, attributes.dtype
    host = attributes.reshape(-1, attributes.shape[-1]).cpu()  # the one copy to the host
    groups, inverse, counts = torch.unique(host, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    undo = torch.empty_like(order)
    undo[order] = torch.arange(order.numel())
    routing = RoutingGroups(groups=to_device(groups, device, dtype), order=to_device(order, device),
                            undo=to_device(undo, device), counts=counts.tolist())
    attributes._up2_routing = (version, routing)
    return routing


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


class AttributeGate(nn.Module):
    """Attribute vector -> expert logits: Linear(A, h) -> LayerNorm(h) -> Linear(h, E, no bias)
    (Uni-Perceiver-MoE's attribute transform followed by its gate ``wg``), computed in float32.

    In training, Gaussian noise of std ``noise_std / E`` is added to the logits before the top-k
    (Uni-Perceiver-MoE's ``vmoe`` noisy-gate policy of its BASE configuration, NOISE_STD 1); the
    chosen experts' weights are the softmax over their k (noisy) logits. In eval there is no noise.
    """

    def __init__(self, attribute_dim: int, hidden_dim: int, num_experts: int, top_k: int, noise_std: float = 1.0):
        """
        Args:
            attribute_dim: A. hidden_dim: h. num_experts: E. top_k: k in [1, E].
            noise_std: training noise on the logits has std ``noise_std / E`` (0 = none).

        Raises:
            ValueError: a size < 1, top_k > num_experts or a negative noise_std.
        """
        super().__init__()
        for name, value in (("attribute_dim", attribute_dim), ("hidden_dim", hidden_dim),
                            ("num_experts", num_experts), ("top_k", top_k)):
            if value < 1:
                raise ValueError(f"AttributeGate: {name} must be >= 1, got {value}")
        if top_k > num_experts:
            raise ValueError(
                f"AttributeGate: top_k={top_k} exceeds num_experts={num_experts} (need MOE.TOP_K <= MOE.NUM_EXPERTS)"
            )
        if noise_std < 0:
            raise ValueError(f"AttributeGate: noise_std must be >= 0, got {noise_std} (MOE.NOISE_STD)")
        self.num_experts, self.top_k, self.noise_std = num_experts, top_k, float(noise_std)
        self.embed = nn.Linear(attribute_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.logits = nn.Linear(hidden_dim, num_experts, bias=False)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, noise_std={self.noise_std}"

    def forward(self, attributes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route attribute rows.

        Args:
            attributes: (G, A) float attribute rows.

        Returns:
            probs (G, E) float32 softmax over all E (noisy in training) logits, expert_idx
            (G, k) int64 ordered by decreasing logit, weights (G, k) float32 summing to 1.
        """
        with torch.autocast(device_type=attributes.device.type, enabled=False):
            h = self.norm(F.linear(attributes.float(), self.embed.weight.float(), self.embed.bias.float()))
            logits = F.linear(h, self.logits.weight.float())
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * (self.noise_std / self.num_experts)
        top_logits, expert_idx = logits.topk(self.top_k, dim=-1)
        return logits.softmax(-1), expert_idx, top_logits.softmax(-1)


class ConditionalMoE(nn.Module):
    """A GELU FFN whose two linear layers are E experts each, merged per routing group.

    ``y = fc2(GELU(fc1(x)))`` with ``fc1 = sum_{e in topk(a)} g_e (W1_e, b1_e)`` and likewise fc2,
    where ``(topk(a), g) = AttributeGate(a)`` depends only on the token's attributes ``a`` (one
    decision shared by fc1 and fc2). With E = 1 this is exactly a dense FFN.

    Expert weights are stored batched: ``w1`` (E, d, f), ``b1`` (E, f), ``w2`` (E, f, d),
    ``b2`` (E, d); initialised like ``nn.Linear``. The merged weights are differentiable in the
    gate weights and in the chosen experts; experts not chosen by any group of a batch get zero
    gradient from it.

    Load balancing: with ``balance_loss_weight > 0`` every forward returns
    ``balance_loss_weight * switch_balance_loss`` (computed over all tokens, padding included,
    since padding is routed like its attributes) next to its output; g sums it over layers and
    the meta-architecture adds the sum over every pass through g (inputs and targets) to the
    training losses. The module keeps no state between calls.

    Version 2 (this design) replaced version 1 (whole-FFN experts whose OUTPUTS were mixed by a
    linear gate over 11 attributes, task family included); a version-1 state dict cannot be
    converted and loading one raises.
    """

    _version = 2

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int,
        attribute_dim: int,
        dropout: float = 0.0,
        balance_loss_weight: float = 0.0,
        noise_std: float = 1.0,
    ):
        """
        Args:
            embed_dim: d. ffn_dim: f, hidden width of the FFN.
            num_experts: E >= 1 experts per linear layer. top_k: k in [1, E].
            attribute_dim: A, width of the attribute vectors given to ``forward``.
            dropout: dropout on the hidden activations (as the dense FFN).
            balance_loss_weight: weight of the switch load-balancing loss (0 disables it).
            noise_std: gate noise in training, std ``noise_std / E`` (see ``AttributeGate``).

        Raises:
            ValueError: a size < 1, top_k > num_experts, dropout outside [0, 1), a negative
                balance_loss_weight or noise_std.
        """
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("ffn_dim", ffn_dim)):
            if value < 1:
                raise ValueError(f"ConditionalMoE: {name} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ConditionalMoE: dropout must be in [0, 1), got {dropout}")
        if balance_loss_weight < 0:
            raise ValueError(f"ConditionalMoE: balance_loss_weight must be >= 0, got {balance_loss_weight}")
        self.gate = AttributeGate(attribute_dim, embed_dim, num_experts, top_k, noise_std)
        self.embed_dim, self.ffn_dim = embed_dim, ffn_dim
        self.num_experts, self.top_k, self.attribute_dim = num_experts, top_k, attribute_dim
        self.balance_loss_weight = float(balance_loss_weight)
        self.w1 = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, embed_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts as ``nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        for w, b, fan_in in ((self.w1, self.b1, self.embed_dim), (self.w2, self.b2, self.ffn_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, attribute_dim={self.attribute_dim}, "
                f"balance_loss_weight={self.balance_loss_weight}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "gate.weight" in state_dict:  # version 1: a single Linear gate over 11 attributes
            raise ValueError(
                f"checkpoint key {prefix}gate.weight is a version-1 ConditionalMoE (whole-FFN experts with mixed "
                f"outputs, a linear gate over attributes that include the task family); this version merges "
                f"per-linear-layer experts with an attribute gate (Uni-Perceiver-MoE, issue 16) and cannot load it. "
                f"Retrain, or load the checkpoint into a model with MODEL.UNIFIED_DECODER.MOE.ENABLED False after "
                f"dropping its '{prefix}' keys."
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
        """Routing decision of every token (depends on ``attributes`` only; noisy in training).

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
        groups, inverse = torch.unique(attributes.reshape(-1, self.attribute_dim), dim=0, return_inverse=True)
        _, expert_idx, weights = self.gate(groups)
        lead = attributes.shape[:-1]
        return expert_idx[inverse].reshape(*lead, self.top_k), weights[inverse].reshape(*lead, self.top_k)

    def merged_weights(self, expert_idx: torch.Tensor, weights: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dense FFN of each routing group: ``W = sum_e g_e W_e``, ``b = sum_e g_e b_e``.

        Args:
            expert_idx: (G, k) int64. weights: (G, k) float.

        Returns:
            w1 (G, d, f), b1 (G, f), w2 (G, f, d), b2 (G, d), in the experts' dtype.
        """
        G, E = expert_idx.shape[0], self.num_experts
        # (G, E) merge coefficients, zero for the experts a group did not choose; one (G, E) x
        # (E, d*f) product per tensor needs no gathered copy of the chosen experts, and its
        # backward saves nothing but the coefficients and the parameters themselves.
        coef = torch.zeros(G, E, dtype=self.w1.dtype, device=self.w1.device)
        coef = coef.scatter(1, expert_idx, weights.to(self.w1.dtype))
        with torch.autocast(device_type=self.w1.device.type, enabled=False):  # merge in the experts' dtype
            return tuple((coef @ p.reshape(E, -1)).reshape(G, *p.shape[1:]) for p in (self.w1, self.b1, self.w2, self.b2))

    def forward(self, x: torch.Tensor, attributes: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Apply each token's merged FFN.

        Args:
            x: (B, T, d) float tokens (any leading shape works: (..., d)).
            attributes: (B, T, A) float routing attributes, same leading shape as ``x``.

        Returns:
            ((B, T, d), the dtype the matmuls produce (x's dtype, or the autocast dtype); the
            weighted balance loss, 0-dim float32, or None when its weight is 0).

        Raises:
            ValueError: ``attributes`` is None or its shape does not match ``x`` and A, or the
                token width is not d.
        """
        self._check_attributes(x, attributes)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"ConditionalMoE: token width {x.shape[-1]} != embed_dim {self.embed_dim}")
        lead = x.shape[:-1]
        x_flat = x.reshape(-1, self.embed_dim)
        if x_flat.shape[0] == 0:
            return x.clone(), None
        routing = routing_groups(attributes)
        probs, expert_idx, weights = self.gate(routing.groups)  # (G, E), (G, k), (G, k)
        w1, b1, w2, b2 = self.merged_weights(expert_idx, weights)
        if len(routing.counts) == 1:  # one routing group (text-only, image-only tasks): no reordering
            out = torch.addmm(b2[0], self.dropout(F.gelu(torch.addmm(b1[0], x_flat, w1[0]))), w2[0])
        else:
            # tokens sorted by group: each group is one contiguous slice (no per-token loop)
            chunks = x_flat[routing.order].split(routing.counts)
            outputs = [torch.addmm(b2[g], self.dropout(F.gelu(torch.addmm(b1[g], chunk, w1[g]))), w2[g])
                       for g, chunk in enumerate(chunks)]  # loop over the few distinct attribute rows
            out = torch.cat(outputs)[routing.undo]
        loss = None
        if self.balance_loss_weight > 0:
            counts = to_device(routing.counts, probs.device, probs.dtype)
            loss = self.balance_loss_weight * switch_balance_loss(probs, expert_idx, counts)
        return out.reshape(*lead, self.embed_dim), loss
