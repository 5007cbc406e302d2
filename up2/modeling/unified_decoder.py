"""g: the Transformer shared by every task and by inputs and targets alike (paper §4.3, Eq. 6).

Shape shorthand: B sequences, T tokens, d width.

The decoder is BERT-like (post-LayerNorm, GELU FFN; paper §5.2: BERT-base sizes with 6
layers). A learned ``[SPE]`` token is put in front of every sequence; tasks read the
sequence-level representation there.
"""
from __future__ import annotations

from functools import partial
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from up2.modeling.moe import ConditionalMoE
from up2.modeling.token_attributes import ATTRIBUTE_DIM
from up2.structures import AttentionKind, TokenBatch

__all__ = ["UnifiedDecoder", "UnifiedDecoderLayer", "DecoderCache", "build_attention_mask", "SPE_POSITION"]

SPE_POSITION = slice(0, 1)  # ``UnifiedDecoder.forward(..., outputs=SPE_POSITION)``: only [SPE] is read


def build_attention_mask(batch: TokenBatch) -> torch.Tensor:
    """Boolean "may attend" mask for ``F.scaled_dot_product_attention``.

    Args:
        batch: tokens (B, T, d), padding_mask (B, T) bool (True = pad), attention kind and,
            for PREFIX_CAUSAL, prefix_length (B,) int64.

    Returns:
        (B, 1, T, T) bool, True where query t may attend key s. Padding keys are masked;
        every token may attend itself, so no row is empty (padded rows stay finite).

    Raises:
        ValueError: PREFIX_CAUSAL without ``prefix_length``.
    """
    B, T = batch.padding_mask.shape
    device = batch.padding_mask.device
    allowed = (~batch.padding_mask)[:, None, :].expand(B, T, T)
    if batch.attention is AttentionKind.PREFIX_CAUSAL:
        if batch.prefix_length is None:
            raise ValueError("TokenBatch.prefix_length is required for PREFIX_CAUSAL attention")
        idx = torch.arange(T, device=device)
        causal = idx[None, :] <= idx[:, None]  # (T, T): key s <= query t
        in_prefix = idx[None, :] < batch.prefix_length[:, None]  # (B, T) key is a prefix token
        allowed = allowed & (causal[None] | in_prefix[:, None, :])
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


class FeedForward(nn.Module):
    """Dense FFN: Linear(d, f) -> GELU -> dropout -> Linear(f, d). Input/output (B, T, d)."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class UnifiedDecoderLayer(nn.Module):
    """One post-LN Transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

    ``ffn_factory`` (zero-argument callable returning a module called as ``ffn(x, attributes)``,
    e.g. a ``ConditionalMoE``) replaces the dense FFN when given.
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 ffn_factory: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"UNIFIED_DECODER.EMBED_DIM={embed_dim} is not divisible by NUM_HEADS={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout) if ffn_factory is None else ffn_factory()
        self.norm2 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, attributes=None,
                rows: Optional[slice] = None) -> torch.Tensor:
        """x: (B, T, d); attn_mask: (B, 1, T, T) bool (True = may attend); attributes: (B, T, A)
        or None. Returns (B, T, d); with ``rows`` (a slice of the T positions) only those
        positions are computed, as queries over all T keys: (B, len(rows), d)."""
        B, T, d = x.shape
        shape = (B, -1, self.num_heads, d // self.num_heads)
        if rows is None:
            q, k, v = self.qkv(x).view(B, T, 3, *shape[2:]).permute(2, 0, 3, 1, 4)
        else:  # queries of the kept rows only; keys and values of every token
            kv = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:])
            k, v = kv.view(B, T, 2, *shape[2:]).permute(2, 0, 3, 1, 4)
            x, attn_mask = x[:, rows], attn_mask[:, :, rows]
            attributes = None if attributes is None else attributes[:, rows]
            q = F.linear(x, self.qkv.weight[:d], self.qkv.bias[:d]).view(shape).transpose(1, 2)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = self.norm1(x + self.dropout(self.out_proj(attn.transpose(1, 2).reshape(x.shape))))
        return self.norm2(x + self.dropout(self.ffn(x, attributes)))

    def forward_cached(self, x: torch.Tensor, past: Optional[Tuple[torch.Tensor, torch.Tensor]],
                       attn_mask: torch.Tensor, attributes=None, need_output: bool = True):
        """``forward`` for new tokens over the keys / values of earlier ones (eval, no dropout).

        Args:
            x: (B, t, d) the new tokens.  past: keys and values (B, H, S, d / H) of the S earlier
                tokens, or None (S = 0).  attn_mask: (B, 1, t, S + t) bool, True = may attend.
            attributes: (B, t, A) or None.  need_output: False computes only the keys and values.

        Returns:
            ((B, t, d) or None, (keys, values) (B, H, S + t, d / H) of all S + t tokens).
        """
        B, t, d = x.shape
        heads = (B, t, self.num_heads, d // self.num_heads)
        if need_output:
            q, k, v = self.qkv(x).view(B, t, 3, *heads[2:]).permute(2, 0, 3, 1, 4)
        else:
            k, v = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).view(B, t, 2, *heads[2:]).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        if not need_output:
            return None, (k, v)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = self.norm1(x + self.out_proj(attn.transpose(1, 2).reshape(x.shape)))
        return self.norm2(x + self.ffn(x, attributes)), (k, v)


@dataclass
class DecoderCache:
    """Keys and values of a token prefix at every layer of g, for incremental decoding.

    Captioning attends prefix-causally (paper §4.3, Eq. 7): no position depends on a later
    one, so the features of the tokens seen so far never change and their keys and values can
    be kept instead of recomputed at every generated token.

    Attributes:
        layers: per layer (keys, values), each (B, H, S, d / H) in the compute dtype.
        padding_mask: (B, S) bool, True on padded tokens (never attended).
    """

    layers: List[Tuple[torch.Tensor, torch.Tensor]]
    padding_mask: torch.Tensor

    def reorder(self, index: torch.Tensor) -> "DecoderCache":
        """The cache of sequences ``index`` (B',) int64, e.g. the parents of the kept beams
        (``self`` itself, uncopied, when ``index`` is 0 .. B-1, as in greedy decoding).

        Raises:
            ValueError: ``index`` not a 1-D int64 tensor of values in [0, B).
        """
        B = self.padding_mask.shape[0]
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.long:
            raise ValueError(f"DecoderCache.reorder: index must be a 1-D int64 tensor, got {index!r}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= B):
            raise ValueError(f"DecoderCache.reorder: index values must be in [0, {B}), got "
                             f"[{int(index.min())}, {int(index.max())}]")
        if index.numel() == B and torch.equal(index, torch.arange(B, device=index.device)):
            return self
        return DecoderCache([(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers],
                            self.padding_mask.index_select(0, index))


def _moe_factory(g) -> Optional[Callable[[], nn.Module]]:
    """ConditionalMoE factory from cfg.MODEL.UNIFIED_DECODER.MOE, or None (dense) when absent/disabled."""
    moe = g.get("MOE")
    if moe is None or not moe.get("ENABLED", False):
        return None
    return partial(
        ConditionalMoE,
        embed_dim=g.EMBED_DIM,
        ffn_dim=g.FFN_DIM,
        num_experts=moe.NUM_EXPERTS,
        top_k=moe.TOP_K,
        attribute_dim=ATTRIBUTE_DIM,
        dropout=g.DROPOUT,
        balance_loss_weight=moe.get("BALANCE_LOSS_WEIGHT", 0.0),
    )


class UnifiedDecoder(nn.Module):
    """The modality-agnostic Transformer g (paper §4.3).

    ``forward`` prepends ``[SPE]`` and returns un-normalised features; the likelihood
    (``up2.modeling.likelihood``) L2-normalises them.
    """

    @configurable
    def __init__(self, *, embed_dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float,
                 ffn_factory: Optional[Callable[[], nn.Module]] = None):
        """
        Args:
            embed_dim: d. num_layers: Transformer layers (paper: 6). num_heads: attention heads.
            ffn_dim: FFN hidden width. dropout: dropout of attention, FFN and embeddings.
            ffn_factory: None for dense FFNs; else called once per layer to build its FFN, e.g.
                ``partial(ConditionalMoE, ...)`` (paper §5.2: Conditional MoE in every FFN). Such
                FFNs need ``TokenBatch.attributes``.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.spe = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.spe, std=0.02)
        self.input_norm = nn.LayerNorm(embed_dim)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            UnifiedDecoderLayer(embed_dim, num_heads, ffn_dim, dropout, ffn_factory) for _ in range(num_layers)
        )

    @classmethod
    def from_config(cls, cfg):
        g = cfg.MODEL.UNIFIED_DECODER
        return {
            "embed_dim": g.EMBED_DIM,
            "num_layers": g.NUM_LAYERS,
            "num_heads": g.NUM_HEADS,
            "ffn_dim": g.FFN_DIM,
            "dropout": g.DROPOUT,
            "ffn_factory": _moe_factory(g),
        }

    def pop_balance_loss(self) -> Optional[torch.Tensor]:
        """Sum of the MoE load-balancing losses recorded since the last call (0-dim float32), or
        None with dense FFNs / nothing recorded. Call once per training iteration."""
        losses = [layer.ffn.pop_balance_loss() for layer in self.layers if hasattr(layer.ffn, "pop_balance_loss")]
        losses = [loss for loss in losses if loss is not None]
        return torch.stack(losses).sum() if losses else None

    def with_spe(self, batch: TokenBatch) -> TokenBatch:
        """Return a new batch with ``[SPE]`` as token 0 (tokens (B, T+1, d)); prefix_length grows by 1."""
        B = batch.tokens.shape[0]
        spe = self.spe.to(batch.tokens.dtype).expand(B, 1, -1)
        pad = torch.zeros(B, 1, dtype=torch.bool, device=batch.padding_mask.device)
        attributes = batch.attributes
        if attributes is not None:
            attributes = torch.cat([attributes[:, :1], attributes], dim=1)
        prefix = None if batch.prefix_length is None else batch.prefix_length + 1
        return TokenBatch(
            tokens=torch.cat([spe, batch.tokens], dim=1),
            padding_mask=torch.cat([pad, batch.padding_mask], dim=1),
            attributes=attributes,
            attention=batch.attention,
            prefix_length=prefix,
        )

    def forward(self, batch: TokenBatch, outputs: Optional[slice] = None) -> torch.Tensor:
        """Encode a token batch.

        Args:
            batch: TokenBatch WITHOUT ``[SPE]``: tokens (B, T, d) float, padding_mask (B, T) bool.
            outputs: the positions (of the T + 1, ``[SPE]`` at 0) the caller reads, as a slice
                with step 1, e.g. ``slice(0, 1)`` for ``[SPE]``; None for all. In eval mode the
                last layer then computes only those positions (queries over every key): the
                same values for a fraction of its cost. In training every layer runs in full,
                so the MoE load-balancing loss still sees every token.

        Returns:
            (B, T + 1, d) float: position 0 is ``[SPE]``, position i + 1 is input token i; with
            ``outputs``, ``out[:, outputs]`` of that.

        Raises:
            ValueError: a token width other than d, or ``outputs`` not a slice with step 1.
        """
        if batch.tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"token width {batch.tokens.shape[-1]} != unified decoder width {self.embed_dim}")
        if outputs is not None and (not isinstance(outputs, slice) or outputs.step not in (None, 1)):
            raise ValueError(f"outputs must be a slice with step 1 (or None), got {outputs!r}")
        batch = self.with_spe(batch)
        mask = build_attention_mask(batch)
        x = self.input_dropout(self.input_norm(batch.tokens))
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = outputs if i == last and not self.training else None
            x = layer(x, mask, batch.attributes, rows)
        if outputs is not None and (self.training or not self.layers):
            x = x[:, outputs]
        return x

    @torch.no_grad()
    def prefill(self, batch: TokenBatch) -> DecoderCache:
        """Start incremental decoding: the keys and values of ``[SPE] ++ batch`` at every layer
        (captioning inference, paper §4.3).

        The prefix attends within itself (bidirectionally, padding masked), as the prefix of a
        PREFIX_CAUSAL sequence does, so tokens appended later with ``extend`` get the same
        features as ``forward`` over the whole prefix-causal sequence (up to float rounding).

        Args:
            batch: the prefix WITHOUT ``[SPE]`` (e.g. image tokens): tokens (B, T, d),
                padding_mask (B, T), attributes (B, T, A) when the FFNs are MoE.

        Returns:
            DecoderCache over the T + 1 prefix tokens.

        Raises:
            RuntimeError: in training mode (incremental decoding is for inference).
            ValueError: tokens not (B, T, d), a padding mask of another shape, or a batch whose
                ``attention`` is not BIDIRECTIONAL (text already in the prefix).
        """
        if self.training:
            raise RuntimeError("UnifiedDecoder.prefill is for inference: call .eval() first")
        if batch.tokens.dim() != 3 or batch.tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"prefill: tokens must be (B, T, {self.embed_dim}), got {tuple(batch.tokens.shape)}")
        if tuple(batch.padding_mask.shape) != tuple(batch.tokens.shape[:2]):
            raise ValueError(f"prefill: padding_mask must be (B, T) = {tuple(batch.tokens.shape[:2])}, got "
                             f"{tuple(batch.padding_mask.shape)}")
        if batch.attention is not AttentionKind.BIDIRECTIONAL:
            raise ValueError(f"prefill: the prefix attends bidirectionally within itself; got a {batch.attention} "
                             "batch (append causal tokens with extend instead)")
        batch = self.with_spe(batch)
        batch = TokenBatch(batch.tokens, batch.padding_mask, batch.attributes, AttentionKind.BIDIRECTIONAL)
        mask = build_attention_mask(batch)
        x = self.input_norm(batch.tokens)
        layers = []
        for i, layer in enumerate(self.layers):
            x, kv = layer.forward_cached(x, None, mask, batch.attributes, need_output=i < len(self.layers) - 1)
            layers.append(kv)
        return DecoderCache(layers, batch.padding_mask)

    @torch.no_grad()
    def extend(self, cache: DecoderCache, tokens: torch.Tensor, attributes: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, DecoderCache]:
        """Append causal tokens to a cached sequence (paper §4.3, prefix-causal): each new token attends to every
        (unpadded) cached token, the new tokens before it and itself.

        Args:
            cache: from ``prefill`` or an earlier ``extend``.
            tokens: (B, t, d) new tokens (not padded).  attributes: (B, t, A) or None.

        Returns:
            ((B, t, d) features of the new tokens, as ``forward`` of the whole sequence gives
            them; the cache extended by the t tokens).

        Raises:
            RuntimeError: in training mode.
            ValueError: tokens not (B, t, d), or a cache from a decoder of another depth or
                head count.
        """
        if self.training:
            raise RuntimeError("UnifiedDecoder.extend is for inference: call .eval() first")
        if tokens.dim() != 3 or tokens.shape[0] != cache.padding_mask.shape[0] or tokens.shape[2] != self.embed_dim:
            raise ValueError(f"tokens must be (B={cache.padding_mask.shape[0]}, t, {self.embed_dim}), "
                             f"got {tuple(tokens.shape)}")
        B, t, d = tokens.shape
        S = cache.padding_mask.shape[1]
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"extend: the cache holds {len(cache.layers)} layers, this decoder has {len(self.layers)}")
        k0 = cache.layers[0][0]
        heads = self.layers[0].num_heads
        if tuple(k0.shape) != (B, heads, S, d // heads):
            raise ValueError(f"extend: cache keys must be (B={B}, H={heads}, S={S}, {d // heads}), got "
                             f"{tuple(k0.shape)} (a cache of another decoder?)")
        new_pad = torch.zeros(B, t, dtype=torch.bool, device=tokens.device)
        padding = torch.cat((cache.padding_mask, new_pad), dim=1)  # (B, S + t)
        idx = torch.arange(S + t, device=tokens.device)
        allowed = ~padding[:, None, :] & (idx[None, :] < S + 1 + torch.arange(t, device=tokens.device)[:, None])
        allowed = allowed | (idx[None, :] == S + torch.arange(t, device=tokens.device)[:, None])  # itself
        mask = allowed[:, None]  # (B, 1, t, S + t)
        x = self.input_norm(tokens)
        layers = []
        for layer, past in zip(self.layers, cache.layers):
            x, kv = layer.forward_cached(x, past, mask, attributes)
            layers.append(kv)
        return x, DecoderCache(layers, padding)

